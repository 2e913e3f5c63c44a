//! Request and response pieces shared by chat and text completions.
//!
//! Owns stop sequences, stream options, usage accounting, finish reasons, the
//! id/created/model triple every response carries, and sampling-parameter
//! validation. Both request kinds describe their sampling knobs as a
//! [`SamplingFields`] view, so range checks and the conversion into the
//! engine-facing [`SamplingRequest`] exist exactly once.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most stop sequences one request may carry.
pub const MAX_STOP_SEQUENCES: usize = 16;

/// Longest stop sequence, in bytes (the engine holds back up to this much of a stream while a
/// stop sequence may be starting).
pub const MAX_STOP_BYTES: usize = 512;

/// Most `logit_bias` entries one request may carry (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// The `stop` parameter: one string or an array of strings.
///
/// Serializes back in the shape it was read in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopSequences {
    /// `"stop": "\n"`
    One(String),
    /// `"stop": ["\n", "###"]`
    Many(Vec<String>),
}

impl StopSequences {
    /// The sequences, whichever shape they were sent in.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }

    /// Checks count and that no sequence is empty (an empty one would match everywhere).
    pub fn validate(&self) -> Result<(), ApiError> {
        let seqs = self.as_slice();
        if seqs.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid_request(
                format!(
                    "stop must have at most {MAX_STOP_SEQUENCES} sequences, got {}",
                    seqs.len()
                ),
                Some("stop"),
            ));
        }
        if seqs.iter().any(String::is_empty) {
            return Err(ApiError::invalid_request(
                "stop sequences must not be empty strings",
                Some("stop"),
            ));
        }
        if let Some(long) = seqs.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid_request(
                format!(
                    "stop sequences must be at most {MAX_STOP_BYTES} bytes long, got one of {} \
                     bytes",
                    long.len()
                ),
                Some("stop"),
            ));
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for StopSequences {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StopVisitor;

        impl<'de> Visitor<'de> for StopVisitor {
            type Value = StopSequences;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StopSequences::One(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(StopSequences::One(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StopSequences::Many(out))
            }
        }

        deserializer.deserialize_any(StopVisitor)
    }
}

/// The `stream_options` parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with token usage (and `"usage": null` on every other chunk).
    #[serde(default)]
    pub include_usage: bool,
}

/// Token accounting for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt, after templating.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: u32,
}

impl Usage {
    /// Usage with `total_tokens` computed (saturating).
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }

    /// The same counts as the gateway meters them.
    pub fn metered(&self) -> crate::TokenUsage {
        crate::TokenUsage {
            input_tokens: self.prompt_tokens.into(),
            output_tokens: self.completion_tokens.into(),
        }
    }
}

/// The `usage` field of a streamed chunk, which OpenAI sends in three ways:
/// absent (usage not requested), `null` (requested, not the last chunk), or filled in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsageField {
    /// The field is left out of the JSON.
    #[default]
    Omitted,
    /// `"usage": null`.
    Null,
    /// `"usage": {...}` on the final chunk.
    Reported(Usage),
}

impl UsageField {
    /// True when the field is left out; used by `skip_serializing_if`.
    pub fn is_omitted(&self) -> bool {
        matches!(self, Self::Omitted)
    }

    /// The reported usage, if any.
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            Self::Reported(u) => Some(u),
            Self::Omitted | Self::Null => None,
        }
    }
}

impl Serialize for UsageField {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Reported(u) => u.serialize(serializer),
            Self::Omitted | Self::Null => serializer.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for UsageField {
    /// A present field is `Null` or `Reported`; pair with `#[serde(default)]`
    /// so that a missing field becomes `Omitted`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<Usage>::deserialize(deserializer)? {
            Some(u) => Self::Reported(u),
            None => Self::Null,
        })
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS token or a stop sequence.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The model called a tool.
    ToolCalls,
    /// Output was withheld by a content filter.
    ContentFilter,
}

/// The `id`, `created` and `model` every response and chunk of one request share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// Response id, e.g. `chatcmpl-...`; identical across the chunks of one stream.
    pub id: String,
    /// Unix timestamp (seconds) the request was accepted.
    pub created: u64,
    /// The model name echoed back to the client.
    pub model: String,
}

