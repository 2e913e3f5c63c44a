//! The fields `/v1/chat/completions` and `/v1/completions` share: the model, the token limit,
//! sampling, streaming and output constraints. Each request flattens one [`GenerationParams`],
//! so a field, its wire name, its documentation and its checks exist once.
//!
//! Invariant: every field here means the same on both endpoints; a field whose meaning differs
//! (`logprobs` is a flag on chat and a count on completions) stays on its request.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::sampling::{deserialize_flag, deserialize_seed, SamplingFields, StopSequences};
use crate::sampling::{SamplingRequest, StreamOptions};
use crate::speculative::SpeculativeParams;
use crate::structured::{ConstraintFields, OutputConstraint};
use crate::ApiError;

/// Request fields shared by chat and text completions (flattened into both on the wire).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// Model to run.
    pub model: String,
    /// Token limit (chat: the legacy one, `max_completion_tokens` wins when both are set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature in [0, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Extension: top-k cutoff; -1 or 0 disable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Extension: min-p cutoff in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    /// Number of independent choices, 1 to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default, deserialize_with = "deserialize_flag")]
    pub stream: bool,
    /// Streaming options; only allowed with `stream: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    /// Seed for reproducible sampling; any i64 or u64 is accepted.
    #[serde(
        default,
        deserialize_with = "deserialize_seed",
        skip_serializing_if = "Option::is_none"
    )]
    pub seed: Option<u64>,
    /// Presence penalty in [-2, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty in [-2, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Extension: multiplicative repetition penalty in (0, 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Extension: keep generating past EOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// Token-id → bias map, biases in [-100, 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    /// End-user identifier; recorded, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Output format: `text`, `json_object` or `json_schema`, enforced by constrained decoding
    /// (on completions an extension, as in vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Extension (vLLM): JSON Schema the output must follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_json: Option<Value>,
    /// Extension (vLLM): regular expression the output must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_regex: Option<String>,
    /// Extension (vLLM): the output is exactly one of these strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_choice: Option<Vec<String>>,
    /// Extension: a Lark grammar the output must follow (llguidance's dialect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_grammar: Option<String>,
    /// Extension: prompt-lookup speculative decoding for this request (see
    /// [`SpeculativeParams`]); absent: the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeParams>,
}

