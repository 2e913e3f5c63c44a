//! The engine's one error type. Every failure the engine can report — a bad model file, a request
//! it cannot hold, a stopped engine thread — is a variant here, with a stable label for metrics.
//!
//! A request the engine refuses carries its facts (the offending token, the limit it broke, the
//! request field it is about), so the HTTP edge picks a status from the variant and never
//! re-checks a limit or reads the message to decide.

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
    /// The engine settings make no sense (from [`EngineConfig::validate`](crate::EngineConfig)).
    #[error("invalid engine settings: {0}")]
    InvalidSettings(String),
    /// The device asked for cannot run the model (no GPU, no CUDA support in this build, a
    /// driver error, not enough memory).
    #[error("device: {0}")]
    Device(String),
    /// The request has no prompt tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A prompt token id is not in the model's vocabulary.
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab {
        /// The first offending id.
        token: u32,
        /// The vocabulary size (ids must be below it).
        vocab: usize,
    },
    /// The prompt plus the tokens to generate do not fit the model's context.
    #[error(
        "{prompt} prompt tokens + {max_tokens} max tokens exceed the context length {context}"
    )]
    ContextExceeded {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens asked for (0 when the prompt alone fills the context).
        max_tokens: usize,
        /// The model's context length in tokens.
        context: usize,
    },
    /// The prompt plus the tokens to generate need more KV cache than the engine has (a server
    /// configured with a cache smaller than the model's context).
    #[error(
        "the request needs more KV cache than the engine has: {needed} tokens, capacity {capacity}"
    )]
    KvCapacityExceeded {
        /// Prompt tokens plus `max_tokens`.
        needed: usize,
        /// KV capacity in tokens.
        capacity: usize,
    },
    /// A grammar (output constraint) was refused, or failed while constraining generation.
    #[error("{}", fault.describe(detail))]
    Grammar {
        /// What went wrong.
        fault: GrammarFault,
        /// The compiler's or matcher's one-line explanation (may be empty).
        detail: String,
    },
    /// The request asked for drafts from a draft model and the engine has none.
    #[error(
        "speculative.method draft_model needs a server started with a draft model (--draft-model)"
    )]
    NoDraftModel,
    /// The engine is at capacity: `limit` requests are already waiting.
    #[error("engine overloaded: {limit} requests are already waiting")]
    QueueFull {
        /// The most requests that may wait.
        limit: usize,
    },
    /// The engine thread is gone (it stopped or panicked).
    #[error("engine stopped")]
    Stopped,
    /// A step failed inside the engine (a bug: it is logged, and the requests in flight fail
    /// with this while the engine goes on).
    #[error("internal engine error")]
    Internal,
    /// An I/O error with the path or action that caused it.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Why a grammar was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarFault {
    /// It does not compile: bad syntax, a bad schema, an undefined rule.
    Invalid,
    /// The compiler failed on it (a panic inside it, caught).
    CompilerFailed,
    /// It compiles, but no output is in its language.
    AdmitsNothing,
    /// It failed while constraining a running generation.
    Runtime,
}

impl GrammarFault {
    fn describe(self, detail: &str) -> String {
        match (self, detail.is_empty()) {
            (Self::Invalid, _) => format!("invalid grammar: {detail}"),
            (Self::CompilerFailed, _) => "the grammar could not be compiled".to_owned(),
            (Self::AdmitsNothing, true) => "the grammar admits no output".to_owned(),
            (Self::AdmitsNothing, false) => format!("the grammar admits no output: {detail}"),
            (Self::Runtime, _) => format!("grammar: {detail}"),
        }
    }
}

