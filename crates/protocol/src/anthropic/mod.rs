//! The Anthropic Messages API (`POST /v1/messages` and `POST /v1/messages/count_tokens`) as a
//! front end to the OpenAI chat pipeline: wire types, validation, conversion into a
//! [`ChatCompletionRequest`](crate::chat::ChatCompletionRequest), responses, streamed events
//! and Anthropic-shaped errors.
//!
//! Pure data, no I/O. The HTTP layer parses a [`MessagesRequest`], calls
//! [`MessagesRequest::to_chat`] (which validates) and runs the chat pipeline; it answers with a
//! [`MessagesResponse`] built from a [`MessageOutput`], or streams the events of a
//! [`MessageStream`] framed by [`frame_event`]; every failure goes out as an
//! [`AnthropicError`], including the pipeline's own [`ApiError`](crate::error::ApiError)s.
//!
//! Layout: [`request`] (types as sent) → `validation` → `convert`; [`response`]; [`stream`];
//! [`error`].

pub mod error;
pub mod request;
pub mod response;
pub mod stream;

mod convert;
mod validation;

pub use error::{AnthropicError, AnthropicErrorKind};
pub use request::{
    BlockContent, ContentBlock, CountTokensRequest, InputMessage, MessageRole, MessagesRequest,
    TextBlock, ToolChoiceKind, ToolChoiceParam, ToolDefinition, ToolResultBlock, ToolUseBlock,
};
pub use response::{
    CountTokensResponse, MessageOutput, MessagesResponse, MessagesUsage, StopReason,
};
pub use stream::{frame_event, frame_events, MessageEvent, MessageStream};
