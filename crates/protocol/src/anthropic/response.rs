//! What `POST /v1/messages` answers when not streaming, and the answer of
//! `POST /v1/messages/count_tokens`.
//!
//! [`MessagesResponse::new`] builds the answer from what the shared pipeline produced
//! ([`MessageOutput`]): the text becomes a `text` block (left out when empty), each tool call a
//! `tool_use` block with its arguments parsed into `input`, and our [`FinishReason`] a
//! [`StopReason`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::request::{ContentBlock, MessageRole, ToolUseBlock};
use crate::chat::ToolCall;
use crate::sampling::{FinishReason, Usage};

/// The non-streaming answer of `POST /v1/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesResponse {
    /// Message id, `msg_...`.
    pub id: String,
    /// Always `"message"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `assistant`.
    pub role: MessageRole,
    /// The model that answered.
    pub model: String,
    /// `text` and `tool_use` blocks, in that order.
    pub content: Vec<ContentBlock>,
    /// Why generation stopped; `null` only in the `message_start` event of a stream.
    pub stop_reason: Option<StopReason>,
    /// The stop sequence that ended generation, when one did.
    pub stop_sequence: Option<String>,
    /// Token accounting.
    pub usage: MessagesUsage,
}

/// What the pipeline produced for one request, as [`MessagesResponse::new`] needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageOutput {
    /// The generated text (without tool calls).
    pub text: String,
    /// The tool calls the model made.
    pub tool_calls: Vec<ToolCall>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Token accounting.
    pub usage: Usage,
    /// The stop sequence that ended generation, when one did.
    pub stop_sequence: Option<String>,
}

impl MessagesResponse {
    /// The response for `output`; `id` should start with `msg_`.
    pub fn new(id: impl Into<String>, model: impl Into<String>, output: MessageOutput) -> Self {
        let mut content = Vec::with_capacity(output.tool_calls.len() + 1);
        if !output.text.is_empty() {
            content.push(ContentBlock::text(output.text));
        }
        content.extend(output.tool_calls.iter().map(tool_use_block));
        let stop_reason =
            StopReason::from_finish(output.finish_reason, output.stop_sequence.as_deref());
        Self {
            id: id.into(),
            kind: "message".to_owned(),
            role: MessageRole::Assistant,
            model: model.into(),
            content,
            stop_reason: Some(stop_reason),
            stop_sequence: output
                .stop_sequence
                .filter(|_| stop_reason == StopReason::StopSequence),
            usage: output.usage.into(),
        }
    }
}

/// A `tool_use` block for `call`, keeping its id; arguments that are not a JSON object become
/// `{}`.
pub(super) fn tool_use_block(call: &ToolCall) -> ContentBlock {
    ContentBlock::ToolUse(ToolUseBlock {
        id: call.id.clone(),
        name: call.function.name.clone(),
        input: parse_input(&call.function.arguments),
    })
}

fn parse_input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// Why generation stopped, in Anthropic's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model finished its turn.
    EndTurn,
    /// `max_tokens` (or the context window) was reached.
    MaxTokens,
    /// One of `stop_sequences` was generated.
    StopSequence,
    /// The model called tools.
    ToolUse,
    /// Output was withheld by a content filter.
    Refusal,
}

impl StopReason {
    /// Maps our finish reason; a stop caused by a stop sequence is `stop_sequence`.
    pub fn from_finish(reason: FinishReason, stop_sequence: Option<&str>) -> Self {
        match reason {
            FinishReason::Stop if stop_sequence.is_some() => Self::StopSequence,
            FinishReason::Stop => Self::EndTurn,
            FinishReason::Length => Self::MaxTokens,
            FinishReason::ToolCalls => Self::ToolUse,
            FinishReason::ContentFilter => Self::Refusal,
        }
    }
}

/// The `usage` object of a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesUsage {
    /// Tokens in the prompt, after templating.
    pub input_tokens: u32,
    /// Tokens generated.
    pub output_tokens: u32,
}

impl From<Usage> for MessagesUsage {
    fn from(usage: Usage) -> Self {
        Self {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        }
    }
}

/// The answer of `POST /v1/messages/count_tokens`: `{"input_tokens": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountTokensResponse {
    /// Tokens the prompt (system, messages and tools, after templating) takes.
    pub input_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn output(finish_reason: FinishReason) -> MessageOutput {
        MessageOutput {
            text: String::new(),
            tool_calls: Vec::new(),
            finish_reason,
            usage: Usage::new(12, 7),
            stop_sequence: None,
        }
    }

    #[test]
    fn text_response_has_exact_anthropic_shape() {
        let resp = MessagesResponse::new(
            "msg_01",
            "claude-sonnet-4-20250514",
            MessageOutput {
                text: "Hello!".into(),
                ..output(FinishReason::Stop)
            },
        );
        assert_eq!(
            serde_json::to_value(&resp).expect("ser"),
            json!({
                "id": "msg_01", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-20250514",
                "content": [{"type": "text", "text": "Hello!"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 7}
            })
        );
        let text = serde_json::to_string(&resp).expect("ser");
        assert!(text.starts_with(r#"{"id":"msg_01","type":"message","role":"assistant""#));
        let back: MessagesResponse = serde_json::from_str(&text).expect("de");
        assert_eq!(back, resp);
    }

    #[test]
    fn tool_calls_become_tool_use_blocks() {
        let resp = MessagesResponse::new(
            "msg_02",
            "m",
            MessageOutput {
                text: "Let me check.".into(),
                tool_calls: vec![
                    ToolCall::new("call_1", "get_weather", r#"{"city": "Paris"}"#),
                    ToolCall::new("call_2", "get_time", "not json"),
                    ToolCall::new("call_3", "get_time", "[1]"),
                ],
                ..output(FinishReason::ToolCalls)
            },
        );
        let v = serde_json::to_value(&resp).expect("ser");
        assert_eq!(
            v["content"],
            json!([
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
                {"type": "tool_use", "id": "call_3", "name": "get_time", "input": {}}
            ])
        );
        assert_eq!(v["stop_reason"], json!("tool_use"));
    }

    #[test]
    fn stop_reasons_and_stop_sequence() {
        let stopped = MessagesResponse::new(
            "msg_03",
            "m",
            MessageOutput {
                stop_sequence: Some("END".into()),
                ..output(FinishReason::Stop)
            },
        );
        assert_eq!(stopped.stop_reason, Some(StopReason::StopSequence));
        assert_eq!(stopped.stop_sequence.as_deref(), Some("END"));
        assert_eq!(stopped.content, vec![]);
        let cut = MessagesResponse::new(
            "msg_04",
            "m",
            MessageOutput {
                stop_sequence: Some("END".into()),
                ..output(FinishReason::Length)
            },
        );
        assert_eq!(cut.stop_reason, Some(StopReason::MaxTokens));
        assert_eq!(cut.stop_sequence, None);
        assert_eq!(
            StopReason::from_finish(FinishReason::ContentFilter, None),
            StopReason::Refusal
        );
        assert_eq!(
            serde_json::to_value(StopReason::MaxTokens).expect("ser"),
            json!("max_tokens")
        );
    }

    #[test]
    fn count_tokens_response_shape() {
        assert_eq!(
            serde_json::to_value(CountTokensResponse { input_tokens: 42 }).expect("ser"),
            json!({"input_tokens": 42})
        );
    }
}
