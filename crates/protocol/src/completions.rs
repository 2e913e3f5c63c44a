//! `/v1/completions` (legacy text completions): the request, its validation,
//! the response and the stream chunks.
//!
//! Invariants: a request that passes [`CompletionRequest::validate`] carries
//! exactly one non-empty prompt (text or token ids), sampling values in range,
//! and asks for no feature this server has not implemented yet.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::logprobs::CompletionLogprobs;
use crate::params::GenerationParams;
use crate::sampling::{
    check_model, check_stream_options, FinishReason, ResponseMeta, SamplingFields, SamplingRequest,
    Usage, UsageField,
};

/// Most alternatives `logprobs` may ask for on `/v1/completions`.
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// OpenAI's default `max_tokens` for text completions.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// The body of `POST /v1/completions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The fields shared with the other completions endpoint (flattened: they sit at the
    /// top level of the JSON body).
    #[serde(flatten)]
    pub params: GenerationParams,
    /// The prompt, as text or token ids.
    pub prompt: PromptInput,
    /// Echo the prompt before the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Return each generated token's log probability and this many alternatives (0 to 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Text that follows the completion (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Candidates to sample server-side; must be 1 for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
}

impl CompletionRequest {
    /// A request with the given model and prompt and every option unset.
    pub fn new(model: impl Into<String>, prompt: PromptInput) -> Self {
        Self {
            params: GenerationParams::new(model),
            prompt,
            ..Self::default()
        }
    }

    /// `echo` with `max_tokens: 0`: only the prompt comes back (with its log probabilities if
    /// asked for), nothing is generated.
    pub fn scores_only(&self) -> bool {
        self.echo == Some(true) && self.params.max_tokens == Some(0)
    }

    /// The token limit: `max_tokens`, or OpenAI's default of 16.
    pub fn max_new_tokens(&self) -> u32 {
        self.params
            .max_tokens
            .unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS)
    }

    /// The sampling knobs as sent, for validation and conversion.
    pub fn sampling_fields(&self) -> SamplingFields<'_> {
        // `max_tokens: 0` with `echo` scores the prompt without generating.
        let max_tokens = Some(self.max_new_tokens()).filter(|_| !self.scores_only());
        self.params.sampling_fields(max_tokens, "max_tokens")
    }

    /// Engine-facing sampling settings with defaults filled in
    /// (`max_tokens` is always set, 16 when absent).
    pub fn sampling(&self) -> SamplingRequest {
        self.sampling_fields().to_request()
    }

    /// Checks the request; the error names the offending parameter.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_model(&self.params.model)?;
        match self.prompt.len() {
            0 => return Err(empty_prompt()),
            1 => {}
            _ => return Err(ApiError::unsupported("multiple prompts", "prompt")),
        }
        if self.prompt.single().is_some_and(|p| p.is_empty()) {
            return Err(empty_prompt());
        }
        self.sampling_fields().validate()?;
        check_stream_options(self.params.stream, self.params.stream_options.as_ref())?;
        self.reject_unsupported()
    }

    /// Features OpenAI has and we do not yet; silently ignoring them would
    /// return answers the client did not ask for.
    fn reject_unsupported(&self) -> Result<(), ApiError> {
        if let Some(k) = self.logprobs {
            if k > MAX_COMPLETION_LOGPROBS {
                return Err(ApiError::invalid_request(
                    format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {k}"),
                    Some("logprobs"),
                ));
            }
        }
        self.params.output_constraint()?;
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix"));
        }
        if let Some(best_of) = self.best_of {
            if best_of == 0 {
                return Err(ApiError::invalid_request(
                    "best_of must be at least 1, got 0",
                    Some("best_of"),
                ));
            }
            if best_of > 1 {
                return Err(ApiError::unsupported("best_of > 1", "best_of"));
            }
        }
        Ok(())
    }
}

fn empty_prompt() -> ApiError {
    ApiError::invalid_request("prompt must not be empty", Some("prompt"))
}

/// The `prompt` parameter in any of its four OpenAI forms (the default is an empty text, which
/// validation rejects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// `"prompt": "Once upon"`
    Text(String),
    /// `"prompt": ["Once upon", "In a galaxy"]` (a batch of texts)
    Texts(Vec<String>),
    /// `"prompt": [1, 2, 3]` (one prompt as token ids)
    Tokens(Vec<u32>),
    /// `"prompt": [[1, 2], [3]]` (a batch of token-id prompts)
    TokenBatches(Vec<Vec<u32>>),
}

