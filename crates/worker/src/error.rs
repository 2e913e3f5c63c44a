//! The worker's error type and the one place errors become HTTP responses (OpenAI's error object,
//! with `Retry-After` on 503). Engine errors are mapped from their fields (kind, param, limit)
//! by [`WorkerError::to_api`]; the Anthropic endpoints convert that result, so both APIs agree.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use lastmile_engine::EngineError;
use lastmile_protocol::ApiError;
use thiserror::Error;

/// Everything a worker request can fail with.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// A client-facing API error (already in OpenAI's shape).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// An engine failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl WorkerError {
    /// A short label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Api(_) => "api",
            Self::Engine(e) => e.error_type(),
        }
    }

    /// The OpenAI error this becomes.
    pub fn to_api(&self) -> ApiError {
        match self {
            Self::Api(e) => e.clone(),
            Self::Engine(e) => engine_api_error(e),
        }
    }

    /// This error as one about request field `param`: an engine error knows a grammar is at
    /// fault, the endpoint knows which field (`tools`, `guided_regex`, …) it came from. A client
    /// error then names that field in `param` and at the start of its message; a server error is
    /// left as it is.
    pub(crate) fn about(self, param: &str) -> Self {
        let mut api = self.to_api();
        if api.status < 500 {
            api.message = format!("{param}: {}", api.message);
            api.param = Some(param.to_owned());
        }
        Self::Api(api)
    }
}

/// The one mapping from an engine error to OpenAI's error object.
pub(crate) fn engine_api_error(e: &EngineError) -> ApiError {
    match e {
        EngineError::ContextExceeded {
            prompt,
            max_tokens,
            context,
        } => ApiError::context_length_exceeded(*prompt, *max_tokens, *context),
        e if e.is_client_error() => ApiError::invalid_request(e.to_string(), e.param()),
        EngineError::Tokenizer(m) | EngineError::ChatTemplate(m) => {
            ApiError::invalid_request(format!("could not build the prompt: {m}"), Some("messages"))
        }
        EngineError::QueueFull { limit } => ApiError::overloaded(format!(
            "server overloaded: {limit} requests are already waiting"
        )),
        EngineError::Stopped => ApiError::overloaded("the engine is not running"),
        other => ApiError::internal(other.to_string()),
    }
}

impl IntoResponse for WorkerError {
    fn into_response(self) -> Response {
        api_response(&self.to_api())
    }
}

/// Renders an API error as its HTTP response.
pub fn api_response(e: &ApiError) -> Response {
    error_body_response(e.status, e.body())
}

