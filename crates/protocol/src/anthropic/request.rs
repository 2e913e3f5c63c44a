//! The bodies of `POST /v1/messages` and `POST /v1/messages/count_tokens`, as sent.
//!
//! Parsing is lenient where a clear message beats a serde error: a content block of a type this
//! server does not handle (`image`, `document`, `thinking`, ...) parses as
//! [`ContentBlock::Unsupported`] so that validation can reject it naming its path. Unknown
//! fields (`cache_control`, `citations`, `thinking`, ...) are ignored.

use crate::sampling::deserialize_flag;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of `POST /v1/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesRequest {
    /// Model to run.
    pub model: String,
    /// Most tokens to generate, at least 1. Required; optional here only so that its absence is
    /// reported by validation, naming the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The conversation; starts with a `user` message.
    pub messages: Vec<InputMessage>,
    /// System prompt: a string or an array of text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<BlockContent>,
    /// Strings that end generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    /// Sampling temperature in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens; 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Stream the answer as named server-sent events.
    #[serde(default, deserialize_with = "deserialize_flag")]
    pub stream: bool,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolDefinition>>,
    /// Whether and how the model must call a tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoiceParam>,
    /// Request metadata (e.g. `user_id`); accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Output settings: `format` (`{"type": "json_schema", "schema": {...}}`) constrains the
    /// answer to the schema (structured outputs); `effort` is accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_config: Option<Value>,
}

/// The body of `POST /v1/messages/count_tokens`: the prompt part of a [`MessagesRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountTokensRequest {
    /// Model whose tokenizer and chat template count.
    pub model: String,
    /// The conversation; starts with a `user` message.
    pub messages: Vec<InputMessage>,
    /// System prompt: a string or an array of text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<BlockContent>,
    /// Tools, which the prompt describes to the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolDefinition>>,
    /// Tool choice, which can change how tools are rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoiceParam>,
}

/// The fields both request kinds share: everything that makes up the prompt.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conversation<'a> {
    pub(super) model: &'a str,
    pub(super) messages: &'a [InputMessage],
    pub(super) system: Option<&'a BlockContent>,
    pub(super) tools: &'a [ToolDefinition],
    pub(super) tool_choice: Option<&'a ToolChoiceParam>,
}

impl MessagesRequest {
    pub(super) fn conversation(&self) -> Conversation<'_> {
        Conversation {
            model: &self.model,
            messages: &self.messages,
            system: self.system.as_ref(),
            tools: self.tools.as_deref().unwrap_or_default(),
            tool_choice: self.tool_choice.as_ref(),
        }
    }
}

impl CountTokensRequest {
    pub(super) fn conversation(&self) -> Conversation<'_> {
        Conversation {
            model: &self.model,
            messages: &self.messages,
            system: self.system.as_ref(),
            tools: self.tools.as_deref().unwrap_or_default(),
            tool_choice: self.tool_choice.as_ref(),
        }
    }
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputMessage {
    /// `user` or `assistant`.
    pub role: MessageRole,
    /// A string or an array of content blocks.
    pub content: BlockContent,
}

/// Who wrote a message; Anthropic has no `system` or `tool` role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum MessageRole {
    /// The end user (also the carrier of tool results).
    User,
    /// The model.
    Assistant,
}

impl MessageRole {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

impl TryFrom<String> for MessageRole {
    type Error = String;

    fn try_from(role: String) -> Result<Self, String> {
        match role.as_str() {
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            "system" => Err(
                "message role must be \"user\" or \"assistant\", got \"system\"; \
                             the system prompt goes in the top-level `system` field"
                    .to_owned(),
            ),
            other => Err(format!(
                "message role must be \"user\" or \"assistant\", got {other:?}"
            )),
        }
    }
}

/// Content that is a string or an array of blocks: message content, `system`, and the content
/// of a `tool_result`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum BlockContent {
    /// `"content": "hello"`
    Text(String),
    /// `"content": [{"type": "text", "text": "hello"}, ...]`
    Blocks(Vec<ContentBlock>),
}

