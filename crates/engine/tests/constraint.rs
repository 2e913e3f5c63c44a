//! Constrained decoding and log probabilities through the engine's handle: grammar-constrained
//! output always matches (at any temperature, with a batch of other requests running beside it),
//! bad grammars are refused as invalid requests, token bytes reassemble the text, and reported log
//! probabilities agree with greedy choices.

use lastmile_engine::fetch::ensure_default_model;
use lastmile_engine::{
    EngineConfig, EngineError, EngineHandle, FinishReason, GenerateRequest, GenerationEvent,
    GrammarSpec, LoadedModel, SamplingParams, TokenLogprobs,
};
use serde_json::{json, Value};

fn engine() -> EngineHandle {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let config = EngineConfig {
        threads: 2,
        ..EngineConfig::default()
    };
    EngineHandle::start(loaded, config).expect("engine")
}

fn chat_prompt(e: &EngineHandle, user: &str) -> Vec<u32> {
    let rendered = e
        .template()
        .render(&json!([{"role": "user", "content": user}]), true)
        .expect("template");
    e.tokenizer().encode_chat(&rendered).expect("encode")
}

struct Output {
    text: String,
    reason: FinishReason,
    logprobs: Vec<(u32, TokenLogprobs)>,
    prompt_logprobs: Vec<(u32, TokenLogprobs)>,
    completion_tokens: usize,
}

fn run(e: &EngineHandle, request: GenerateRequest) -> Output {
    let mut s = e.submit(request).expect("submit");
    let (mut text, mut logprobs, mut prompt_logprobs) = (String::new(), Vec::new(), Vec::new());
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token {
                id,
                text: t,
                logprobs: lp,
            } => {
                text.push_str(&t);
                logprobs.extend(lp.map(|lp| (id, lp)));
            }
            GenerationEvent::PromptLogprobs(entries) => {
                assert!(logprobs.is_empty(), "prompt logprobs come first");
                prompt_logprobs.extend(entries);
            }
            GenerationEvent::Finished {
                text: t,
                reason,
                completion_tokens,
                ..
            } => {
                text.push_str(&t);
                return Output {
                    text,
                    reason,
                    logprobs,
                    prompt_logprobs,
                    completion_tokens,
                };
            }
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("stream ended without Finished")
}

fn sampled(seed: u64, temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

#[test]
fn json_schema_output_always_validates() {
    let e = engine();
    let schema = json!({"type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 9},
            "ok": {"type": "boolean"}},
        "required": ["colour", "count", "ok"], "additionalProperties": false});
    let grammar = e
        .compile_grammar(&GrammarSpec::JsonSchema(schema))
        .expect("compiles");
    let prompt = chat_prompt(&e, "Describe a box of crayons as JSON.");
    // Unconstrained neighbours share the batch; the constraint is per sequence.
    let free: Vec<_> = (0..2)
        .map(|i| {
            let mut r = GenerateRequest::new(prompt.clone(), sampled(100 + i, 1.0), 24);
            r.ignore_eos = true;
            e.submit(r).expect("submit")
        })
        .collect();
    for seed in 0..6 {
        let mut r = GenerateRequest::new(prompt.clone(), sampled(seed, 1.6), 200);
        r.grammar = Some(grammar.clone());
        let out = run(&e, r);
        assert_eq!(out.reason, FinishReason::Stop, "{}", out.text);
        let v: Value = serde_json::from_str(&out.text).expect("valid JSON");
        assert!(["red", "green", "blue"].contains(&v["colour"].as_str().expect("colour")));
        assert!((1..=9).contains(&v["count"].as_i64().expect("count")));
        assert!(v["ok"].is_boolean());
        assert_eq!(v.as_object().expect("object").len(), 3);
    }
    drop(free);
}

