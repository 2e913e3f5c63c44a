//! Speculative decoding end to end on the default model, by prompt lookup and by a draft model:
//! output is the same token for token with and without drafts — greedy or seeded sampling,
//! alone, in a batch, under KV pressure, with stop strings and log probabilities — while drafts
//! are actually kept (on text that repeats its input, or where the draft model guesses right).

use std::sync::atomic::Ordering;

use lastmile_engine::{
    EngineConfig, EngineError, EngineHandle, GenerateRequest, GenerationEvent, LoadedModel,
    SamplingParams, Speculation, TokenLogprobs,
};
use lastmile_models::ensure_default_model;

const SPEC: Speculation = Speculation::lookup(3, 8);

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

const BY_MODEL: Speculation = Speculation::draft_model(6);

fn engine(kv_tokens: Option<usize>) -> EngineHandle {
    drafting_engine(kv_tokens, None)
}

fn load() -> LoadedModel {
    LoadedModel::load(&ensure_default_model().expect("model")).expect("load")
}

/// The default model as a draft model, cut to its first `layers` decoder blocks (all 30: the
/// served model's exact twin): a cheaper model of the same family, whose guesses are often but
/// not always the served model's.
fn draft_of(layers: usize) -> LoadedModel {
    let mut d = load();
    d.model.weights.layers.truncate(layers);
    d.model.config.layers = layers;
    d
}

fn drafting_engine(kv_tokens: Option<usize>, draft: Option<LoadedModel>) -> EngineHandle {
    let config = EngineConfig {
        threads: 2,
        kv_cache_tokens: kv_tokens,
        ..EngineConfig::default()
    };
    EngineHandle::start_with_draft(load(), draft, config).expect("engine")
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

/// Four requests drafting as `spec` says on an engine of 12 blocks of 16 tokens (`draft`: its
/// draft model) for requests of ~60-100 tokens each: drafts must give way; the answers are the
/// ones a roomy engine gives without drafts, and every block comes back.
fn under_kv_pressure(spec: Speculation, draft: Option<LoadedModel>) {
    let tight = drafting_engine(Some(192), draft);
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
            .map(|p| request(&tight, p, 40, spec))
            .collect(),
    );
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.0, solo[i], "prompt {i} under KV pressure");
    }
    assert!(accepted(&tight).0 > 0, "drafts were made under pressure");
    let st = tight.stats();
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

#[test]
fn drafts_under_kv_pressure_change_nothing_and_leak_no_block() {
    under_kv_pressure(SPEC, None);
}