impl GenerationParams {
    /// Parameters naming `model`, every option unset.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            ..Self::default()
        }
    }

    /// Whether the stream should carry `usage` (null, then a final usage chunk).
    pub fn include_usage(&self) -> bool {
        self.stream && self.stream_options.is_some_and(|o| o.include_usage)
    }

    /// The sampling knobs as sent, with the token limit `max_tokens` that the request resolved
    /// (and the parameter it came from, for error messages).
    pub fn sampling_fields<'a>(
        &'a self,
        max_tokens: Option<u32>,
        max_tokens_param: &'a str,
    ) -> SamplingFields<'a> {
        SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            n: self.n,
            seed: self.seed,
            max_tokens,
            max_tokens_param,
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logit_bias: self.logit_bias.as_ref(),
            speculative: self.speculative,
        }
    }

    /// Engine-facing sampling settings for the resolved token limit.
    pub fn sampling(&self, max_tokens: Option<u32>) -> SamplingRequest {
        self.sampling_fields(max_tokens, "max_tokens").to_request()
    }

    /// The constraint fields as sent.
    pub fn constraint_fields(&self) -> ConstraintFields<'_> {
        ConstraintFields {
            response_format: self.response_format.as_ref(),
            guided_json: self.guided_json.as_ref(),
            guided_regex: self.guided_regex.as_deref(),
            guided_choice: self.guided_choice.as_deref(),
            guided_grammar: self.guided_grammar.as_deref(),
        }
    }

    /// The output constraint from `response_format` or a `guided_*` field, if any.
    pub fn output_constraint(&self) -> Result<Option<OutputConstraint>, ApiError> {
        self.constraint_fields().parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatCompletionRequest, CompletionRequest};
    use serde_json::json;

    /// Every shared field, set to a value that is not its default.
    fn every_shared_field() -> Value {
        json!({
            "model": "m", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
            "min_p": 0.1, "n": 2, "stream": true, "stream_options": {"include_usage": true},
            "stop": ["\n"], "seed": -1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "repetition_penalty": 1.1, "ignore_eos": true, "logit_bias": {"5": 1},
            "user": "u", "response_format": {"type": "json_object"},
            "guided_json": {"type": "object"}, "guided_regex": "a+",
            "guided_choice": ["a"], "guided_grammar": "start: \"a\"",
            "speculative": {"ngram": 2, "max_draft": 4}
        })
    }

    #[test]
    fn both_requests_read_the_shared_fields_alike() {
        let mut chat = every_shared_field();
        chat["messages"] = json!([{"role": "user", "content": "hi"}]);
        let mut text = every_shared_field();
        text["prompt"] = json!("hi");
        let chat: ChatCompletionRequest = serde_json::from_value(chat).expect("chat");
        let text: CompletionRequest = serde_json::from_value(text).expect("completion");
        assert_eq!(chat.params, text.params);
        let direct: GenerationParams =
            serde_json::from_value(every_shared_field()).expect("params");
        assert_eq!(chat.params, direct);
        assert_eq!(
            direct.seed,
            Some(u64::MAX),
            "negative seeds keep their bits"
        );
        assert_ne!(direct, GenerationParams::new("m"), "every field was read");
    }

    #[test]
    fn a_round_trip_keeps_every_field_at_the_top_level() {
        let mut text = every_shared_field();
        text["prompt"] = json!("hi");
        let parsed: CompletionRequest = serde_json::from_value(text.clone()).expect("parse");
        let written = serde_json::to_value(&parsed).expect("write");
        assert_eq!(written["temperature"], json!(0.5));
        assert!(written.get("params").is_none(), "flattened on the wire");
        let again: CompletionRequest = serde_json::from_value(written).expect("reparse");
        assert_eq!(again, parsed);
    }

    #[test]
    fn speculative_takes_defaults_ranges_and_no_unknown_key() {
        let read = |v: Value| serde_json::from_value::<GenerationParams>(v);
        let p = read(json!({"model": "m", "speculative": {}})).expect("defaults");
        assert_eq!(
            p.speculative,
            Some(SpeculativeParams {
                method: None,
                ngram: 3,
                max_draft: 8
            })
        );
        let p = read(json!({"model": "m", "speculative": {"method": "draft_model"}}))
            .expect("a method");
        assert_eq!(
            p.speculative.and_then(|s| s.method),
            Some(crate::speculative::SpeculativeMethod::DraftModel)
        );
        let err = read(json!({"model": "m", "speculative": {"method": "medusa"}}))
            .expect_err("an unknown method");
        assert!(err.to_string().contains("medusa"), "{err}");
        let p = read(json!({"model": "m", "speculative": {"max_draft": 0}})).expect("off");
        assert!(p
            .sampling(None)
            .speculative
            .is_some_and(|s| s.max_draft == 0));
        for bad in [
            json!({"ngram": 0}),
            json!({"ngram": 9}),
            json!({"max_draft": 17}),
        ] {
            let p = read(json!({"model": "m", "speculative": bad})).expect("parses");
            let err = p
                .sampling_fields(None, "max_tokens")
                .validate()
                .expect_err("range");
            assert_eq!(err.param.as_deref(), Some("speculative"), "{bad}");
        }
        let err = read(json!({"model": "m", "speculative": {"ngrams": 2}})).expect_err("typo");
        assert!(err.to_string().contains("ngrams"), "{err}");
    }

    #[test]
    fn a_wrongly_typed_shared_field_is_an_error() {
        let err = serde_json::from_value::<CompletionRequest>(
            json!({"model": "m", "prompt": "hi", "temperature": "hot"}),
        )
        .expect_err("a string temperature");
        assert!(err.to_string().contains("invalid type"), "{err}");
        let err = serde_json::from_value::<ChatCompletionRequest>(json!({"messages": []}))
            .expect_err("no model");
        assert!(err.to_string().contains("model"), "{err}");
    }
}