#[test]
fn regex_and_lark_grammars_constrain_text() {
    let e = engine();
    let prompt = chat_prompt(&e, "Give me a code.");
    let rx = e
        .compile_grammar(&GrammarSpec::Regex("[A-Z]{3}-[0-9]{4}".into()))
        .expect("compiles");
    for seed in 0..4 {
        let mut r = GenerateRequest::new(prompt.clone(), sampled(seed, 1.5), 40);
        r.grammar = Some(rx.clone());
        let out = run(&e, r);
        let t = out.text.as_bytes();
        assert_eq!(out.reason, FinishReason::Stop);
        assert!(
            t.len() == 8
                && t[..3].iter().all(u8::is_ascii_uppercase)
                && t[3] == b'-'
                && t[4..].iter().all(u8::is_ascii_digit),
            "{:?}",
            out.text
        );
    }
    let lark = e
        .compile_grammar(&GrammarSpec::Lark(
            "start: \"Answer: \" (\"yes\" | \"no\")".into(),
        ))
        .expect("compiles");
    let mut r = GenerateRequest::new(prompt, sampled(1, 1.0), 20);
    r.grammar = Some(lark);
    let out = run(&e, r);
    assert!(
        out.text == "Answer: yes" || out.text == "Answer: no",
        "{:?}",
        out.text
    );
}

#[test]
fn bad_grammars_are_invalid_requests() {
    let e = engine();
    for spec in [
        GrammarSpec::Regex("(unclosed".into()),
        GrammarSpec::JsonSchema(json!({"type": 5})),
        GrammarSpec::JsonSchema(json!({"$ref": "#/$defs/missing"})),
        GrammarSpec::Lark("start: undefined_rule".into()),
        // Compiles, but no string is in its language.
        GrammarSpec::Lark("start: a\na: a".into()),
    ] {
        match e.compile_grammar(&spec) {
            Err(EngineError::InvalidRequest(msg)) => {
                assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}")
            }
            other => panic!("{spec:?} should be refused, got {other:?}"),
        }
    }
}

#[test]
fn logprobs_agree_with_greedy_choices_and_pieces_rebuild_text() {
    let e = engine();
    let prompt = chat_prompt(&e, "Write one sentence about rivers.");
    let mut r = GenerateRequest::new(prompt, SamplingParams::greedy(), 16);
    r.logprobs = Some(5);
    let out = run(&e, r);
    assert_eq!(out.logprobs.len(), 16);
    let mut bytes = Vec::new();
    for (id, lp) in &out.logprobs {
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].0, *id, "greedy picks the most likely token");
        assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mass: f32 = lp.top.iter().map(|t| t.1.exp()).sum();
        assert!(mass <= 1.0 + 1e-4 && lp.logprob <= 0.0);
        bytes.extend_from_slice(e.tokenizer().piece(*id));
    }
    assert_eq!(String::from_utf8(bytes).expect("UTF-8"), out.text);
    // Special tokens keep their text and are marked.
    let pieces = e.tokenizer().pieces();
    let im_end = e.tokenizer().token_id("<|im_end|>").expect("im_end") as usize;
    assert_eq!(pieces[im_end].bytes, b"<|im_end|>");
    assert!(pieces[im_end].special);
}

#[test]
fn prompt_logprobs_score_the_prompt_like_generation_did() {
    let e = engine();
    let prompt = chat_prompt(&e, "Name a large river.");
    let mut r = GenerateRequest::new(prompt.clone(), SamplingParams::greedy(), 8);
    r.logprobs = Some(2);
    r.ignore_eos = true;
    let generated = run(&e, r);
    assert_eq!(generated.logprobs.len(), 8);
    // Score prompt + continuation without generating: the continuation's positions get the
    // log probabilities generation reported (prefill in chunks vs one decode step per token,
    // so allow for summation-order noise), and every other prompt position gets one too.
    let mut scored: Vec<u32> = prompt.clone();
    scored.extend(generated.logprobs.iter().map(|(id, _)| *id));
    // Cached blocks of the earlier run must not be reused (their positions need logits).
    let mut r = GenerateRequest::new(scored.clone(), SamplingParams::greedy(), 0);
    r.prompt_logprobs = Some(2);
    let out = run(&e, r);
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.completion_tokens, 0);
    assert!(out.text.is_empty() && out.logprobs.is_empty());
    assert_eq!(out.prompt_logprobs.len(), scored.len() - 1);
    let ids: Vec<u32> = out.prompt_logprobs.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, scored[1..]);
    let tail = &out.prompt_logprobs[out.prompt_logprobs.len() - 8..];
    for ((id, scored), (gid, gen)) in tail.iter().zip(&generated.logprobs) {
        assert_eq!(id, gid);
        assert!(
            (scored.logprob - gen.logprob).abs() < 0.05,
            "{scored:?} vs {gen:?}"
        );
        assert_eq!(scored.top[0].0, gen.top[0].0);
    }
}
