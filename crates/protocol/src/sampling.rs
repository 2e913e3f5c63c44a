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
mod tests;