impl ResponseMeta {
    /// Bundles the three fields.
    pub fn new(id: impl Into<String>, created: u64, model: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            created,
            model: model.into(),
        }
    }
}

/// Sampling settings in the form the engine consumes, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingRequest {
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass; 1.0 disables.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: u32,
    /// Drop tokens below `min_p` times the top probability; 0 disables.
    pub min_p: f32,
    /// OpenAI presence penalty; 0 disables.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty; 0 disables.
    pub frequency_penalty: f32,
    /// Multiplicative repetition penalty; 1.0 disables.
    pub repetition_penalty: f32,
    /// RNG seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` means up to the context window.
    pub max_tokens: Option<u32>,
    /// Strings that end generation (not included in the output).
    pub stop: Vec<String>,
    /// Keep generating past the EOS token.
    pub ignore_eos: bool,
    /// Token id and bias added to its logit, in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Independent choices to generate (1 to [`MAX_CHOICES`]).
    pub n: u32,
    /// Speculative decoding as the request chose it (`None`: the server's default).
    pub speculative: Option<crate::speculative::SpeculativeParams>,
}

/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 16;

impl Default for SamplingRequest {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            logit_bias: Vec::new(),
            n: 1,
            speculative: None,
        }
    }
}

/// The sampling knobs of a request, borrowed, as sent (before defaults).
///
/// Built by `ChatCompletionRequest::sampling_fields` and
/// `CompletionRequest::sampling_fields`; validation and conversion live here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingFields<'a> {
    /// `temperature`, allowed in [0, 2].
    pub temperature: Option<f64>,
    /// `top_p`, allowed in (0, 1].
    pub top_p: Option<f64>,
    /// `top_k`: -1 or 0 disable, otherwise at least 1.
    pub top_k: Option<i64>,
    /// `min_p`, allowed in [0, 1].
    pub min_p: Option<f64>,
    /// `presence_penalty`, allowed in [-2, 2].
    pub presence_penalty: Option<f64>,
    /// `frequency_penalty`, allowed in [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// `repetition_penalty`, allowed in (0, 10].
    pub repetition_penalty: Option<f64>,
    /// `n`, 1 to [`MAX_CHOICES`].
    pub n: Option<u32>,
    /// `seed`.
    pub seed: Option<u64>,
    /// The effective token limit, at least 1.
    pub max_tokens: Option<u32>,
    /// Which parameter `max_tokens` came from, for error messages.
    pub max_tokens_param: &'a str,
    /// `stop`.
    pub stop: Option<&'a StopSequences>,
    /// `ignore_eos`.
    pub ignore_eos: bool,
    /// `logit_bias`: token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<&'a Map<String, Value>>,
    /// `speculative` (extension).
    pub speculative: Option<crate::speculative::SpeculativeParams>,
}

