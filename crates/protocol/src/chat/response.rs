//! What `/v1/chat/completions` answers: a whole response with one or more choices, or a stream
//! of chunks, each carrying text, tool-call fragments and log probabilities per choice.

use serde::{Deserialize, Serialize};

use super::tools::{ToolCall, ToolCallDelta};
use super::Role;
use crate::logprobs::ChatLogprobs;
use crate::sampling::{FinishReason, ResponseMeta, Usage, UsageField};

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
        let choice = ChatChoice {
            index: 0,
            message: AssistantMessage::new(content),
            logprobs: None,
            finish_reason,
        };
        Self::with_choices(meta, vec![choice], usage)
    }

    /// A response with these choices.
    pub fn with_choices(meta: &ResponseMeta, choices: Vec<ChatChoice>, usage: Usage) -> Self {
        Self {
            id: meta.id.clone(),
            object: "chat.completion".to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            choices,
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
    /// Log probabilities of the content tokens, when asked for.
    #[serde(default)]
    pub logprobs: Option<ChatLogprobs>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// The message the model produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// Always [`Role::Assistant`].
    pub role: Role,
    /// The generated text (null when the message only calls tools).
    pub content: Option<String>,
    /// The tool calls the model made, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl AssistantMessage {
    /// An assistant message with the given text.
    pub fn new(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: Some(content.into()),
            tool_calls: None,
        }
    }

    /// A message with text (dropped when empty and there are calls) and tool calls.
    pub fn with_tool_calls(content: String, calls: Vec<ToolCall>) -> Self {
        if calls.is_empty() {
            return Self::new(content);
        }
        Self {
            role: Role::Assistant,
            content: (!content.trim().is_empty()).then_some(content),
            tool_calls: Some(calls),
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
            tool_calls: None,
        };
        Self::with_choice(meta, delta, None)
    }

    /// A chunk carrying generated text.
    pub fn content(meta: &ResponseMeta, text: impl Into<String>) -> Self {
        let delta = Delta {
            content: Some(text.into()),
            ..Delta::default()
        };
        Self::with_choice(meta, delta, None)
    }

    /// A chunk carrying tool-call fragments.
    pub fn tool_calls(meta: &ResponseMeta, calls: Vec<ToolCallDelta>) -> Self {
        let delta = Delta {
            tool_calls: Some(calls),
            ..Delta::default()
        };
        Self::with_choice(meta, delta, None)
    }

    /// The same chunk for choice `index` (chunks are built for choice 0).
    pub fn at(mut self, index: u32) -> Self {
        for c in &mut self.choices {
            c.index = index;
        }
        self
    }

    /// Attaches log probabilities to the chunk's choice.
    pub fn with_logprobs(mut self, logprobs: Option<ChatLogprobs>) -> Self {
        if let Some(c) = self.choices.first_mut() {
            c.logprobs = logprobs;
        }
        self
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
    /// Log probabilities of the tokens in this delta, when asked for.
    #[serde(default)]
    pub logprobs: Option<ChatLogprobs>,
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
    /// Tool-call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}