impl BlockContent {
    /// The text, text blocks joined by newlines; other blocks are skipped.
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Blocks(blocks) => blocks
                .iter()
                .filter_map(|b| match b {
                    ContentBlock::Text(t) => Some(t.text.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl<'de> Deserialize<'de> for BlockContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| ContentBlock::from_value(v).map_err(de::Error::custom))
                .collect::<Result<_, _>>()
                .map(Self::Blocks),
            other => Err(de::Error::custom(format!(
                "content must be a string or an array of content blocks, got {other}"
            ))),
        }
    }
}

/// One content block, in a request or a response.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    /// `{"type": "text", "text": ...}`
    Text(TextBlock),
    /// `{"type": "tool_use", "id": ..., "name": ..., "input": {...}}`: a call the model made.
    ToolUse(ToolUseBlock),
    /// `{"type": "tool_result", "tool_use_id": ..., "content": ...}`: a call's result.
    ToolResult(ToolResultBlock),
    /// Any other block (`image`, `document`, `thinking`, ...), as sent; validation rejects it.
    #[serde(untagged)]
    Unsupported(Value),
}

impl ContentBlock {
    /// A text block.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(TextBlock { text: text.into() })
    }

    /// The block's `type`, e.g. `"tool_use"`, or `"unknown"` when it has none.
    pub fn kind(&self) -> &str {
        match self {
            Self::Text(_) => "text",
            Self::ToolUse(_) => "tool_use",
            Self::ToolResult(_) => "tool_result",
            Self::Unsupported(v) => v.get("type").and_then(Value::as_str).unwrap_or("unknown"),
        }
    }

    /// Parses a known block strictly and keeps any other as [`Self::Unsupported`].
    fn from_value(value: Value) -> Result<Self, String> {
        let kind = value.get("type").and_then(Value::as_str).map(str::to_owned);
        let parsed = match kind.as_deref() {
            Some("text") => serde_json::from_value(value).map(Self::Text),
            Some("tool_use") => serde_json::from_value(value).map(Self::ToolUse),
            Some("tool_result") => serde_json::from_value(value).map(Self::ToolResult),
            _ => return Ok(Self::Unsupported(value)),
        };
        parsed.map_err(|e| format!("invalid `{}` content block: {e}", kind.unwrap_or_default()))
    }
}

impl<'de> Deserialize<'de> for ContentBlock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::from_value(Value::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

/// The fields of a `text` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextBlock {
    /// The text.
    pub text: String,
}

/// The fields of a `tool_use` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolUseBlock {
    /// Call id, echoed back by the `tool_result` that answers it.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Arguments, a JSON object.
    pub input: Value,
}

/// The fields of a `tool_result` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResultBlock {
    /// The id of the `tool_use` block this answers.
    pub tool_use_id: String,
    /// The result: a string or an array of text blocks; absent means empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<BlockContent>,
    /// Whether the tool failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDefinition {
    /// Absent or `"custom"`; server tools (`web_search_...`, `bash_...`) are rejected.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    /// What the tool does (shown to the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the `input` object; required for custom tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
}

/// The `tool_choice` parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolChoiceParam {
    /// `auto`, `any`, `tool` or `none`.
    #[serde(rename = "type")]
    pub kind: ToolChoiceKind,
    /// The tool to call, with `type: "tool"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Allow at most one tool call in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_parallel_tool_use: Option<bool>,
}