impl SamplingFields<'_> {
    /// Checks every field against its allowed range. Errors name the parameter,
    /// the allowed range and the value received; NaN and infinities are rejected.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_closed("temperature", self.temperature, 0.0, 2.0)?;
        check_positive_up_to("top_p", self.top_p, 1.0)?;
        check_closed("min_p", self.min_p, 0.0, 1.0)?;
        check_closed("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_closed("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        check_positive_up_to("repetition_penalty", self.repetition_penalty, 10.0)?;
        if let Some(spec) = &self.speculative {
            spec.validate()?;
        }
        if let Some(k) = self.top_k {
            if k < -1 {
                return Err(ApiError::invalid_request(
                    format!("top_k must be -1 or 0 (disabled) or at least 1, got {k}"),
                    Some("top_k"),
                ));
            }
        }
        if let Some(n) = self.n {
            if !(1..=MAX_CHOICES).contains(&n) {
                return Err(ApiError::invalid_request(
                    format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
                    Some("n"),
                ));
            }
        }
        self.parse_logit_bias()?;
        let param = if self.max_tokens_param.is_empty() {
            "max_tokens"
        } else {
            self.max_tokens_param
        };
        check_max_tokens(param, self.max_tokens)?;
        if let Some(stop) = self.stop {
            stop.validate()?;
        }
        Ok(())
    }

    /// The engine-facing settings, with OpenAI defaults for anything unset.
    pub fn to_request(&self) -> SamplingRequest {
        let defaults = SamplingRequest::default();
        let or = |v: Option<f64>, d: f32| v.map_or(d, |v| v as f32);
        SamplingRequest {
            temperature: or(self.temperature, defaults.temperature),
            top_p: or(self.top_p, defaults.top_p),
            // -1 and 0 both disable; huge values behave like "no limit" anyway.
            top_k: self
                .top_k
                .map_or(0, |k| u32::try_from(k.max(0)).unwrap_or(u32::MAX)),
            min_p: or(self.min_p, defaults.min_p),
            presence_penalty: or(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty: or(self.frequency_penalty, defaults.frequency_penalty),
            repetition_penalty: or(self.repetition_penalty, defaults.repetition_penalty),
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.map(|s| s.as_slice().to_vec()).unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            logit_bias: self.parse_logit_bias().unwrap_or_default(),
            n: self.n.unwrap_or(1),
            speculative: self.speculative,
        }
    }

    /// `logit_bias` as (token id, bias) pairs, sorted by id.
    fn parse_logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(map) = self.logit_bias else {
            return Ok(Vec::new());
        };
        if map.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid_request(
                format!(
                    "logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {}",
                    map.len()
                ),
                Some("logit_bias"),
            ));
        }
        let mut out = Vec::with_capacity(map.len());
        for (key, value) in map {
            let id: u32 = key.trim().parse().map_err(|_| {
                ApiError::invalid_request(
                    format!("logit_bias keys must be token ids, got {key:?}"),
                    Some("logit_bias"),
                )
            })?;
            let bias = value
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid_request(
                        format!(
                            "logit_bias values must be numbers between -100 and 100, got {value} \
                             for token {id}"
                        ),
                        Some("logit_bias"),
                    )
                })?;
            out.push((id, bias as f32));
        }
        out.sort_unstable_by_key(|p| p.0);
        Ok(out)
    }
}

/// Rejects an empty `model`.
pub(crate) fn check_model(model: &str) -> Result<(), ApiError> {
    if model.is_empty() {
        return Err(ApiError::invalid_request(
            "model must not be empty",
            Some("model"),
        ));
    }
    Ok(())
}

/// `stream_options` only makes sense with `stream: true`.
pub(crate) fn check_stream_options(
    stream: bool,
    stream_options: Option<&StreamOptions>,
) -> Result<(), ApiError> {
    if stream_options.is_some() && !stream {
        return Err(ApiError::invalid_request(
            "stream_options is only allowed when stream is true",
            Some("stream_options"),
        ));
    }
    Ok(())
}

/// Rejects a token limit of 0.
pub(crate) fn check_max_tokens(param: &str, value: Option<u32>) -> Result<(), ApiError> {
    match value {
        Some(0) => Err(ApiError::invalid_request(
            format!("{param} must be at least 1, got 0"),
            Some(param),
        )),
        _ => Ok(()),
    }
}

/// `value` must be finite and in `[lo, hi]`.
fn check_closed(param: &str, value: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match value {
        Some(v) if !(v.is_finite() && (lo..=hi).contains(&v)) => Err(ApiError::invalid_request(
            format!("{param} must be between {lo} and {hi}, got {v}"),
            Some(param),
        )),
        _ => Ok(()),
    }
}

/// `value` must be finite and in `(0, hi]`.
fn check_positive_up_to(param: &str, value: Option<f64>, hi: f64) -> Result<(), ApiError> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0 && v <= hi) => Err(ApiError::invalid_request(
            format!("{param} must be greater than 0 and at most {hi}, got {v}"),
            Some(param),
        )),
        _ => Ok(()),
    }
}

/// Deserializes a boolean flag that clients may also send as `null` (meaning false).
pub(crate) fn deserialize_flag<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(deserializer)?.unwrap_or(false))
}

