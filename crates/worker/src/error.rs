//! The worker's error type and the one place errors become HTTP responses (OpenAI's error object,
//! with `Retry-After` on 503).

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
            Self::Engine(e) => match e {
                EngineError::InvalidRequest(m) => ApiError::invalid_request(m.clone(), None),
                EngineError::Tokenizer(m) | EngineError::ChatTemplate(m) => {
                    ApiError::invalid_request(
                        format!("could not build the prompt: {m}"),
                        Some("messages"),
                    )
                }
                EngineError::Overloaded(m) => {
                    ApiError::overloaded(format!("server overloaded: {m}"))
                }
                EngineError::Stopped => ApiError::overloaded("the engine is not running"),
                other => ApiError::internal(other.to_string()),
            },
        }
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
    use super::*;

    #[test]
    fn overload_is_503_with_retry_after_in_openai_shape() {
        let r = WorkerError::Engine(EngineError::Overloaded("queue full".into())).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let bad = WorkerError::Engine(EngineError::InvalidRequest("x".into())).into_response();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert!(bad.headers().get(header::RETRY_AFTER).is_none());
    }
}
