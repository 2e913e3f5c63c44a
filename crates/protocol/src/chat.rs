//! `/v1/chat/completions`: the request, its validation, the response and the stream chunks.
//!
//! Invariants: a request that passes [`ChatCompletionRequest::validate`] has at
//! least one message, only text content, sampling values in range, and asks for
//! no feature this server has not implemented yet. Unknown request fields are
//! ignored, as OpenAI does.

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::sampling::{
    check_max_tokens, deserialize_seed, FinishReason, ResponseMeta, SamplingFields,
    SamplingRequest, StopSequences, StreamOptions, Usage, UsageField,
};

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model to run.
    pub model: String,
    /// The conversation so far; must not be empty.
    pub messages: Vec<ChatMessage>,
    /// Legacy token limit; [`Self::max_completion_tokens`] wins when both are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Token limit for the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
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
    /// Number of choices; only 1 for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
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
    /// Return log probabilities (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Number of alternatives per position with `logprobs` (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Token-id → bias map (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    /// End-user identifier; recorded, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Tool definitions (not supported yet when non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// Tool choice; meaningless without tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Allow parallel tool calls; meaningless without tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Output format; only `{"type": "text"}` for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
}

impl ChatCompletionRequest {
    /// A request with the given model and messages and every option unset.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: model.into(),
            messages,
            max_tokens: None,
            max_completion_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            n: None,
            stream: false,
            stream_options: None,
            stop: None,
            seed: None,
            presence_penalty: None,
            frequency_penalty: None,
            repetition_penalty: None,
            ignore_eos: None,
            logprobs: None,
            top_logprobs: None,
            logit_bias: None,
            user: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
        }
    }

    /// The token limit: `max_completion_tokens`, else `max_tokens`, else none
    /// (generate up to the context window).
    pub fn max_new_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether the stream should carry `usage` (null, then a final usage chunk).
    pub fn include_usage(&self) -> bool {
        self.stream && self.stream_options.is_some_and(|o| o.include_usage)
    }

    /// The sampling knobs as sent, for validation and conversion.
    pub fn sampling_fields(&self) -> SamplingFields<'_> {
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
            max_tokens: self.max_new_tokens(),
            max_tokens_param: if self.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        }
    }

    /// Engine-facing sampling settings with defaults filled in.
    pub fn sampling(&self) -> SamplingRequest {
        self.sampling_fields().to_request()
    }

    /// Checks the request; the error names the offending parameter.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.model.is_empty() {
            return Err(ApiError::invalid_request(
                "model must not be empty",
                Some("model"),
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid_request(
                "messages must contain at least one message",
                Some("messages"),
            ));
        }
        for (i, message) in self.messages.iter().enumerate() {
            message.validate(i)?;
        }
        // Both limits are checked, not just the one that wins.
        check_max_tokens("max_tokens", self.max_tokens)?;
        self.sampling_fields().validate()?;
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid_request(
                "stream_options is only allowed when stream is true",
                Some("stream_options"),
            ));
        }
        self.reject_unsupported()
    }

    /// Features OpenAI has and we do not yet; silently ignoring them would
    /// return answers the client did not ask for.
    fn reject_unsupported(&self) -> Result<(), ApiError> {
        if self.logprobs == Some(true) {
            return Err(ApiError::unsupported("logprobs", "logprobs"));
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::unsupported("top_logprobs", "top_logprobs"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::unsupported("tools", "tools"));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::unsupported("logit_bias", "logit_bias"));
        }
        if let Some(format) = &self.response_format {
            match format.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some(kind) => {
                    return Err(ApiError::unsupported(
                        &format!("response_format: {kind}"),
                        "response_format",
                    ))
                }
                None => {
                    return Err(ApiError::invalid_request(
                        "response_format must be an object with a string `type`",
                        Some("response_format"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// Developer instructions (the newer name for system).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
}

impl Role {
    /// The wire name, e.g. `"user"`; also what chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Developer => "developer",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Author of the message.
    pub role: Role,
    /// The text; may be null for an assistant message that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by an assistant message, kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// For `tool` messages: which call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(MessageContent::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// The text content, with parts joined; empty when there is no content.
    pub fn text(&self) -> String {
        self.content
            .as_ref()
            .map(MessageContent::text)
            .unwrap_or_default()
    }

    fn validate(&self, index: usize) -> Result<(), ApiError> {
        let param = format!("messages[{index}].content");
        match &self.content {
            None if self.role != Role::Assistant => Err(ApiError::invalid_request(
                format!("{param} is required for role `{}`", self.role.as_str()),
                Some(&param),
            )),
            None | Some(MessageContent::Text(_)) => Ok(()),
            Some(MessageContent::Parts(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    if let ContentPart::Other(value) = part {
                        let kind = value
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown");
                        return Err(ApiError::invalid_request(
                            format!(
                                "only text content parts are supported, got `{kind}` in \
                                 {param}[{j}]"
                            ),
                            Some(&param),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Message content: a string, or an array of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// `"content": "hello"`
    Text(String),
    /// `"content": [{"type": "text", "text": "hello"}, ...]`
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text, with text parts joined by newlines; non-text parts are skipped.
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text(t) => Some(t.as_str()),
                    ContentPart::Other(_) => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| ContentPart::from_value(v).map_err(de::Error::custom))
                .collect::<Result<_, _>>()
                .map(Self::Parts),
            other => Err(de::Error::custom(format!(
                "message content must be a string or an array of content parts, got {other}"
            ))),
        }
    }
}

/// One element of array-form message content.
///
/// Non-text parts (images, audio, files) are kept so that validation can
/// reject them with a clear message rather than a parse error.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`
    Text(String),
    /// Any other part, as sent.
    Other(Value),
}

impl ContentPart {
    fn from_value(value: Value) -> Result<Self, String> {
        if value.get("type").and_then(Value::as_str) != Some("text") {
            return Ok(Self::Other(value));
        }
        match value.get("text") {
            Some(Value::String(s)) => Ok(Self::Text(s.clone())),
            _ => Err("a content part of type `text` needs a string `text` field".to_owned()),
        }
    }
}

impl Serialize for ContentPart {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Text(text) => {
                serde_json::json!({"type": "text", "text": text}).serialize(serializer)
            }
            Self::Other(value) => value.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::from_value(Value::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

/// The non-streaming answer to a chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// Response id, e.g. `chatcmpl-...`.
    pub id: String,
    /// Always `"chat.completion"`.
    pub object: String,
    /// Unix timestamp (seconds).
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    pub usage: Usage,
    /// Backend configuration fingerprint, omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

impl ChatCompletionResponse {
    /// A response with one choice (index 0) holding `content`.
    pub fn new(
        meta: &ResponseMeta,
        content: impl Into<String>,
        finish_reason: FinishReason,
        usage: Usage,
    ) -> Self {
        Self {
            id: meta.id.clone(),
            object: "chat.completion".to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage::new(content),
                logprobs: None,
                finish_reason,
            }],
            usage,
            system_fingerprint: None,
        }
    }
}

/// One choice of a [`ChatCompletionResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Position among the choices.
    pub index: u32,
    /// The generated message.
    pub message: AssistantMessage,
    /// Always null until logprobs are supported.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// The message the model produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always [`Role::Assistant`].
    pub role: Role,
    /// The generated text.
    pub content: Option<String>,
}

impl AssistantMessage {
    /// An assistant message with the given text.
    pub fn new(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: Some(content.into()),
        }
    }
}

/// One server-sent event of a streamed chat completion.
///
/// A stream is: [`Self::role`], any number of [`Self::content`], [`Self::finish`],
/// then, if usage was requested, [`Self::usage`] (empty `choices`). With usage
/// requested every other chunk carries `"usage": null`; see [`Self::with_usage_field`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of the stream.
    pub id: String,
    /// Always `"chat.completion.chunk"`.
    pub object: String,
    /// Unix timestamp (seconds), same on every chunk.
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// Backend configuration fingerprint, omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Zero or one choice deltas (zero only on the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Absent, null, or the final usage.
    #[serde(default, skip_serializing_if = "UsageField::is_omitted")]
    pub usage: UsageField,
}

impl ChatCompletionChunk {
    fn with_choice(meta: &ResponseMeta, delta: Delta, finish_reason: Option<FinishReason>) -> Self {
        Self {
            id: meta.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: UsageField::Omitted,
        }
    }

    /// The first chunk: `{"role": "assistant", "content": ""}`.
    pub fn role(meta: &ResponseMeta) -> Self {
        let delta = Delta {
            role: Some(Role::Assistant),
            content: Some(String::new()),
        };
        Self::with_choice(meta, delta, None)
    }

    /// A chunk carrying generated text.
    pub fn content(meta: &ResponseMeta, text: impl Into<String>) -> Self {
        let delta = Delta {
            role: None,
            content: Some(text.into()),
        };
        Self::with_choice(meta, delta, None)
    }

    /// The chunk that ends the choice: empty delta and a finish reason.
    pub fn finish(meta: &ResponseMeta, reason: FinishReason) -> Self {
        Self::with_choice(meta, Delta::default(), Some(reason))
    }

    /// The extra last chunk sent when usage was requested: no choices, usage filled in.
    pub fn usage(meta: &ResponseMeta, usage: Usage) -> Self {
        Self {
            id: meta.id.clone(),
            object: "chat.completion.chunk".to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            system_fingerprint: None,
            choices: Vec::new(),
            usage: UsageField::Reported(usage),
        }
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

/// One choice's change in a [`ChatCompletionChunk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Position among the choices.
    pub index: u32,
    /// What was added.
    pub delta: Delta,
    /// Always null until logprobs are supported.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Set on the chunk that ends the choice, null before.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The new part of the assistant message; unset fields are left out of the JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Set on the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Newly generated text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::parse_json;
    use serde_json::json;

    fn parse(v: Value) -> ChatCompletionRequest {
        serde_json::from_value(v).expect("request parses")
    }

    fn minimal() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(field: &str, value: Value) -> ChatCompletionRequest {
        let mut v = minimal();
        v[field] = value;
        parse(v)
    }

    fn rejected(req: &ChatCompletionRequest) -> ApiError {
        let err = req.validate().expect_err("should be rejected");
        assert_eq!(err.status, 400, "{err:?}");
        err
    }

    #[test]
    fn parses_a_real_openai_request() {
        let req = parse(json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "text", "text": "2+2?"}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "add", "arguments": "{}"}}
                ]},
                {"role": "tool", "content": "4", "tool_call_id": "call_1"},
                {"role": "user", "content": "thanks", "name": "bob"}
            ],
            "max_tokens": 100,
            "temperature": 0.7,
            "top_p": 0.9,
            "stream": true,
            "stream_options": {"include_usage": true},
            "stop": "\n\n",
            "seed": 1234,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "user": "u-1",
            "tool_choice": "none",
            "parallel_tool_calls": false,
            "response_format": {"type": "text"},
            "logprobs": false,
            "store": false,
            "metadata": {"unknown": "fields are ignored"}
        }));
        assert!(req.validate().is_ok(), "{:?}", req.validate());
        assert_eq!(req.messages.len(), 6);
        assert_eq!(req.messages[1].role, Role::Developer);
        assert_eq!(req.messages[2].text(), "What is\n2+2?");
        assert_eq!(req.messages[3].content, None);
        assert_eq!(req.messages[4].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(req.messages[5].name.as_deref(), Some("bob"));
        assert!(req.include_usage());
        assert_eq!(req.max_new_tokens(), Some(100));
        let s = req.sampling();
        assert_eq!(s.temperature, 0.7);
        assert_eq!(s.top_p, 0.9);
        assert_eq!(s.stop, vec!["\n\n".to_string()]);
        assert_eq!(s.seed, Some(1234));
        assert_eq!(s.max_tokens, Some(100));
    }

    #[test]
    fn minimal_request_defaults() {
        let req = parse(minimal());
        assert!(req.validate().is_ok());
        assert!(!req.stream);
        assert!(!req.include_usage());
        assert_eq!(req.max_new_tokens(), None);
        assert_eq!(req.sampling(), SamplingRequest::default());
        assert_eq!(
            req,
            ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "hi")])
        );
    }

    #[test]
    fn request_round_trips() {
        let req = with("stop", json!(["a", "b"]));
        let back: ChatCompletionRequest =
            serde_json::from_value(serde_json::to_value(&req).expect("ser")).expect("de");
        assert_eq!(back, req);
        assert_eq!(back.sampling().stop, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn extensions_parse() {
        let mut v = minimal();
        v["top_k"] = json!(-1);
        v["min_p"] = json!(0.05);
        v["repetition_penalty"] = json!(1.1);
        v["ignore_eos"] = json!(true);
        v["seed"] = json!(-7);
        let req = parse(v);
        assert!(req.validate().is_ok());
        let s = req.sampling();
        assert_eq!(s.top_k, 0);
        assert_eq!(s.min_p, 0.05);
        assert_eq!(s.repetition_penalty, 1.1);
        assert!(s.ignore_eos);
        assert_eq!(s.seed, Some((-7i64) as u64));
    }

    #[test]
    fn max_completion_tokens_wins() {
        let mut v = minimal();
        v["max_tokens"] = json!(10);
        v["max_completion_tokens"] = json!(20);
        let req = parse(v);
        assert_eq!(req.max_new_tokens(), Some(20));
        assert_eq!(req.sampling().max_tokens, Some(20));

        let err = rejected(&with("max_completion_tokens", json!(0)));
        assert_eq!(err.param.as_deref(), Some("max_completion_tokens"));
        let err = rejected(&with("max_tokens", json!(0)));
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        assert_eq!(err.message, "max_tokens must be at least 1, got 0");
        let mut v = minimal();
        v["max_tokens"] = json!(0);
        v["max_completion_tokens"] = json!(5);
        let err = rejected(&parse(v));
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn sampling_ranges_checked() {
        let err = rejected(&with("temperature", json!(3.5)));
        assert_eq!(err.param.as_deref(), Some("temperature"));
        assert_eq!(err.message, "temperature must be between 0 and 2, got 3.5");
        let err = rejected(&with("top_p", json!(0)));
        assert_eq!(err.param.as_deref(), Some("top_p"));
        let err = rejected(&with("top_k", json!(-3)));
        assert_eq!(err.param.as_deref(), Some("top_k"));
        let err = rejected(&with("presence_penalty", json!(9)));
        assert_eq!(err.param.as_deref(), Some("presence_penalty"));
        let err = rejected(&with("stop", json!(vec!["x"; 17])));
        assert_eq!(err.param.as_deref(), Some("stop"));
    }

    #[test]
    fn empty_messages_rejected() {
        let err = rejected(&with("messages", json!([])));
        assert_eq!(err.param.as_deref(), Some("messages"));
        assert!(err.message.contains("at least one message"));
    }

    #[test]
    fn empty_model_rejected() {
        let err = rejected(&with("model", json!("")));
        assert_eq!(err.param.as_deref(), Some("model"));
    }

    #[test]
    fn missing_content_rejected_except_for_assistant() {
        let err = rejected(&with("messages", json!([{"role": "user"}])));
        assert_eq!(err.param.as_deref(), Some("messages[0].content"));
        assert!(
            err.message.contains("required for role `user`"),
            "{}",
            err.message
        );
        let req = with(
            "messages",
            json!([{"role": "user", "content": "x"}, {"role": "assistant"}]),
        );
        assert!(req.validate().is_ok());
    }

    #[test]
    fn image_parts_rejected_clearly() {
        let req = with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
            ]}]),
        );
        let err = rejected(&req);
        assert!(err
            .message
            .contains("only text content parts are supported"));
        assert!(err.message.contains("image_url"));
        assert_eq!(err.param.as_deref(), Some("messages[0].content"));
        // The non-text part survives a round trip untouched.
        let back = serde_json::to_value(&req.messages[0]).expect("ser");
        assert_eq!(
            back["content"][1]["image_url"]["url"],
            json!("https://x/y.png")
        );
        assert_eq!(req.messages[0].text(), "what is this?");
    }

    #[test]
    fn malformed_content_is_a_parse_error() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":5}]}"#;
        let err = parse_json::<ChatCompletionRequest>(body).expect_err("number content");
        assert!(err.message.starts_with("Invalid JSON body: "));
        assert!(
            err.message.contains("string or an array"),
            "{}",
            err.message
        );
        let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#;
        let err = parse_json::<ChatCompletionRequest>(body).expect_err("text without text");
        assert!(err.message.contains("string `text`"), "{}", err.message);
    }

    #[test]
    fn unknown_role_is_a_parse_error() {
        let body = br#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#;
        let err = parse_json::<ChatCompletionRequest>(body).expect_err("bad role");
        assert_eq!(err.status, 400);
        assert!(err.message.contains("wizard"), "{}", err.message);
    }

    #[test]
    fn missing_required_fields_are_parse_errors() {
        let err =
            parse_json::<ChatCompletionRequest>(br#"{"model":"m"}"#).expect_err("no messages");
        assert!(err.message.contains("messages"), "{}", err.message);
        let err = parse_json::<ChatCompletionRequest>(br#"{"messages":[]}"#).expect_err("no model");
        assert!(err.message.contains("model"), "{}", err.message);
    }

    #[test]
    fn unsupported_features_rejected() {
        let cases = [
            ("logprobs", json!(true), "logprobs"),
            ("top_logprobs", json!(3), "top_logprobs"),
            ("n", json!(2), "n"),
            ("logit_bias", json!({"50256": -100}), "logit_bias"),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                "tools",
            ),
            (
                "response_format",
                json!({"type": "json_object"}),
                "response_format",
            ),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
                "response_format",
            ),
        ];
        for (field, value, param) in cases {
            let err = rejected(&with(field, value));
            assert_eq!(err.param.as_deref(), Some(param), "{field}");
            assert!(err.message.contains("not supported yet"), "{}", err.message);
        }
        let err = rejected(&with("response_format", json!({"type": "json_object"})));
        assert!(err.message.contains("json_object"));
        // Harmless forms of those fields pass.
        for (field, value) in [
            ("logprobs", json!(false)),
            ("tools", json!([])),
            ("logit_bias", json!({})),
            ("response_format", json!({"type": "text"})),
            ("n", json!(1)),
        ] {
            assert!(with(field, value).validate().is_ok(), "{field}");
        }
        let err = rejected(&with("response_format", json!("text")));
        assert_eq!(err.param.as_deref(), Some("response_format"));
    }

    #[test]
    fn stream_options_require_stream() {
        let err = rejected(&with("stream_options", json!({"include_usage": true})));
        assert_eq!(err.param.as_deref(), Some("stream_options"));
        let mut v = minimal();
        v["stream"] = json!(true);
        v["stream_options"] = json!({"include_usage": false});
        let req = parse(v);
        assert!(req.validate().is_ok());
        assert!(!req.include_usage());
    }

    fn meta() -> ResponseMeta {
        ResponseMeta::new("chatcmpl-1", 1_700_000_000, "m")
    }

    #[test]
    fn response_wire_format() {
        let resp = ChatCompletionResponse::new(&meta(), "4", FinishReason::Stop, Usage::new(5, 1));
        let v = serde_json::to_value(&resp).expect("ser");
        assert_eq!(
            v,
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1_700_000_000u64,
                "model": "m",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "4"},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
            })
        );
        let back: ChatCompletionResponse = serde_json::from_value(v).expect("de");
        assert_eq!(back, resp);
    }

    #[test]
    fn parses_openai_response_with_extra_fields() {
        let v = json!({
            "id": "chatcmpl-abc", "object": "chat.completion", "created": 1,
            "model": "gpt-4o", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi",
                          "refusal": null}, "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                      "completion_tokens_details": {"reasoning_tokens": 0}}
        });
        let resp: ChatCompletionResponse = serde_json::from_value(v).expect("de");
        assert_eq!(resp.choices[0].finish_reason, FinishReason::Length);
        assert_eq!(resp.system_fingerprint.as_deref(), Some("fp_1"));
    }

    #[test]
    fn stream_chunks_without_usage() {
        let m = meta();
        let role = serde_json::to_value(ChatCompletionChunk::role(&m)).expect("ser");
        assert_eq!(
            role,
            json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk",
                "created": 1_700_000_000u64, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": null, "finish_reason": null}]
            })
        );
        let content = serde_json::to_value(ChatCompletionChunk::content(&m, "Hel")).expect("ser");
        assert_eq!(content["choices"][0]["delta"], json!({"content": "Hel"}));
        assert!(content.get("usage").is_none());
        let finish = serde_json::to_value(ChatCompletionChunk::finish(&m, FinishReason::Length))
            .expect("ser");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        assert_eq!(finish["choices"][0]["finish_reason"], json!("length"));
        assert!(finish.get("usage").is_none());
        // with_usage_field(false) leaves it absent.
        let chunk = ChatCompletionChunk::content(&m, "x").with_usage_field(false);
        assert!(serde_json::to_value(chunk)
            .expect("ser")
            .get("usage")
            .is_none());
    }

    #[test]
    fn stream_chunks_with_usage() {
        let m = meta();
        let chunks = [
            ChatCompletionChunk::role(&m),
            ChatCompletionChunk::content(&m, "hi"),
            ChatCompletionChunk::finish(&m, FinishReason::Stop),
        ];
        for chunk in chunks {
            let v = serde_json::to_value(chunk.with_usage_field(true)).expect("ser");
            assert_eq!(v["usage"], Value::Null);
            assert!(v.as_object().is_some_and(|o| o.contains_key("usage")));
        }
        let last = ChatCompletionChunk::usage(&m, Usage::new(3, 2)).with_usage_field(true);
        let v = serde_json::to_value(&last).expect("ser");
        assert_eq!(v["choices"], json!([]));
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        let back: ChatCompletionChunk = serde_json::from_value(v).expect("de");
        assert_eq!(back, last);
    }

    #[test]
    fn chunks_deserialize_all_usage_states() {
        let m = meta();
        for chunk in [
            ChatCompletionChunk::role(&m),
            ChatCompletionChunk::content(&m, "a").with_usage_field(true),
            ChatCompletionChunk::finish(&m, FinishReason::Stop),
        ] {
            let json = serde_json::to_string(&chunk).expect("ser");
            let back: ChatCompletionChunk = serde_json::from_str(&json).expect("de");
            assert_eq!(back, chunk);
        }
    }
}
