//! The engine's one error type. Every failure the engine can report — a bad model file, a request
//! it cannot hold, a stopped engine thread — is a variant here, with a stable label for metrics.

use thiserror::Error;

/// Everything that can go wrong inside the engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The model file or folder is unreadable, truncated, or not what it claims to be.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The model is well-formed but uses something this engine does not implement.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// The request itself cannot be served (e.g. longer than the context).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The engine is at capacity and refused the request.
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    /// The engine thread is gone (it stopped or panicked).
    #[error("engine stopped")]
    Stopped,
    /// Fetching the default model failed.
    #[error("model fetch failed: {0}")]
    Fetch(String),
    /// An I/O error with the path or action that caused it.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl EngineError {
    /// A short, stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidModel(_) => "invalid_model",
            Self::UnsupportedModel(_) => "unsupported_model",
            Self::Tokenizer(_) => "tokenizer",
            Self::ChatTemplate(_) => "chat_template",
            Self::InvalidRequest(_) => "invalid_request",
            Self::Overloaded(_) => "overloaded",
            Self::Stopped => "stopped",
            Self::Fetch(_) => "fetch",
            Self::Io { .. } => "io",
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
