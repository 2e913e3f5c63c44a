//! The prefix cache: reused blocks give identical greedy output, hits are counted, blocks are
//! shared while in use and return to the pool after, and events name what was stored.

mod common;

use std::sync::atomic::Ordering;

use lastmile_engine::{
    EngineConfig, EngineHandle, GenerateRequest, GenerationEvent, LoadedModel, SamplingParams,
};
use lastmile_models::ensure_default_model;

fn engine(prefix_cache: bool, kv_tokens: Option<usize>) -> EngineHandle {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        prefix_cache,
        kv_cache_tokens: kv_tokens,
        ..EngineConfig::default()
    };
    EngineHandle::start(loaded, config).expect("engine")
}

use common::generate as run;

fn wait_idle(e: &EngineHandle) {
    for _ in 0..200 {
        if e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            && e.stats().running.load(Ordering::Relaxed) == 0
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "blocks still in use: {}",
        e.stats().kv_blocks_used.load(Ordering::Relaxed)
    );
}

fn system_prompt(e: &EngineHandle, user: &str) -> Vec<u32> {
    let sys =
        "You are a meticulous assistant. Answer briefly, cite facts, and never invent sources. "
            .repeat(6);
    e.tokenizer()
        .encode(&format!("<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"))
        .expect("encode")
}

#[test]
fn shared_prefixes_are_reused_with_identical_output() {
    let cached = engine(true, None);
    let plain = engine(false, None);
    let mut events = cached.subscribe_kv_events();
    let users = [
        "What is a prime number?",
        "Name a large river.",
        "What is a prime number?",
    ];
    for (i, u) in users.iter().enumerate() {
        let p = system_prompt(&cached, u);
        assert!(p.len() > 100);
        let a = run(&cached, &p, 12);
        let b = run(&plain, &p, 12);
        assert_eq!(a, b, "request {i}: the prefix cache changed the output");
    }
    let st = cached.stats();
    let (q, h) = (
        st.prefix_query_tokens.load(Ordering::Relaxed),
        st.prefix_hit_tokens.load(Ordering::Relaxed),
    );
    // Requests 2 and 3 reuse the system prompt (3 all but its last block): well over a third of
    // all prompt tokens.
    assert!(3 * h > q, "hits {h} of {q} tokens");
    assert_eq!(plain.stats().prefix_hit_tokens.load(Ordering::Relaxed), 0);
    wait_idle(&cached);
    assert!(
        st.kv_blocks_cached.load(Ordering::Relaxed) > 0,
        "idle blocks stay cached"
    );
    let mut stored = 0;
    while let Ok(ev) = events.try_recv() {
        if matches!(ev, lastmile_protocol::KvEvent::Stored { .. }) {
            stored += 1;
        }
    }
    assert!(
        stored >= 8,
        "expected Stored events for the cached blocks, got {stored}"
    );
}

#[test]
fn concurrent_sharers_and_eviction_keep_accounting_exact() {
    // A small pool: 20 blocks of 16. Shared prefixes are referenced by several running sequences;
    // later prompts force idle cached blocks out (Removed events).
    let e = engine(true, Some(320));
    let mut events = e.subscribe_kv_events();
    let prompts: Vec<Vec<u32>> = ["apples", "pears", "plums"]
        .iter()
        .map(|u| system_prompt(&e, u))
        .collect();
    let solo: Vec<Vec<u32>> = prompts.iter().map(|p| run(&e, p, 8)).collect();
    wait_idle(&e);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            e.submit(GenerateRequest {
                prompt: p.clone(),
                sampling: SamplingParams::greedy(),
                max_tokens: 8,
                stop: vec![],
                ignore_eos: true,
                logprobs: None,
                prompt_logprobs: None,
                grammar: None,
                speculation: None,
            })
            .expect("submit")
        })
        .collect();
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut ids = Vec::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                GenerationEvent::Token { id, .. } => ids.push(id),
                GenerationEvent::Finished { .. } => break,
                GenerationEvent::PromptLogprobs(_) => panic!("not asked for"),
                GenerationEvent::Failed(m) => panic!("{m}"),
            }
        }
        assert_eq!(ids, solo[i]);
    }
    wait_idle(&e);
    // Unrelated long prompts push the cached prefix out.
    for k in 0..3 {
        let p = e
            .tokenizer()
            .encode(&format!("{k} unrelated text about the weather and the sea. ").repeat(12))
            .expect("encode");
        run(&e, &p, 4);
    }
    wait_idle(&e);
    let mut removed = 0;
    // The events since subscription (which started from an empty cache) rebuild the snapshot.
    let mut rebuilt = std::collections::HashSet::new();
    while let Ok(ev) = events.try_recv() {
        match ev {
            lastmile_protocol::KvEvent::Stored { hash, .. } => {
                rebuilt.insert(hash);
            }
            lastmile_protocol::KvEvent::Removed { hash } => {
                removed += 1;
                rebuilt.remove(&hash);
            }
        }
    }
    assert!(removed > 0, "eviction should publish Removed events");
    let snapshot: std::collections::HashSet<u64> = e.cached_blocks().into_iter().collect();
    assert_eq!(snapshot, rebuilt, "the snapshot is what the events leave");
    assert_eq!(
        snapshot.len(),
        e.stats()
            .kv_blocks_cached
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn choices_of_one_prompt_compute_its_full_blocks_once() {
    // What `n` relies on: identical prompts submitted together wait for the first to compute the
    // shared blocks, then reuse them; only the last partial block is computed per choice.
    let e = engine(true, None);
    let prompt = system_prompt(&e, "Tell me about rivers.");
    // Every full block but one token is reusable (the last token is computed for its logits).
    let full = (prompt.len() - 1) / 16 * 16;
    let n = 4;
    let before = e.stats().prefix_hit_tokens.load(Ordering::Relaxed);
    let prefilled = e.stats().prefill_tokens.load(Ordering::Relaxed);
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let sampling = SamplingParams {
                temperature: 1.0,
                seed: Some(i),
                ..SamplingParams::default()
            };
            e.submit(GenerateRequest::new(prompt.clone(), sampling, 4))
                .expect("submit")
        })
        .collect();
    for mut s in streams {
        while let Some(ev) = s.blocking_next() {
            match ev {
                GenerationEvent::Finished { .. } => break,
                GenerationEvent::PromptLogprobs(_) => panic!("not asked for"),
                GenerationEvent::Failed(m) => panic!("{m}"),
                GenerationEvent::Token { .. } => {}
            }
        }
    }
    wait_idle(&e);
    let hits = e.stats().prefix_hit_tokens.load(Ordering::Relaxed) - before;
    let computed = e.stats().prefill_tokens.load(Ordering::Relaxed) - prefilled;
    assert!(full >= 32, "the prompt should span several blocks");
    assert_eq!(hits as usize, (n as usize - 1) * full);
    assert_eq!(
        computed as usize,
        prompt.len() + (n as usize - 1) * (prompt.len() - full)
    );
}