#[test]
fn a_draft_model_changes_no_token_alone_in_a_batch_or_sampled() {
    let e = drafting_engine(None, Some(draft_of(20)));
    assert_eq!(e.info().draft.as_ref().map(|d| d.layers), Some(20));
    let prompts: Vec<&str> = std::iter::once(GROUNDED).chain(OPEN).collect();
    let plain: Vec<Output> = prompts
        .iter()
        .map(|p| run(&e, vec![request(&e, p, 40, Speculation::OFF)]).remove(0))
        .collect();
    assert_eq!(accepted(&e), (0, 0), "off means no drafts");
    for (i, p) in prompts.iter().enumerate() {
        let out = run(&e, vec![request(&e, p, 40, BY_MODEL)]).remove(0);
        assert_eq!(out.0, plain[i].0, "prompt {i} alone");
        assert_eq!(out.1, plain[i].1);
    }
    let (drafted, kept) = accepted(&e);
    assert!(
        kept > 0 && kept < drafted,
        "a 20-layer draft of a 30-layer model is right often, not always: {kept} of {drafted}"
    );
    // Together, drafting by model, by lookup and not at all in the same steps.
    let specs = [BY_MODEL, SPEC, Speculation::OFF, BY_MODEL];
    let batch = run(
        &e,
        prompts
            .iter()
            .zip(specs)
            .map(|(p, spec)| request(&e, p, 40, spec))
            .collect(),
    );
    for (i, out) in batch.iter().enumerate() {
        assert_eq!(out.0, plain[i].0, "prompt {i} in a batch");
    }
    // Sampled with a seed: the same draws, the same answer.
    for (seed, temperature) in [(1, 0.5), (2, 1.0)] {
        let sampled = |spec| {
            let mut r = request(&e, OPEN[0], 32, spec);
            r.sampling = SamplingParams {
                temperature,
                top_p: 0.95,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            r.logprobs = Some(1);
            run(&e, vec![r]).remove(0)
        };
        let (off, on) = (sampled(Speculation::OFF), sampled(BY_MODEL));
        assert_eq!(on.0, off.0, "seed {seed} at temperature {temperature}");
        assert_eq!(on.2, off.2, "log probabilities");
    }
}

#[test]
fn a_twin_draft_model_is_always_right_and_is_the_default() {
    // The served model's exact twin guesses what the served model computes (its kernels give
    // a token the same numbers in any batch), so greedy drafts are all kept.
    let e = drafting_engine(None, Some(draft_of(30)));
    let prompt = request(&e, OPEN[1], 48, Speculation::OFF);
    let plain = run(&e, vec![prompt]).remove(0);
    // A request that does not choose drafts by the draft model on an engine that has one.
    let mut r = request(&e, OPEN[1], 48, SPEC);
    r.speculation = None;
    let default = EngineHandle::start_with_draft(
        load(),
        Some(draft_of(30)),
        EngineConfig {
            threads: 2,
            speculation: Speculation {
                ngram: 3,
                max_draft: 6,
                source: lastmile_engine::DraftSource::Default,
            },
            ..EngineConfig::default()
        },
    )
    .expect("engine");
    let out = run(&default, vec![r]).remove(0);
    assert_eq!(out.0, plain.0);
    let (drafted, kept) = accepted(&default);
    assert!(drafted >= 20, "{drafted} drafted");
    assert_eq!(kept, drafted, "the twin is always right");
    // And the same on the first engine, asked for explicitly.
    let out = run(&e, vec![request(&e, OPEN[1], 48, BY_MODEL)]).remove(0);
    assert_eq!(out.0, plain.0);
    let (drafted, kept) = accepted(&e);
    assert!(drafted >= 20 && kept == drafted, "{kept} of {drafted}");
}

#[test]
fn draft_model_requests_without_one_and_foreign_tokenizers_are_refused() {
    let e = engine(None);
    match e.submit(request(&e, OPEN[0], 8, BY_MODEL)) {
        Err(EngineError::NoDraftModel) => {}
        other => panic!("expected NoDraftModel, got {:?}", other.err()),
    }
    // Turned off, the same request is fine.
    let off = Speculation::draft_model(0);
    assert_eq!(run(&e, vec![request(&e, OPEN[0], 4, off)])[0].0.len(), 4);
    // A draft model whose vocabulary is not the served model's is refused at start.
    let mut foreign = draft_of(4);
    foreign.model.config.vocab -= 1;
    let err = EngineHandle::start_with_draft(load(), Some(foreign), EngineConfig::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("tokenizer"), "{err}");
    // Nor one of the same size whose tokens mean other text: two ordinary tokens' ids swapped.
    let mut swapped = draft_of(4);
    let mut doc: serde_json::Value =
        serde_json::from_str(&swapped.tokenizer.to_json().expect("json")).expect("parse");
    let vocab = doc["model"]["vocab"]
        .as_object_mut()
        .expect("a BPE vocabulary");
    let (a, b) = (vocab["Hello"].clone(), vocab["world"].clone());
    assert_ne!(a, b);
    vocab.insert("Hello".into(), b);
    vocab.insert("world".into(), a);
    let facts = swapped.tokenizer.special_facts();
    swapped.tokenizer =
        lastmile_engine::tokenizer::TextTokenizer::from_json(&doc.to_string(), facts)
            .expect("a valid tokenizer");
    let err = EngineHandle::start_with_draft(load(), Some(swapped), EngineConfig::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("different pieces"), "{err}");
}

#[test]
fn draft_model_under_kv_pressure_changes_nothing_and_leaks_no_block() {
    under_kv_pressure(BY_MODEL, Some(draft_of(20)));
}