impl Default for PromptInput {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

impl PromptInput {
    /// How many prompts this is (an empty array counts zero).
    pub fn len(&self) -> usize {
        match self {
            Self::Text(_) | Self::Tokens(_) => 1,
            Self::Texts(v) => v.len(),
            Self::TokenBatches(v) => v.len(),
        }
    }

    /// True for an empty array (no prompts at all).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prompt, when there is exactly one.
    pub fn single(&self) -> Option<PromptRef<'_>> {
        match self {
            Self::Text(s) => Some(PromptRef::Text(s)),
            Self::Tokens(t) => Some(PromptRef::Tokens(t)),
            Self::Texts(v) => match v.as_slice() {
                [s] => Some(PromptRef::Text(s)),
                _ => None,
            },
            Self::TokenBatches(v) => match v.as_slice() {
                [t] => Some(PromptRef::Tokens(t)),
                _ => None,
            },
        }
    }
}

/// One prompt, borrowed from a [`PromptInput`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptRef<'a> {
    /// Text, still to be tokenized.
    Text(&'a str),
    /// Already tokenized.
    Tokens(&'a [u32]),
}

impl PromptRef<'_> {
    /// True for `""` or `[]`.
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Text(s) => s.is_empty(),
            Self::Tokens(t) => t.is_empty(),
        }
    }
}

/// One element of an array prompt, before the array's form is known.
enum PromptItem {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;

        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = PromptItem;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id, or an array of token ids")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                token_id(v).map(PromptItem::Token)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("token ids must be non-negative, got {v}")))
                    .and_then(token_id)
                    .map(PromptItem::Token)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut tokens = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(t) = seq.next_element::<u32>()? {
                    tokens.push(t);
                }
                Ok(PromptItem::Tokens(tokens))
            }
        }

        deserializer.deserialize_any(ItemVisitor)
    }
}

fn token_id<E: de::Error>(v: u64) -> Result<u32, E> {
    u32::try_from(v).map_err(|_| E::custom(format!("token id {v} is out of range")))
}

impl<'de> Deserialize<'de> for PromptInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PromptVisitor;

        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = PromptInput;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string, an array of strings, an array of token ids, \
                     or an array of arrays of token ids",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptInput::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(PromptInput::Text(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mixed = || de::Error::custom("prompt array elements must all be of one kind");
                // The first element decides the form; an empty array is an empty batch.
                let Some(first) = seq.next_element::<PromptItem>()? else {
                    return Ok(PromptInput::Texts(Vec::new()));
                };
                let mut out = match first {
                    PromptItem::Text(s) => PromptInput::Texts(vec![s]),
                    PromptItem::Token(t) => PromptInput::Tokens(vec![t]),
                    PromptItem::Tokens(t) => PromptInput::TokenBatches(vec![t]),
                };
                while let Some(item) = seq.next_element::<PromptItem>()? {
                    match (&mut out, item) {
                        (PromptInput::Texts(v), PromptItem::Text(s)) => v.push(s),
                        (PromptInput::Tokens(v), PromptItem::Token(t)) => v.push(t),
                        (PromptInput::TokenBatches(v), PromptItem::Tokens(t)) => v.push(t),
                        _ => return Err(mixed()),
                    }
                }
                Ok(out)
            }
        }

        deserializer.deserialize_any(PromptVisitor)
    }
}

/// The non-streaming answer to a completion request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// Response id, e.g. `cmpl-...`.
    pub id: String,
    /// Always `"text_completion"`.
    pub object: String,
    /// Unix timestamp (seconds).
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<CompletionChoice>,
    /// Token accounting.
    pub usage: Usage,
    /// Backend configuration fingerprint, omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

impl CompletionResponse {
    /// A response with one choice (index 0) holding `text`.
    pub fn new(
        meta: &ResponseMeta,
        text: impl Into<String>,
        finish_reason: FinishReason,
        usage: Usage,
    ) -> Self {
        let choice = CompletionChoice {
            text: text.into(),
            index: 0,
            logprobs: None,
            finish_reason,
        };
        Self::with_choices(meta, vec![choice], usage)
    }