impl EngineError {
    /// A short, stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidModel(_) => "invalid_model",
            Self::UnsupportedModel(_) => "unsupported_model",
            Self::Tokenizer(_) => "tokenizer",
            Self::ChatTemplate(_) => "chat_template",
            Self::InvalidSettings(_) => "invalid_settings",
            Self::Device(_) => "device",
            Self::EmptyPrompt
            | Self::TokenOutOfVocab { .. }
            | Self::ContextExceeded { .. }
            | Self::KvCapacityExceeded { .. }
            | Self::NoDraftModel
            | Self::Grammar { .. } => "invalid_request",
            Self::QueueFull { .. } => "overloaded",
            Self::Stopped => "stopped",
            Self::Internal => "internal",
            Self::Io { .. } => "io",
        }
    }

    /// Whether the request itself is at fault (a client error), not the engine.
    pub fn is_client_error(&self) -> bool {
        match self {
            Self::EmptyPrompt
            | Self::TokenOutOfVocab { .. }
            | Self::ContextExceeded { .. }
            | Self::NoDraftModel
            | Self::KvCapacityExceeded { .. } => true,
            Self::Grammar { fault, .. } => *fault != GrammarFault::Runtime,
            _ => false,
        }
    }

    /// The request field a client error is about, as OpenAI's API names it: `prompt` for the
    /// prompt's tokens, `messages` for a context overflow (OpenAI's own choice), and
    /// `response_format` for a grammar (an endpoint that took it from another field names that
    /// one instead). `None` for errors the client did not cause.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::EmptyPrompt | Self::TokenOutOfVocab { .. } => Some("prompt"),
            Self::ContextExceeded { .. } => Some("messages"),
            Self::KvCapacityExceeded { .. } => Some("max_tokens"),
            Self::NoDraftModel => Some("speculative"),
            Self::Grammar { .. } if self.is_client_error() => Some("response_format"),
            _ => None,
        }
    }

    /// The limit the request broke, where there is one: the vocabulary size for a token id, the
    /// context length for a long request, the queue bound when overloaded.
    pub fn limit(&self) -> Option<usize> {
        match self {
            Self::TokenOutOfVocab { vocab, .. } => Some(*vocab),
            Self::ContextExceeded { context, .. } => Some(*context),
            Self::KvCapacityExceeded { capacity, .. } => Some(*capacity),
            Self::QueueFull { limit } => Some(*limit),
            _ => None,
        }
    }

    /// A grammar error with `detail` (only the first line of it: compilers append parser dumps).
    pub(crate) fn grammar(fault: GrammarFault, detail: &str) -> Self {
        Self::Grammar {
            fault,
            detail: detail.lines().next().unwrap_or(detail).to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_carry_param_limit_and_todays_messages() {
        let oov = EngineError::TokenOutOfVocab {
            token: 999_999,
            vocab: 32_000,
        };
        assert_eq!(
            oov.to_string(),
            "token id 999999 is outside the vocabulary (size 32000)"
        );
        assert_eq!((oov.param(), oov.limit()), (Some("prompt"), Some(32_000)));
        let long = EngineError::ContextExceeded {
            prompt: 8000,
            max_tokens: 1000,
            context: 8192,
        };
        assert_eq!(
            long.to_string(),
            "8000 prompt tokens + 1000 max tokens exceed the context length 8192"
        );
        assert_eq!((long.param(), long.limit()), (Some("messages"), Some(8192)));
        assert_eq!(EngineError::EmptyPrompt.param(), Some("prompt"));
        let none = EngineError::NoDraftModel;
        assert!(none.is_client_error());
        assert_eq!(none.param(), Some("speculative"));
        let full = EngineError::QueueFull { limit: 4 };
        assert_eq!(full.error_type(), "overloaded");
        assert_eq!((full.param(), full.limit()), (None, Some(4)));
        assert!(!full.is_client_error());
        for e in [oov, long, EngineError::EmptyPrompt] {
            assert_eq!(e.error_type(), "invalid_request");
            assert!(e.is_client_error());
        }
    }

    #[test]
    fn grammar_errors_keep_one_line_and_their_wording() {
        let cases = [
            (
                GrammarFault::Invalid,
                "bad rule\nparser dump",
                "invalid grammar: bad rule",
            ),
            (
                GrammarFault::CompilerFailed,
                "",
                "the grammar could not be compiled",
            ),
            (
                GrammarFault::AdmitsNothing,
                "",
                "the grammar admits no output",
            ),
            (
                GrammarFault::AdmitsNothing,
                "loop",
                "the grammar admits no output: loop",
            ),
            (GrammarFault::Runtime, "stuck", "grammar: stuck"),
        ];
        for (fault, detail, message) in cases {
            let e = EngineError::grammar(fault, detail);
            assert_eq!(e.to_string(), message);
            let client = fault != GrammarFault::Runtime;
            assert_eq!(e.is_client_error(), client, "{e}");
            assert_eq!(e.param(), client.then_some("response_format"), "{e}");
        }
    }
}