/// The `type` of [`ToolChoiceParam`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceKind {
    /// The model decides.
    Auto,
    /// The model must call some tool.
    Any,
    /// The model must call the named tool.
    Tool,
    /// The model must not call a tool.
    None,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A request as the anthropic Python SDK sends it from `client.messages.create(...)`.
    fn sdk_request() -> Value {
        json!({
            "max_tokens": 1024,
            "messages": [
                {"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                     "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A",
                     "content": [{"type": "text", "text": "18°C, sunny"}],
                     "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "And in Rome?"}
                ]}
            ],
            "model": "claude-sonnet-4-20250514",
            "system": [{"type": "text", "text": "You are terse.",
                        "cache_control": {"type": "ephemeral"}}],
            "stop_sequences": ["\n\nHuman:"],
            "temperature": 0.5,
            "top_k": 40,
            "top_p": 0.9,
            "stream": true,
            "metadata": {"user_id": "u-1"},
            "tools": [{"name": "get_weather", "description": "Current weather",
                       "input_schema": {"type": "object",
                                        "properties": {"city": {"type": "string"}},
                                        "required": ["city"]}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true}
        })
    }

    #[test]
    fn parses_an_sdk_request_and_round_trips() {
        let req: MessagesRequest = serde_json::from_value(sdk_request()).expect("parses");
        assert_eq!(req.max_tokens, Some(1024));
        assert_eq!(req.messages.len(), 3);
        assert_eq!(req.messages[1].role, MessageRole::Assistant);
        let BlockContent::Blocks(blocks) = &req.messages[1].content else {
            panic!("blocks expected")
        };
        assert_eq!(
            blocks[1],
            ContentBlock::ToolUse(ToolUseBlock {
                id: "toolu_01A".into(),
                name: "get_weather".into(),
                input: json!({"city": "Paris"}),
            })
        );
        assert_eq!(
            req.system.as_ref().map(BlockContent::text).as_deref(),
            Some("You are terse.")
        );
        let choice = req.tool_choice.clone().expect("tool_choice");
        assert_eq!(choice.kind, ToolChoiceKind::Auto);
        assert_eq!(choice.disable_parallel_tool_use, Some(true));
        assert!(req.stream);

        let json = serde_json::to_value(&req).expect("ser");
        assert_eq!(json["messages"][1]["content"][1]["type"], json!("tool_use"));
        assert_eq!(
            json["messages"][2]["content"][0]["type"],
            json!("tool_result")
        );
        let back: MessagesRequest = serde_json::from_value(json).expect("de");
        assert_eq!(back, req);
    }

    #[test]
    fn unsupported_blocks_are_kept_for_validation() {
        let content: BlockContent = serde_json::from_value(json!([
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}},
            {"type": "text", "text": "what is this?"}
        ]))
        .expect("parses");
        let BlockContent::Blocks(blocks) = &content else {
            panic!("blocks expected")
        };
        assert_eq!(blocks[0].kind(), "image");
        assert!(matches!(blocks[0], ContentBlock::Unsupported(_)));
        assert_eq!(content.text(), "what is this?");
        let image = serde_json::to_value(&blocks[0]).expect("ser");
        assert_eq!(image["type"], json!("image"));
    }

    #[test]
    fn malformed_known_blocks_and_roles_say_what_is_wrong() {
        let err = serde_json::from_value::<BlockContent>(json!([{"type": "tool_use", "id": "x"}]))
            .expect_err("missing name");
        assert!(
            err.to_string().contains("invalid `tool_use` content block"),
            "{err}"
        );
        let err = serde_json::from_value::<BlockContent>(json!(3)).expect_err("number");
        assert!(err.to_string().contains("string or an array"), "{err}");
        let err = serde_json::from_value::<InputMessage>(json!({"role": "system", "content": "x"}))
            .expect_err("system role");
        assert!(err.to_string().contains("top-level `system`"), "{err}");
        let err = serde_json::from_value::<ToolChoiceParam>(json!({"type": "sometimes"}))
            .expect_err("bad type");
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn count_tokens_request_parses_without_max_tokens() {
        let req: CountTokensRequest = serde_json::from_value(json!({
            "model": "claude-3-5-haiku-latest",
            "messages": [{"role": "user", "content": "Hello"}],
            "system": "Be brief."
        }))
        .expect("parses");
        assert_eq!(req.messages[0].content, BlockContent::Text("Hello".into()));
        assert!(req.tools.is_none());
    }
}