    /// A response with these choices.
    pub fn with_choices(meta: &ResponseMeta, choices: Vec<CompletionChoice>, usage: Usage) -> Self {
        Self {
            id: meta.id.clone(),
            object: "text_completion".to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

/// One choice of a [`CompletionResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The generated text.
    pub text: String,
    /// Position among the choices.
    pub index: u32,
    /// Log probabilities of the generated tokens, when asked for.
    #[serde(default)]
    pub logprobs: Option<CompletionLogprobs>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// One server-sent event of a streamed text completion.
///
/// A stream is any number of [`Self::text`], then [`Self::finish`], then, if
/// usage was requested, [`Self::usage`] (empty `choices`). With usage requested
/// every other chunk carries `"usage": null`; see [`Self::with_usage_field`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    /// Same id on every chunk of the stream.
    pub id: String,
    /// Always `"text_completion"` (OpenAI uses the same name for chunks).
    pub object: String,
    /// Unix timestamp (seconds), same on every chunk.
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// Backend configuration fingerprint, omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Zero or one choices (zero only on the usage chunk).
    pub choices: Vec<CompletionChunkChoice>,
    /// Absent, null, or the final usage.
    #[serde(default, skip_serializing_if = "UsageField::is_omitted")]
    pub usage: UsageField,
}

impl CompletionChunk {
    fn with_choices(
        meta: &ResponseMeta,
        choices: Vec<CompletionChunkChoice>,
        usage: UsageField,
    ) -> Self {
        Self {
            id: meta.id.clone(),
            object: "text_completion".to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            system_fingerprint: None,
            choices,
            usage,
        }
    }

    /// A chunk carrying generated text.
    pub fn text(meta: &ResponseMeta, text: impl Into<String>) -> Self {
        let choice = CompletionChunkChoice {
            text: text.into(),
            index: 0,
            logprobs: None,
            finish_reason: None,
        };
        Self::with_choices(meta, vec![choice], UsageField::Omitted)
    }

    /// The chunk that ends the choice: empty text and a finish reason.
    pub fn finish(meta: &ResponseMeta, reason: FinishReason) -> Self {
        let choice = CompletionChunkChoice {
            text: String::new(),
            index: 0,
            logprobs: None,
            finish_reason: Some(reason),
        };
        Self::with_choices(meta, vec![choice], UsageField::Omitted)
    }

    /// The extra last chunk sent when usage was requested: no choices, usage filled in.
    pub fn usage(meta: &ResponseMeta, usage: Usage) -> Self {
        Self::with_choices(meta, Vec::new(), UsageField::Reported(usage))
    }

    /// The same chunk for choice `index` (chunks are built for choice 0).
    pub fn at(mut self, index: u32) -> Self {
        for c in &mut self.choices {
            c.index = index;
        }
        self
    }

    /// Attaches log probabilities to the chunk's choice.
    pub fn with_logprobs(mut self, logprobs: Option<CompletionLogprobs>) -> Self {
        if let Some(c) = self.choices.first_mut() {
            c.logprobs = logprobs;
        }
        self
    }

    /// With `include_usage`, turns an omitted `usage` into `"usage": null`;
    /// a reported usage is kept either way.
    pub fn with_usage_field(mut self, include_usage: bool) -> Self {
        if include_usage && self.usage.is_omitted() {
            self.usage = UsageField::Null;
        }
        self
    }
}

/// One choice of a [`CompletionChunk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunkChoice {
    /// Newly generated text.
    pub text: String,
    /// Position among the choices.
    pub index: u32,
    /// Log probabilities of the tokens in this chunk, when asked for.
    #[serde(default)]
    pub logprobs: Option<CompletionLogprobs>,
    /// Set on the chunk that ends the choice, null before.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::parse_json;
    use serde_json::{json, Value};

    fn parse(v: Value) -> CompletionRequest {
        serde_json::from_value(v).expect("request parses")
    }

    fn with(field: &str, value: Value) -> CompletionRequest {
        let mut v = json!({"model": "m", "prompt": "Once upon a time"});
        v[field] = value;
        parse(v)
    }

    fn rejected(req: &CompletionRequest) -> ApiError {
        let err = req.validate().expect_err("should be rejected");
        assert_eq!(err.status, 400, "{err:?}");
        err
    }

    #[test]
    fn prompt_forms() {
        let p = |v: Value| serde_json::from_value::<PromptInput>(v).expect("prompt parses");
        assert_eq!(p(json!("hi")), PromptInput::Text("hi".into()));
        assert_eq!(
            p(json!(["a", "b"])),
            PromptInput::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(p(json!([1, 2, 3])), PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(
            p(json!([[1, 2], [3]])),
            PromptInput::TokenBatches(vec![vec![1, 2], vec![3]])
        );
        assert_eq!(p(json!([])), PromptInput::Texts(vec![]));

        assert_eq!(p(json!("hi")).single(), Some(PromptRef::Text("hi")));
        assert_eq!(p(json!(["hi"])).single(), Some(PromptRef::Text("hi")));
        assert_eq!(p(json!([5, 6])).single(), Some(PromptRef::Tokens(&[5, 6])));
        assert_eq!(
            p(json!([[5, 6]])).single(),
            Some(PromptRef::Tokens(&[5, 6]))
        );
        assert_eq!(p(json!(["a", "b"])).single(), None);
        assert_eq!(p(json!([])).single(), None);
        assert!(p(json!([])).is_empty());

        for form in [
            json!("hi"),
            json!(["a", "b"]),
            json!([1, 2]),
            json!([[1], [2, 3]]),
        ] {
            let back = serde_json::to_value(p(form.clone())).expect("ser");
            assert_eq!(back, form);
        }
    }

    #[test]
    fn bad_prompts_are_parse_errors() {
        let p = |v: Value| serde_json::from_value::<PromptInput>(v).expect_err("should fail");
        assert!(p(json!(["a", 1])).to_string().contains("one kind"));
        assert!(p(json!([1, [2]])).to_string().contains("one kind"));
        assert!(p(json!([-1])).to_string().contains("non-negative"));
        assert!(p(json!([5_000_000_000u64]))
            .to_string()
            .contains("out of range"));
        assert!(p(json!(5)).to_string().contains("a string, an array"));
        assert!(p(json!([1.5])).to_string().contains("invalid type"));
        let err = parse_json::<CompletionRequest>(br#"{"model":"m","prompt":{"a":1}}"#)
            .expect_err("object prompt");
        assert!(err.message.starts_with("Invalid JSON body: "));
    }

    #[test]
    fn parses_a_real_openai_request() {
        let req = parse(json!({
            "model": "gpt-3.5-turbo-instruct",
            "prompt": "Say this is a test",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 1,
            "n": 1,
            "stream": false,
            "logprobs": null,
            "stop": ["\n", "###"],
            "echo": false,
            "suffix": null,
            "best_of": 1,
            "seed": 3,
            "frequency_penalty": 0.1,
            "unknown_field": [1, 2]
        }));
        assert!(req.validate().is_ok(), "{:?}", req.validate());
        assert_eq!(req.max_new_tokens(), 7);
        let s = req.sampling();
        assert_eq!(s.temperature, 0.0);
        assert_eq!(s.max_tokens, Some(7));
        assert_eq!(s.stop, vec!["\n".to_string(), "###".to_string()]);
        assert_eq!(s.seed, Some(3));
        assert_eq!(s.frequency_penalty, 0.1);
    }

    #[test]
    fn defaults() {
        let req = parse(json!({"model": "m", "prompt": [1, 2, 3]}));
        assert!(req.validate().is_ok());
        assert_eq!(req.max_new_tokens(), 16);
        assert_eq!(req.sampling().max_tokens, Some(16));
        assert!(!req.params.include_usage());
        assert_eq!(
            req,
            CompletionRequest::new("m", PromptInput::Tokens(vec![1, 2, 3]))
        );
        let back: CompletionRequest =
            serde_json::from_value(serde_json::to_value(&req).expect("ser")).expect("de");
        assert_eq!(back, req);
    }

    #[test]
    fn prompt_count_and_emptiness() {
        let err = rejected(&with("prompt", json!(["a", "b"])));
        assert_eq!(err.param.as_deref(), Some("prompt"));
        assert!(
            err.message.contains("multiple prompts") && err.message.contains("not supported yet")
        );
        let err = rejected(&with("prompt", json!([[1], [2]])));
        assert!(err.message.contains("multiple prompts"));
        for empty in [json!(""), json!([]), json!([""]), json!([[]])] {
            let err = rejected(&with("prompt", empty.clone()));
            assert_eq!(err.param.as_deref(), Some("prompt"), "{empty}");
            assert_eq!(err.message, "prompt must not be empty");
        }
        assert!(with("prompt", json!(["one"])).validate().is_ok());
        assert!(with("prompt", json!([[1, 2]])).validate().is_ok());
    }

    #[test]
    fn sampling_ranges_checked() {
        let err = rejected(&with("temperature", json!(2.5)));
        assert_eq!(err.message, "temperature must be between 0 and 2, got 2.5");
        let err = rejected(&with("max_tokens", json!(0)));
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        let err = rejected(&with("min_p", json!(-0.5)));
        assert_eq!(err.param.as_deref(), Some("min_p"));
        let err = rejected(&with("repetition_penalty", json!(0)));
        assert_eq!(err.param.as_deref(), Some("repetition_penalty"));
        let err = rejected(&with("stream_options", json!({"include_usage": true})));
        assert_eq!(err.param.as_deref(), Some("stream_options"));
    }

    #[test]
    fn unsupported_features_rejected() {
        let cases = [
            ("suffix", json!("The end."), "not supported yet"),
            ("best_of", json!(3), "not supported yet"),
            ("logprobs", json!(6), "between 0 and 5"),
            ("n", json!(17), "between 1 and 16"),
            ("logit_bias", json!({"x": 1}), "token ids"),
            ("guided_choice", json!([]), "at least one"),
        ];
        for (field, value, needle) in cases {
            let err = rejected(&with(field, value));
            assert_eq!(err.param.as_deref(), Some(field));
            assert!(err.message.contains(needle), "{}", err.message);
        }
        let mut both = with("echo", json!(true));
        both.logprobs = Some(1);
        both.params.max_tokens = Some(0);
        assert!(
            both.validate().is_ok(),
            "scoring a prompt: echo, logprobs, max_tokens 0"
        );
        assert!(both.scores_only());
        let err = rejected(&with("max_tokens", json!(0)));
        assert_eq!(err.param.as_deref(), Some("max_tokens"), "0 needs echo");
        let err = rejected(&with("best_of", json!(0)));
        assert_eq!(err.param.as_deref(), Some("best_of"));
        for (field, value) in [
            ("echo", json!(false)),
            ("echo", json!(true)),
            ("logprobs", json!(5)),
            ("n", json!(2)),
            ("logit_bias", json!({"50256": -100})),
            ("guided_regex", json!("a|b")),
            ("suffix", json!("")),
            ("best_of", json!(1)),
        ] {
            assert!(with(field, value).validate().is_ok(), "{field}");
        }
    }

    fn meta() -> ResponseMeta {
        ResponseMeta::new("cmpl-1", 42, "m")
    }

    #[test]
    fn response_wire_format() {
        let resp =
            CompletionResponse::new(&meta(), " test", FinishReason::Length, Usage::new(5, 7));
        let v = serde_json::to_value(&resp).expect("ser");
        assert_eq!(
            v,
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 42, "model": "m",
                "choices": [{"text": " test", "index": 0, "logprobs": null,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
            })
        );
        let back: CompletionResponse = serde_json::from_value(v).expect("de");
        assert_eq!(back, resp);
    }

    #[test]
    fn stream_chunks() {
        let m = meta();
        let v = serde_json::to_value(CompletionChunk::text(&m, "Once")).expect("ser");
        assert_eq!(
            v,
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 42, "model": "m",
                "choices": [{"text": "Once", "index": 0, "logprobs": null,
                             "finish_reason": null}]
            })
        );
        let v = serde_json::to_value(
            CompletionChunk::finish(&m, FinishReason::Stop).with_usage_field(true),
        )
        .expect("ser");
        assert_eq!(v["choices"][0]["finish_reason"], json!("stop"));
        assert_eq!(v["choices"][0]["text"], json!(""));
        assert!(v
            .as_object()
            .is_some_and(|o| o.get("usage") == Some(&Value::Null)));
        let last = CompletionChunk::usage(&m, Usage::new(1, 2)).with_usage_field(true);
        let v = serde_json::to_value(&last).expect("ser");
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"]["total_tokens"], json!(3));
        let back: CompletionChunk = serde_json::from_value(v).expect("de");
        assert_eq!(back, last);
    }
}
