//! `/v1/chat/completions`: the request and its validation; the response and stream chunks live
//! in [`response`], tool calling in [`tools`].
//!
//! Invariants: a request that passes [`ChatCompletionRequest::validate`] has at
//! least one message, only text content, sampling values in range, well-formed tools and
//! output constraints, and asks for no feature this server has not implemented yet. Unknown
//! request fields are ignored, as OpenAI does.

pub mod response;
pub mod tools;

pub use response::{
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChunkChoice, Delta,
};
pub use tools::{
    FunctionCall, FunctionCallDelta, FunctionDefinition, Tool, ToolCall, ToolCallDelta, ToolChoice,
};

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::logprobs::MAX_TOP_LOGPROBS;
use crate::params::GenerationParams;
use crate::sampling::{
    check_max_tokens, check_model, check_stream_options, SamplingFields, SamplingRequest,
};

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The fields shared with the other completions endpoint (flattened: they sit at the
    /// top level of the JSON body).
    #[serde(flatten)]
    pub params: GenerationParams,
    /// The conversation so far; must not be empty.
    pub messages: Vec<ChatMessage>,
    /// Token limit for the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Return each generated token's log probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Number of alternatives per position with `logprobs` (0 to 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Functions the model may call, as sent (typed view: [`Self::typed_tools`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// `"none"`, `"auto"`, `"required"` or a named function (typed: [`Self::typed_tool_choice`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Allow more than one tool call in one answer (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
}

impl ChatCompletionRequest {
    /// A request with the given model and messages and every option unset.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            params: GenerationParams::new(model),
            messages,
            ..Self::default()
        }
    }

    /// The token limit: `max_completion_tokens`, else `max_tokens`, else none
    /// (generate up to the context window).
    pub fn max_new_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.params.max_tokens)
    }

    /// The sampling knobs as sent, for validation and conversion.
    pub fn sampling_fields(&self) -> SamplingFields<'_> {
        let param = if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        self.params.sampling_fields(self.max_new_tokens(), param)
    }

    /// Engine-facing sampling settings with defaults filled in.
    pub fn sampling(&self) -> SamplingRequest {
        self.sampling_fields().to_request()
    }

    /// Checks the request; the error names the offending parameter.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_model(&self.params.model)?;
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
        check_max_tokens("max_tokens", self.params.max_tokens)?;
        self.sampling_fields().validate()?;
        check_stream_options(self.params.stream, self.params.stream_options.as_ref())?;
        self.validate_features()
    }

    /// How many alternatives to report per token when `logprobs` is on (`None`: logprobs off).
    pub fn top_logprobs_wanted(&self) -> Option<usize> {
        (self.logprobs == Some(true)).then(|| self.top_logprobs.unwrap_or(0) as usize)
    }

    /// The tools, typed (empty when none; call after [`Self::validate`]).
    pub fn typed_tools(&self) -> Result<Vec<Tool>, ApiError> {
        tools::parse_tools(self.tools.as_deref().unwrap_or_default())
    }

    /// The tool choice, typed and checked against the tools.
    pub fn typed_tool_choice(&self) -> Result<ToolChoice, ApiError> {
        tools::parse_tool_choice(self.tool_choice.as_ref(), &self.typed_tools()?)
    }

    /// Tools, logprobs and output constraints are well-formed and consistent.
    fn validate_features(&self) -> Result<(), ApiError> {
        if let Some(k) = self.top_logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::invalid_request(
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                    Some("top_logprobs"),
                ));
            }
            if k > 0 && self.logprobs != Some(true) {
                return Err(ApiError::invalid_request(
                    "top_logprobs requires logprobs to be true",
                    Some("top_logprobs"),
                ));
            }
        }
        let choice = self.typed_tool_choice()?;
        let constraint = self.params.output_constraint()?;
        if constraint.is_some() && matches!(choice, ToolChoice::Required | ToolChoice::Function(_))
        {
            return Err(ApiError::invalid_request(
                "a forced tool call (tool_choice) cannot be combined with response_format or a \
                 guided_* constraint",
                Some("tool_choice"),
            ));
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
    /// Tool calls made by an assistant message, as sent (typed: [`Self::typed_tool_calls`]).
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

    /// The typed tool calls of an assistant message (empty when none).
    pub fn typed_tool_calls(&self, index: usize) -> Result<Vec<ToolCall>, ApiError> {
        tools::parse_tool_calls(self.tool_calls.as_deref().unwrap_or_default(), index)
    }

    fn validate(&self, index: usize) -> Result<(), ApiError> {
        if self.tool_calls.is_some() {
            if self.role != Role::Assistant {
                let param = format!("messages[{index}].tool_calls");
                return Err(ApiError::invalid_request(
                    format!("{param} is only allowed on assistant messages"),
                    Some(&param),
                ));
            }
            self.typed_tool_calls(index)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::parse_json;
    use crate::sampling::{FinishReason, ResponseMeta, Usage};
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
        assert!(req.params.include_usage());
        assert_eq!(req.max_new_tokens(), Some(100));
        let s = req.sampling();
        assert_eq!(s.temperature, 0.7);
        assert_eq!(s.top_p, 0.9);
        assert_eq!(s.stop, vec!["\n\n".to_string()]);
        assert_eq!(s.seed, Some(1234));
        assert_eq!(s.max_tokens, Some(100));
    }

    #[test]
    fn null_stream_means_not_streaming() {
        let mut v = minimal();
        v["stream"] = Value::Null;
        assert!(!parse(v).params.stream);
    }

    #[test]
    fn minimal_request_defaults() {
        let req = parse(minimal());
        assert!(req.validate().is_ok());
        assert!(!req.params.stream);
        assert!(!req.params.include_usage());
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
    fn features_accepted_and_bad_forms_rejected() {
        let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        for (field, value) in [
            ("logprobs", json!(true)),
            ("n", json!(16)),
            ("logit_bias", json!({"50256": -100})),
            ("tools", tool.clone()),
            ("response_format", json!({"type": "json_object"})),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            ),
            ("guided_regex", json!("[a-z]+")),
            ("guided_choice", json!(["yes", "no"])),
            ("logprobs", json!(false)),
            ("tools", json!([])),
            ("logit_bias", json!({})),
            ("response_format", json!({"type": "text"})),
            ("n", json!(1)),
        ] {
            assert!(
                with(field, value.clone()).validate().is_ok(),
                "{field}: {value}"
            );
        }
        let mut top = with("logprobs", json!(true));
        top.top_logprobs = Some(20);
        assert!(top.validate().is_ok());
        assert_eq!(top.top_logprobs_wanted(), Some(20));
        top.top_logprobs = Some(21);
        assert_eq!(rejected(&top).param.as_deref(), Some("top_logprobs"));
        let err = rejected(&with("top_logprobs", json!(3)));
        assert!(err.message.contains("requires logprobs"), "{}", err.message);
        let err = rejected(&with("n", json!(17)));
        assert_eq!(err.param.as_deref(), Some("n"));
        let err = rejected(&with("tool_choice", json!("required")));
        assert_eq!(err.param.as_deref(), Some("tool_choice"));
        let mut forced = with("tools", tool);
        forced.tool_choice = Some(json!("required"));
        forced.params.response_format = Some(json!({"type": "json_object"}));
        assert_eq!(rejected(&forced).param.as_deref(), Some("tool_choice"));
        let err = rejected(&with("response_format", json!({"type": "yaml"})));
        assert_eq!(err.param.as_deref(), Some("response_format.type"));
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
        assert!(!req.params.include_usage());
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