/// Deserializes an optional `seed` from any JSON integer; negative values are
/// kept by their two's-complement bit pattern so every i64 and u64 seed is
/// accepted and distinct.
pub(crate) fn deserialize_seed<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    number
        .as_u64()
        .or_else(|| number.as_i64().map(|i| i as u64))
        .map(Some)
        .ok_or_else(|| de::Error::custom(format!("seed must be an integer, got {number}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> SamplingFields<'static> {
        SamplingFields {
            max_tokens_param: "max_tokens",
            ..SamplingFields::default()
        }
    }

    fn assert_rejects(f: SamplingFields<'_>, param: &str, needles: &[&str]) {
        let err = f.validate().expect_err("should be rejected");
        assert_eq!(err.status, 400);
        assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
        for needle in needles {
            assert!(
                err.message.contains(needle),
                "{:?} lacks {needle:?}",
                err.message
            );
        }
    }

    #[test]
    fn stop_from_string_and_array() {
        let one: StopSequences = serde_json::from_value(json!("\n")).expect("string");
        assert_eq!(one, StopSequences::One("\n".into()));
        assert_eq!(one.as_slice(), ["\n".to_string()]);
        let many: StopSequences = serde_json::from_value(json!(["a", "b"])).expect("array");
        assert_eq!(many.as_slice(), ["a".to_string(), "b".to_string()]);
        assert_eq!(serde_json::to_value(&one).expect("ser"), json!("\n"));
        assert_eq!(serde_json::to_value(&many).expect("ser"), json!(["a", "b"]));
        let err = serde_json::from_value::<StopSequences>(json!(3)).expect_err("number");
        assert!(
            err.to_string().contains("a string or an array of strings"),
            "{err}"
        );
        assert!(serde_json::from_value::<StopSequences>(json!([1])).is_err());
    }

    #[test]
    fn stop_limits() {
        let ok = StopSequences::Many(vec!["x".into(); MAX_STOP_SEQUENCES]);
        assert!(ok.validate().is_ok());
        let too_many = StopSequences::Many(vec!["x".into(); MAX_STOP_SEQUENCES + 1]);
        let err = too_many.validate().expect_err("17 stops");
        assert_eq!(err.param.as_deref(), Some("stop"));
        assert!(err.message.contains("at most 16") && err.message.contains("got 17"));
        let err = StopSequences::One(String::new())
            .validate()
            .expect_err("empty");
        assert_eq!(err.param.as_deref(), Some("stop"));
        assert!(StopSequences::One("x".repeat(MAX_STOP_BYTES))
            .validate()
            .is_ok());
        let err = StopSequences::Many(vec!["x".into(), "x".repeat(MAX_STOP_BYTES + 1)])
            .validate()
            .expect_err("too long");
        assert_eq!(err.param.as_deref(), Some("stop"));
        assert!(err.message.contains("at most 512 bytes"), "{}", err.message);
    }

    #[test]
    fn logit_bias_is_capped_at_300_entries() {
        let map = |n: usize| -> Map<String, Value> {
            (0..n).map(|i| (i.to_string(), Value::from(1))).collect()
        };
        let ok = map(MAX_LOGIT_BIAS);
        let fields = SamplingFields {
            logit_bias: Some(&ok),
            ..SamplingFields::default()
        };
        assert!(fields.validate().is_ok());
        let too_many = map(MAX_LOGIT_BIAS + 1);
        let fields = SamplingFields {
            logit_bias: Some(&too_many),
            ..SamplingFields::default()
        };
        let err = fields.validate().expect_err("301 entries");
        assert_eq!(err.param.as_deref(), Some("logit_bias"));
        assert!(err.message.contains("at most 300"), "{}", err.message);
    }

    #[test]
    fn usage_and_finish_reason_wire_format() {
        let u = Usage::new(3, 4);
        assert_eq!(
            serde_json::to_value(u).expect("ser"),
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
        let back: Usage = serde_json::from_value(json!(
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        ))
        .expect("de");
        assert_eq!(back, u);
        for (reason, text) in [
            (FinishReason::Stop, "stop"),
            (FinishReason::Length, "length"),
            (FinishReason::ToolCalls, "tool_calls"),
            (FinishReason::ContentFilter, "content_filter"),
        ] {
            assert_eq!(serde_json::to_value(reason).expect("ser"), json!(text));
            let back: FinishReason = serde_json::from_value(json!(text)).expect("de");
            assert_eq!(back, reason);
        }
    }

    #[test]
    fn stream_options_default() {
        let o: StreamOptions = serde_json::from_value(json!({})).expect("de");
        assert!(!o.include_usage);
        let o: StreamOptions = serde_json::from_value(json!({"include_usage": true})).expect("de");
        assert!(o.include_usage);
    }

    #[test]
    fn defaults_validate_and_convert() {
        let f = fields();
        assert!(f.validate().is_ok());
        assert_eq!(f.to_request(), SamplingRequest::default());
    }

    #[test]
    fn boundaries_accepted() {
        let stop = StopSequences::One("###".into());
        let f = SamplingFields {
            temperature: Some(0.0),
            top_p: Some(1.0),
            top_k: Some(-1),
            min_p: Some(1.0),
            presence_penalty: Some(-2.0),
            frequency_penalty: Some(2.0),
            repetition_penalty: Some(10.0),
            n: Some(1),
            seed: Some(7),
            max_tokens: Some(1),
            stop: Some(&stop),
            ignore_eos: true,
            ..fields()
        };
        assert!(f.validate().is_ok());
        let r = f.to_request();
        assert_eq!(r.temperature, 0.0);
        assert_eq!(r.top_k, 0);
        assert_eq!(r.repetition_penalty, 10.0);
        assert_eq!(r.seed, Some(7));
        assert_eq!(r.max_tokens, Some(1));
        assert_eq!(r.stop, vec!["###".to_string()]);
        assert!(r.ignore_eos);
        let big_k = SamplingFields {
            top_k: Some(i64::MAX),
            ..fields()
        };
        assert_eq!(big_k.to_request().top_k, u32::MAX);
        let k = SamplingFields {
            top_k: Some(40),
            ..fields()
        };
        assert_eq!(k.to_request().top_k, 40);
    }

    #[test]
    fn every_range_error_names_param_range_and_value() {
        assert_rejects(
            SamplingFields {
                temperature: Some(3.5),
                ..fields()
            },
            "temperature",
            &["temperature must be between 0 and 2, got 3.5"],
        );
        assert_rejects(
            SamplingFields {
                temperature: Some(-0.1),
                ..fields()
            },
            "temperature",
            &["got -0.1"],
        );
        assert_rejects(
            SamplingFields {
                top_p: Some(0.0),
                ..fields()
            },
            "top_p",
            &["top_p must be greater than 0 and at most 1, got 0"],
        );
        assert_rejects(
            SamplingFields {
                top_p: Some(1.5),
                ..fields()
            },
            "top_p",
            &["got 1.5"],
        );
        assert_rejects(
            SamplingFields {
                top_k: Some(-2),
                ..fields()
            },
            "top_k",
            &["top_k", "-1", "at least 1", "got -2"],
        );
        assert_rejects(
            SamplingFields {
                min_p: Some(1.01),
                ..fields()
            },
            "min_p",
            &["min_p must be between 0 and 1, got 1.01"],
        );
        assert_rejects(
            SamplingFields {
                presence_penalty: Some(-2.5),
                ..fields()
            },
            "presence_penalty",
            &["between -2 and 2, got -2.5"],
        );
        assert_rejects(
            SamplingFields {
                frequency_penalty: Some(2.1),
                ..fields()
            },
            "frequency_penalty",
            &["between -2 and 2, got 2.1"],
        );
        assert_rejects(
            SamplingFields {
                repetition_penalty: Some(0.0),
                ..fields()
            },
            "repetition_penalty",
            &["greater than 0 and at most 10, got 0"],
        );
        assert_rejects(
            SamplingFields {
                repetition_penalty: Some(11.0),
                ..fields()
            },
            "repetition_penalty",
            &["got 11"],
        );
        assert_rejects(
            SamplingFields {
                max_tokens: Some(0),
                ..fields()
            },
            "max_tokens",
            &["max_tokens must be at least 1, got 0"],
        );
        assert_rejects(
            SamplingFields {
                max_tokens: Some(0),
                max_tokens_param: "max_completion_tokens",
                ..fields()
            },
            "max_completion_tokens",
            &["max_completion_tokens must be at least 1"],
        );
        assert_rejects(
            SamplingFields {
                n: Some(0),
                ..fields()
            },
            "n",
            &["n must be between 1 and 16, got 0"],
        );
        assert_rejects(
            SamplingFields {
                n: Some(17),
                ..fields()
            },
            "n",
            &["between 1 and 16", "17"],
        );
        for (bias, needle) in [
            (json!({"abc": 1}), "token ids"),
            (json!({"5": 101}), "between -100 and 100"),
            (json!({"5": "x"}), "between -100 and 100"),
        ] {
            let map = bias.as_object().cloned().expect("object");
            assert_rejects(
                SamplingFields {
                    logit_bias: Some(&map),
                    ..fields()
                },
                "logit_bias",
                &[needle],
            );
        }
    }

    #[test]
    fn logit_bias_and_n_convert() {
        let map = json!({"7": -100, " 3": 2.5})
            .as_object()
            .cloned()
            .expect("object");
        let req = SamplingFields {
            logit_bias: Some(&map),
            n: Some(3),
            ..fields()
        }
        .to_request();
        assert_eq!(req.logit_bias, vec![(3, 2.5), (7, -100.0)]);
        assert_eq!(req.n, 3);
    }

    #[test]
    fn non_finite_values_rejected() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_rejects(
                SamplingFields {
                    temperature: Some(bad),
                    ..fields()
                },
                "temperature",
                &[],
            );
            assert_rejects(
                SamplingFields {
                    top_p: Some(bad),
                    ..fields()
                },
                "top_p",
                &[],
            );
            assert_rejects(
                SamplingFields {
                    repetition_penalty: Some(bad),
                    ..fields()
                },
                "repetition_penalty",
                &[],
            );
        }
    }

    #[derive(Deserialize)]
    struct SeedHolder {
        #[serde(default, deserialize_with = "deserialize_seed")]
        seed: Option<u64>,
    }

    #[test]
    fn seed_accepts_any_integer() {
        let parse = |v: serde_json::Value| serde_json::from_value::<SeedHolder>(v).map(|h| h.seed);
        assert_eq!(parse(json!({})).expect("absent"), None);
        assert_eq!(parse(json!({"seed": null})).expect("null"), None);
        assert_eq!(parse(json!({"seed": 42})).expect("pos"), Some(42));
        assert_eq!(
            parse(json!({"seed": u64::MAX})).expect("u64"),
            Some(u64::MAX)
        );
        assert_eq!(parse(json!({"seed": -1})).expect("neg"), Some(u64::MAX));
        assert!(parse(json!({"seed": 1.5})).is_err());
        assert!(parse(json!({"seed": "7"})).is_err());
    }

    #[test]
    fn usage_field_three_states() {
        #[derive(Serialize, Deserialize)]
        struct Holder {
            #[serde(default, skip_serializing_if = "UsageField::is_omitted")]
            usage: UsageField,
        }
        let ser = |u| serde_json::to_value(Holder { usage: u }).expect("ser");
        assert_eq!(ser(UsageField::Omitted), json!({}));
        assert_eq!(ser(UsageField::Null), json!({"usage": null}));
        assert_eq!(
            ser(UsageField::Reported(Usage::new(1, 2)))["usage"]["total_tokens"],
            json!(3)
        );
        let de = |v| serde_json::from_value::<Holder>(v).expect("de").usage;
        assert_eq!(de(json!({})), UsageField::Omitted);
        assert_eq!(de(json!({"usage": null})), UsageField::Null);
        assert_eq!(
            de(json!({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})),
            UsageField::Reported(Usage::new(1, 2))
        );
        assert_eq!(
            UsageField::Reported(Usage::new(1, 2)).usage(),
            Some(&Usage::new(1, 2))
        );
        assert_eq!(UsageField::Null.usage(), None);
    }
}
