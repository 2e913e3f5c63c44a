//! Speculative decoding (prompt lookup) end to end on the default model: output is the same
//! token for token with and without drafts — greedy or seeded sampling, alone, in a batch, under
//! KV pressure, with stop strings and log probabilities — while drafts are actually kept on
//! text that repeats its input.

use std::sync::atomic::Ordering;

use lastmile_engine::{
    EngineConfig, EngineHandle, GenerateRequest, GenerationEvent, LoadedModel, SamplingParams,
    Speculation, TokenLogprobs,
};
use lastmile_models::ensure_default_model;

const SPEC: Speculation = Speculation {
    ngram: 3,
    max_draft: 8,
};

/// A prompt whose answer copies its input: drafts from the prompt should be kept.
const GROUNDED: &str = "Copy the text exactly.\n\nText: The quick brown fox jumps over the lazy \
    dog. The lazy dog sleeps in the warm sun all afternoon, and the fox runs back into the \
    green forest before the farmer comes home.\n\nCopy: The quick brown fox jumps over the lazy \
    dog. The lazy dog";

const OPEN: [&str; 3] = [
    "The history of Rome",
    "def quicksort(arr):",
    "1, 1, 2, 3, 5, 8,",
];

fn engine(kv_tokens: Option<usize>) -> EngineHandle {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        kv_cache_tokens: kv_tokens,
        ..EngineConfig::default()
    };
    EngineHandle::start(loaded, config).expect("engine")
}

fn request(e: &EngineHandle, text: &str, max_tokens: usize, spec: Speculation) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        speculation: Some(spec),
        ..GenerateRequest::new(
            e.tokenizer().encode_prompt(text).expect("encode"),
            SamplingParams::greedy(),
            max_tokens,
        )
    }
}

/// A stream's tokens, text, log probabilities and finish reason.
type Output = (Vec<u32>, String, Vec<Option<TokenLogprobs>>, String);

fn collect(mut s: lastmile_engine::GenerationStream) -> Output {
    let (mut ids, mut text, mut lps) = (Vec::new(), String::new(), Vec::new());
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token {
                id,
                text: t,
                logprobs,
            } => {
                ids.push(id);
                text.push_str(&t);
                lps.push(logprobs);
            }
            GenerationEvent::Finished {
                reason,
                text: t,
                completion_tokens,
                ..
            } => {
                text.push_str(&t);
                assert_eq!(completion_tokens, ids.len(), "usage counts what was sent");
                return (ids, text, lps, format!("{reason:?}"));
            }
            GenerationEvent::PromptLogprobs(_) => panic!("not asked for"),
            GenerationEvent::Failed(e) => panic!("failed: {e}"),
        }
    }
    panic!("stream ended without Finished")
}

fn run(e: &EngineHandle, reqs: Vec<GenerateRequest>) -> Vec<Output> {
    let streams: Vec<_> = reqs
        .into_iter()
        .map(|r| e.submit(r).expect("submit"))
        .collect();
    streams.into_iter().map(collect).collect()
}

fn accepted(e: &EngineHandle) -> (u64, u64) {
    let st = e.stats();
    (
        st.draft_tokens.load(Ordering::Relaxed),
        st.accepted_draft_tokens.load(Ordering::Relaxed),
    )
}

#[test]
fn greedy_output_is_the_same_with_drafts_alone_and_in_a_batch() {
    let e = engine(None);
    let prompts: Vec<&str> = std::iter::once(GROUNDED).chain(OPEN).collect();
    let plain: Vec<Output> = prompts
        .iter()
        .map(|p| run(&e, vec![request(&e, p, 48, Speculation::OFF)]).remove(0))
        .collect();
    assert_eq!(accepted(&e), (0, 0), "off means no drafts");
    // Alone.
    for (i, p) in prompts.iter().enumerate() {
        let spec = run(&e, vec![request(&e, p, 48, SPEC)]).remove(0);
        assert_eq!(spec.0, plain[i].0, "prompt {i} alone");
        assert_eq!(spec.1, plain[i].1);
    }
    let (drafted, kept) = accepted(&e);
    assert!(
        kept >= 16,
        "the grounded prompt keeps drafts: {kept} of {drafted} kept"
    );
    // Together: drafting and plain decoding sequences share steps.
    let batch = run(
        &e,
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let spec = if i % 2 == 0 { SPEC } else { Speculation::OFF };
                request(&e, p, 48, spec)
            })
            .collect(),
    );
    for (i, out) in batch.iter().enumerate() {
        assert_eq!(out.0, plain[i].0, "prompt {i} in a batch");
    }
}

#[test]
fn seeded_sampling_gives_the_same_answer_with_drafts() {
    let e = engine(None);
    let sampled = |spec, seed: u64, temperature: f32| {
        let mut r = request(&e, GROUNDED, 48, spec);
        r.sampling = SamplingParams {
            temperature,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        r
    };
    for (seed, temperature) in [(1, 0.3), (2, 0.7), (3, 1.0)] {
        let plain = run(&e, vec![sampled(Speculation::OFF, seed, temperature)]).remove(0);
        let spec = run(&e, vec![sampled(SPEC, seed, temperature)]).remove(0);
        assert_eq!(spec.0, plain.0, "seed {seed} at temperature {temperature}");
    }
    assert!(accepted(&e).1 > 0, "drafts were kept while sampling");
}

#[test]
fn stop_strings_logprobs_and_the_token_limit_behave_as_without_drafts() {
    let e = engine(None);
    let with_extras = |spec, max_tokens| {
        let mut r = request(&e, GROUNDED, max_tokens, spec);
        r.logprobs = Some(2);
        r.stop = vec!["warm sun".into()];
        r
    };
    for max_tokens in [1, 5, 40] {
        let plain = run(&e, vec![with_extras(Speculation::OFF, max_tokens)]).remove(0);
        let spec = run(&e, vec![with_extras(SPEC, max_tokens)]).remove(0);
        assert_eq!(spec.0, plain.0, "max_tokens {max_tokens}");
        assert_eq!(spec.1, plain.1, "text (stop string cut) {max_tokens}");
        assert_eq!(spec.2, plain.2, "log probabilities {max_tokens}");
        assert_eq!(spec.3, plain.3, "finish reason {max_tokens}");
        assert!(spec.0.len() <= max_tokens);
    }
    assert!(accepted(&e).1 > 0, "drafts were kept along the way");
}

#[test]
fn drafts_under_kv_pressure_change_nothing_and_leak_no_block() {
    // 12 blocks of 16 tokens for four requests of ~60-100 tokens each: drafts must give way.
    let tight = engine(Some(192));
    let roomy = engine(None);
    let prompts: Vec<&str> = std::iter::once(GROUNDED).chain(OPEN).collect();
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            run(&roomy, vec![request(&roomy, p, 40, Speculation::OFF)])
                .remove(0)
                .0
        })
        .collect();
    let outs = run(
        &tight,
        prompts
            .iter()
            .map(|p| request(&tight, p, 40, SPEC))
            .collect(),
    );
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.0, solo[i], "prompt {i} under KV pressure");
    }
    let st = tight.stats();
    assert!(accepted(&tight).0 > 0, "drafts were made under pressure");
    let mut used = usize::MAX;
    for _ in 0..100 {
        used = st.kv_blocks_used.load(Ordering::Relaxed);
        if used == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(used, 0, "blocks leaked");
}
