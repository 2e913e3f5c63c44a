//! lastmile's fuzz targets: each takes arbitrary bytes and must neither panic nor hang, whatever
//! they hold. `fuzz/` runs them under libFuzzer (`cargo +nightly fuzz run <target>`), and this
//! crate's tests replay every input of the committed corpus (`fuzz/corpus/<target>/`), so what
//! a fuzzing run found stays fixed.
//!
//! | target | what the bytes are |
//! | --- | --- |
//! | `chat`, `completions`, `messages` | a request body, prepared as a worker prepares it (parsing, validation, tools, `response_format`/`guided_*` grammars, the chat template, tokenization, the context budget) and read by the gateway's quotas |
//! | `chat_template` | a chat template (a model file's, so hostile) rendered over fixed messages |
//! | `gguf` | a model file's header |
//! | `deployments` | a deployments YAML file |
#![warn(missing_docs)]

use std::sync::OnceLock;

use lastmile_engine::chat_template::ChatTemplate;
use lastmile_engine::gguf::GgufFile;
use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_models::ensure_default_model;
use lastmile_worker::fuzzing::Harness;

/// A fuzz target: bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// Every target, by name.
pub const TARGETS: [(&str, Target); 6] = [
    ("chat", chat),
    ("completions", completions),
    ("messages", messages),
    ("chat_template", chat_template),
    ("gguf", gguf),
    ("deployments", deployments),
];

/// The worker's request preparation over the default model (loaded once per process).
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let path = ensure_default_model().expect("fetching the default model");
        let loaded = LoadedModel::load(&path).expect("loading the default model");
        let engine = EngineHandle::start(
            loaded,
            EngineConfig {
                threads: 1,
                ..EngineConfig::default()
            },
        )
        .expect("starting the engine");
        Harness::new(engine, lastmile_models::DEFAULT_MODEL_ID)
    })
}

/// Prepares a request body to `path` as the worker does: `Err` holds the status it would answer.
pub fn prepare(path: &str, data: &[u8]) -> Result<(), u16> {
    harness().prepare(path, data)
}

/// Prepares a request body: any outcome but an internal error (a 500 for bad input) is fine.
fn request(path: &str, data: &[u8]) {
    if let Err(status) = prepare(path, data) {
        assert!(
            (400..500).contains(&status) || status == 503,
            "{path}: bad input answered {status}: {}",
            String::from_utf8_lossy(data)
        );
    }
}

/// A `/v1/chat/completions` body.
pub fn chat(data: &[u8]) {
    request("/v1/chat/completions", data);
}

/// A `/v1/completions` body.
pub fn completions(data: &[u8]) {
    request("/v1/completions", data);
}

/// A `/v1/messages` body (the first byte odd: a `/v1/messages/count_tokens` body).
pub fn messages(data: &[u8]) {
    match data.split_first() {
        Some((b, rest)) if b % 2 == 1 => request("/v1/messages/count_tokens", rest),
        Some((_, rest)) => request("/v1/messages", rest),
        None => {}
    }
}

/// A chat template's source, rendered over a conversation with a system prompt, a tool call
/// and its result.
pub fn chat_template(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    // As a model load does: a template that cannot render a short conversation in time is
    // refused there, and never meets a request.
    if ChatTemplate::vet(source, Some("<s>"), Some("</s>")).is_err() {
        return;
    }
    let Ok(t) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) else {
        return;
    };
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let _ = t.render_with_tools(&messages, Some(&tools), true);
}

/// A GGUF file's bytes.
pub fn gguf(data: &[u8]) {
    let _ = GgufFile::check_bytes(data);
}

/// A deployments file.
pub fn deployments(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = lastmile_control::deployments::Deployments::parse(text, "fuzz.yaml");
    }
}