/// An error body (in whichever API's shape) with its status, and `Retry-After` on 503.
pub(crate) fn error_body_response(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use lastmile_engine::GrammarFault;
    use lastmile_protocol::anthropic::{AnthropicError, AnthropicErrorKind};

    use super::*;

    #[test]
    fn overload_is_503_with_retry_after_in_openai_shape() {
        let r = WorkerError::Engine(EngineError::QueueFull { limit: 8 }).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let bad = WorkerError::Engine(EngineError::EmptyPrompt).into_response();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert!(bad.headers().get(header::RETRY_AFTER).is_none());
    }

    /// What an engine error becomes: OpenAI's status, `type`, `param` and `code`, and the
    /// Anthropic kind the same error takes on `/v1/messages` (same status and message).
    struct Mapped {
        status: u16,
        kind: &'static str,
        param: Option<&'static str>,
        code: Option<&'static str>,
        anthropic: AnthropicErrorKind,
    }

    fn assert_maps(engine: EngineError, want: Mapped) {
        let label = engine.to_string();
        let api = WorkerError::Engine(engine).to_api();
        assert_eq!(api.status, want.status, "{label}");
        assert_eq!(api.error_type, want.kind, "{label}");
        assert_eq!(api.param.as_deref(), want.param, "{label}");
        assert_eq!(api.code.as_deref(), want.code, "{label}");
        let a = AnthropicError::from(api.clone());
        assert_eq!((a.status, a.kind), (want.status, want.anthropic), "{label}");
        assert_eq!(a.message, api.message, "{label}");
    }

    #[test]
    fn each_engine_error_maps_to_status_type_param_and_code_in_both_shapes() {
        let bad_request = |param, code| Mapped {
            status: 400,
            kind: "invalid_request_error",
            param: Some(param),
            code,
            anthropic: AnthropicErrorKind::InvalidRequest,
        };
        let overloaded = || Mapped {
            status: 503,
            kind: "server_error",
            param: None,
            code: Some("overloaded"),
            anthropic: AnthropicErrorKind::Overloaded,
        };
        let internal = || Mapped {
            status: 500,
            kind: "server_error",
            param: None,
            code: None,
            anthropic: AnthropicErrorKind::Api,
        };
        assert_maps(EngineError::EmptyPrompt, bad_request("prompt", None));
        assert_maps(
            EngineError::TokenOutOfVocab {
                token: 999_999,
                vocab: 32_000,
            },
            bad_request("prompt", None),
        );
        assert_maps(
            EngineError::ContextExceeded {
                prompt: 100,
                max_tokens: 9000,
                context: 8192,
            },
            bad_request("messages", Some("context_length_exceeded")),
        );
        assert_maps(
            EngineError::KvCapacityExceeded {
                needed: 4000,
                capacity: 2048,
            },
            bad_request("max_tokens", None),
        );
        for fault in [
            GrammarFault::Invalid,
            GrammarFault::CompilerFailed,
            GrammarFault::AdmitsNothing,
        ] {
            let e = EngineError::Grammar {
                fault,
                detail: "unclosed group".into(),
            };
            assert_maps(e, bad_request("response_format", None));
        }
        assert_maps(
            EngineError::Tokenizer("encoding: bad".into()),
            bad_request("messages", None),
        );
        assert_maps(
            EngineError::ChatTemplate("rendering: bad".into()),
            bad_request("messages", None),
        );
        assert_maps(EngineError::QueueFull { limit: 8 }, overloaded());
        assert_maps(EngineError::Stopped, overloaded());
        let runtime = EngineError::Grammar {
            fault: GrammarFault::Runtime,
            detail: "stuck".into(),
        };
        assert_maps(runtime, internal());
        assert_maps(EngineError::UnsupportedModel("x".into()), internal());
        assert_maps(EngineError::InvalidSettings("x".into()), internal());
    }

    #[test]
    fn messages_keep_the_facts() {
        let api = |e| WorkerError::Engine(e).to_api().message;
        assert_eq!(
            api(EngineError::TokenOutOfVocab {
                token: 999_999,
                vocab: 32_000
            }),
            "token id 999999 is outside the vocabulary (size 32000)"
        );
        let long = api(EngineError::ContextExceeded {
            prompt: 100,
            max_tokens: 9000,
            context: 8192,
        });
        assert!(
            long.contains("8192") && long.contains("9100") && long.contains("context length"),
            "{long}"
        );
        assert_eq!(
            api(EngineError::QueueFull { limit: 8 }),
            "server overloaded: 8 requests are already waiting"
        );
    }

    #[test]
    fn a_grammar_error_about_a_field_names_it_and_a_server_error_stays_as_it_is() {
        let bad = WorkerError::Engine(EngineError::Grammar {
            fault: GrammarFault::AdmitsNothing,
            detail: String::new(),
        })
        .about("guided_grammar")
        .to_api();
        assert_eq!(bad.status, 400);
        assert_eq!(bad.param.as_deref(), Some("guided_grammar"));
        assert_eq!(bad.message, "guided_grammar: the grammar admits no output");
        let server = WorkerError::Engine(EngineError::UnsupportedModel("x".into()))
            .about("tools")
            .to_api();
        assert_eq!((server.status, server.param), (500, None));
    }
}
