//! OpenAI-compatible wire types for lastmile: requests and their validation,
//! responses and stream chunks, the OpenAI error object, and SSE framing.
//!
//! Pure data, no I/O: the HTTP layer parses a body with [`parse_json`], calls
//! `validate()`, maps the request to the engine via `sampling()`, and sends
//! back responses, chunks framed by [`sse_event`], or an [`ApiError`].

#![warn(missing_docs)]

pub mod anthropic;
pub mod chat;
pub mod completions;
pub mod disagg;
pub mod error;
pub mod kv;
pub mod logprobs;
pub mod models;
pub mod params;
pub mod request_guard;
pub mod reservation;
pub mod sampling;
pub mod speculative;
pub mod sse;
pub mod structured;
pub mod usage;

pub use chat::{
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatMessage, ChunkChoice, ContentPart, Delta, FunctionCall,
    FunctionCallDelta, FunctionDefinition, MessageContent, Role, Tool, ToolCall, ToolCallDelta,
    ToolChoice,
};
pub use completions::{
    CompletionChoice, CompletionChunk, CompletionChunkChoice, CompletionRequest,
    CompletionResponse, PromptInput, PromptRef,
};
pub use disagg::{PrefillReply, PrefillRequest, WorkerRole};
pub use error::{parse_json, ApiError};
pub use kv::{block_hash, prefix_hashes, KvEvent};
pub use logprobs::{
    ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TokenText, TopLogprob, MAX_TOP_LOGPROBS,
};
pub use models::{ModelCard, ModelList};
pub use params::GenerationParams;
pub use reservation::TokenReservation;
pub use sampling::{
    FinishReason, ResponseMeta, SamplingFields, SamplingRequest, StopSequences, StreamOptions,
    Usage, UsageField, MAX_CHOICES, MAX_LOGIT_BIAS, MAX_STOP_BYTES, MAX_STOP_SEQUENCES,
};
pub use speculative::{SpeculativeMethod, SpeculativeParams};
pub use sse::{parse_sse_data, sse_event, SSE_DONE};
pub use structured::{ConstraintFields, OutputConstraint};
pub use usage::{StreamMeter, TokenUsage, USAGE_HEADER};
