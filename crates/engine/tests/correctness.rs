//! Correctness against llama.cpp on the default model: tokenizer ids and teacher-forced greedy
//! agreement, from golden fixtures made by `scripts/anchor/make_golden.py`.

mod common;

use lastmile_engine::kv::KvCache;
use lastmile_engine::model::{BatchSeq, Scratch};
use lastmile_engine::parallel::ThreadPool;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn tokenizer_ids_equal_llama_cpp() {
    let m = common::default_model();
    let fx = common::fixture("tokenizer_smollm2.json");
    assert_eq!(fx["add_bos"].as_bool(), Some(m.tokenizer.add_bos));
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let want = ids(&c["ids"]);
        let got = m.tokenizer.encode(text).expect("encode");
        if got != want {
            failures.push(format!(
                "{text:?}\n  llama.cpp {want:?}\n  ours      {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn teacher_forced_greedy_agrees_with_llama_cpp() {
    let m = common::default_model();
    let fx = common::fixture("teacher_forced_smollm2.json");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    let cfg = &m.model.config;
    let pool = ThreadPool::new(2);
    let (mut positions, mut top1_equal) = (0usize, 0usize);
    let mut worst = Vec::new();
    for c in cases {
        let prompt = ids(&c["prompt_ids"]);
        let cont = ids(&c["continuation_ids"]);
        assert_eq!(
            m.tokenizer
                .encode(c["prompt"].as_str().expect("prompt"))
                .expect("encode"),
            prompt
        );
        let total = prompt.len() + cont.len();
        let mut kv = KvCache::new(cfg.layers, total.div_ceil(16), 16, cfg.kv_dim());
        let blocks: Vec<u32> = (0..total.div_ceil(16) as u32).collect();
        let mut s = Scratch::default();
        // The prompt as one prefill, then the continuation one decode step at a time.
        let mut fed = 0;
        let mut step = |tokens: &[u32], s: &mut Scratch, kv: &mut KvCache| {
            let b = [BatchSeq {
                start: 0,
                len: tokens.len(),
                pos0: fed,
                blocks: &blocks,
                logit_rows: 1,
            }];
            m.model.forward(tokens, &b, kv, s, &pool);
            fed += tokens.len();
            s.logits[..cfg.vocab].to_vec()
        };
        let mut logits = step(&prompt, &mut s, &mut kv);
        for (i, &want) in cont.iter().enumerate() {
            let top = lastmile_engine::sampler::argmax(&logits);
            let gap = logits[top as usize] - logits[want as usize];
            positions += 1;
            if top == want {
                top1_equal += 1;
            }
            assert!(
                gap <= 0.5,
                "prompt {:?} position {i}: llama.cpp chose {want}, ours {top} by a margin of {gap}",
                c["prompt"]
            );
            if gap > 0.0 {
                worst.push(gap);
            }
            logits = step(&[want], &mut s, &mut kv);
        }
    }
    worst.sort_by(|a, b| b.total_cmp(a));
    eprintln!(
        "positions {positions}, top-1 equal {top1_equal}, largest gaps {:?}",
        &worst[..worst.len().min(5)]
    );
    let rate = top1_equal as f64 / positions as f64;
    assert!(
        rate >= 0.95,
        "top-1 agreement {rate:.3} over {positions} positions (near-ties: {worst:?})"
    );
}

#[test]
fn incremental_detokenization_never_splits_characters() {
    let m = common::default_model();
    let fx = common::fixture("tokenizer_smollm2.json");
    let mut multibyte = 0;
    for c in fx["cases"].as_array().expect("cases") {
        let want_ids = ids(&c["ids"]);
        let mut stream = lastmile_engine::tokenizer::DecodeStream::default();
        let mut text = String::new();
        for &id in &want_ids {
            if let Some(delta) = stream.step(&m.tokenizer, id).expect("decode") {
                assert!(!delta.contains('\u{FFFD}'), "broken character in {delta:?}");
                text.push_str(&delta);
            }
        }
        assert_eq!(
            text,
            m.tokenizer.decode(&want_ids).expect("decode"),
            "{:?}",
            c["text"]
        );
        if c["text"]
            .as_str()
            .is_some_and(|t| t.chars().any(|ch| ch.len_utf8() > 2))
        {
            multibyte += 1;
        }
    }
    assert!(multibyte >= 3, "the fixture should hold emoji and CJK text");
}

/// The repacked matrices share one buffer, in the order a step reads them (layer by layer, Q K V
/// O gate up down, then the output), each right after the previous one (cache-line padding
/// only): a decode step streams it front to back.
#[test]
fn packed_weights_lie_in_one_buffer_in_forward_order() {
    let m = common::default_model();
    let w = &m.model.weights;
    if lastmile_engine::kernels::QMatrix::packing_for_this_cpu().is_none() {
        eprintln!("skipped: this CPU has no packed layout (no AVX2)");
        return;
    }
    let mut order: Vec<&lastmile_engine::kernels::QMatrix> = Vec::new();
    for l in &w.layers {
        order.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
    }
    order.push(&w.output);
    assert_eq!(order.len(), 7 * m.model.config.layers + 1);
    for pair in order.windows(2) {
        assert!(pair[0].is_packed() && pair[1].is_packed(), "not repacked");
        let (a, b) = (pair[0].address_range(), pair[1].address_range());
        assert!(
            b.start >= a.end && b.start - a.end < 64,
            "{a:x?} then {b:x?}: not next to each other"
        );
        assert_eq!(b.start % 64, 0, "not cache-line aligned");
    }
}
