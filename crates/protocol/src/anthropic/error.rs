//! The Anthropic error object: `{"type": "error", "error": {"type": ..., "message": ...}}` and
//! the HTTP status it is sent with.
//!
//! Every failure an Anthropic client sees is an [`AnthropicError`]. Errors raised by the shared
//! OpenAI pipeline arrive as [`ApiError`] and are mapped here, by HTTP status, in exactly one
//! place ([`From<ApiError>`](AnthropicError#impl-From<ApiError>-for-AnthropicError)).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::stream::MessageEvent;
use crate::error::ApiError;

/// The `error.type` of an Anthropic error; each kind has a fixed HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnthropicErrorKind {
    /// 400: the request is malformed or asks for something invalid.
    #[serde(rename = "invalid_request_error")]
    InvalidRequest,
    /// 401: missing or wrong credentials.
    #[serde(rename = "authentication_error")]
    Authentication,
    /// 403: the credentials may not use this resource.
    #[serde(rename = "permission_error")]
    Permission,
    /// 404: unknown model or URL.
    #[serde(rename = "not_found_error")]
    NotFound,
    /// 413: the request body is too large.
    RequestTooLarge,
    /// 429: too many requests.
    #[serde(rename = "rate_limit_error")]
    RateLimit,
    /// 500: something failed on our side.
    #[serde(rename = "api_error")]
    Api,
    /// 503: the server is at capacity (Anthropic itself answers 529).
    #[serde(rename = "overloaded_error")]
    Overloaded,
}

impl AnthropicErrorKind {
    /// The wire name, e.g. `"invalid_request_error"`; also a stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::NotFound => "not_found_error",
            Self::RequestTooLarge => "request_too_large",
            Self::RateLimit => "rate_limit_error",
            Self::Api => "api_error",
            Self::Overloaded => "overloaded_error",
        }
    }

    /// The HTTP status this kind is sent with.
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::Authentication => 401,
            Self::Permission => 403,
            Self::NotFound => 404,
            Self::RequestTooLarge => 413,
            Self::RateLimit => 429,
            Self::Api => 500,
            Self::Overloaded => 503,
        }
    }

    /// The kind an HTTP status stands for; unknown 4xx are invalid requests, the rest API errors.
    pub fn from_status(status: u16) -> Self {
        match status {
            401 => Self::Authentication,
            403 => Self::Permission,
            404 => Self::NotFound,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimit,
            503 | 529 => Self::Overloaded,
            400..=499 => Self::InvalidRequest,
            _ => Self::Api,
        }
    }
}

impl fmt::Display for AnthropicErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error in Anthropic's shape, with the HTTP status it is sent with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AnthropicError {
    /// HTTP status code, e.g. 400.
    pub status: u16,
    /// The `error.type`.
    pub kind: AnthropicErrorKind,
    /// Human-readable message; validation errors start with the field path, e.g.
    /// `messages.1.content.0: ...`.
    pub message: String,
}

impl AnthropicError {
    /// An error of `kind`, sent with that kind's status.
    pub fn new(kind: AnthropicErrorKind, message: impl Into<String>) -> Self {
        Self {
            status: kind.status(),
            kind,
            message: message.into(),
        }
    }

    /// 400 about one field: the message reads `"{path}: {detail}"`, Anthropic's own style.
    pub fn invalid_param(path: impl fmt::Display, detail: impl fmt::Display) -> Self {
        Self::new(
            AnthropicErrorKind::InvalidRequest,
            format!("{path}: {detail}"),
        )
    }

    /// The label for metrics (the `error.type`).
    pub fn error_type(&self) -> &'static str {
        self.kind.as_str()
    }

    /// The JSON body: `{"type": "error", "error": {"type": ..., "message": ...}}`.
    pub fn body(&self) -> Value {
        json!({
            "type": "error",
            "error": {"type": self.kind.as_str(), "message": self.message},
        })
    }

    /// The `error` event that reports a failure in the middle of a stream.
    pub fn event(&self) -> MessageEvent {
        ("error", self.body())
    }
}

impl From<ApiError> for AnthropicError {
    /// Maps by HTTP status (the status itself is kept); the message is kept as is.
    fn from(err: ApiError) -> Self {
        Self {
            status: err.status,
            kind: AnthropicErrorKind::from_status(err.status),
            message: err.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_exact_anthropic_shape() {
        let err = AnthropicError::invalid_param("max_tokens", "field required");
        assert_eq!(err.status, 400);
        assert_eq!(
            err.body(),
            json!({"type": "error", "error": {"type": "invalid_request_error",
                                              "message": "max_tokens: field required"}})
        );
        assert_eq!(err.to_string(), "max_tokens: field required");
        assert_eq!(err.event().0, "error");
        assert_eq!(err.event().1, err.body());
    }

    #[test]
    fn api_errors_map_by_status() {
        let cases = [
            (
                ApiError::invalid_request("bad", Some("x")),
                400,
                "invalid_request_error",
            ),
            (ApiError::model_not_found("m"), 404, "not_found_error"),
            (ApiError::not_found("/v1/x"), 404, "not_found_error"),
            (ApiError::payload_too_large(10), 413, "request_too_large"),
            (ApiError::overloaded("busy"), 503, "overloaded_error"),
            (ApiError::internal("boom"), 500, "api_error"),
            (ApiError::method_not_allowed(), 405, "invalid_request_error"),
        ];
        for (api, status, kind) in cases {
            let message = api.message.clone();
            let err = AnthropicError::from(api);
            assert_eq!(err.status, status, "{err:?}");
            assert_eq!(err.error_type(), kind, "{err:?}");
            assert_eq!(err.body()["error"]["type"], json!(kind));
            assert_eq!(err.message, message);
        }
        let rate_limited = ApiError {
            status: 429,
            ..ApiError::internal("slow down")
        };
        assert_eq!(
            AnthropicError::from(rate_limited).kind,
            AnthropicErrorKind::RateLimit
        );
    }

    #[test]
    fn kinds_serialize_to_their_wire_names_and_statuses_round_trip() {
        let kinds = [
            AnthropicErrorKind::InvalidRequest,
            AnthropicErrorKind::Authentication,
            AnthropicErrorKind::Permission,
            AnthropicErrorKind::NotFound,
            AnthropicErrorKind::RequestTooLarge,
            AnthropicErrorKind::RateLimit,
            AnthropicErrorKind::Api,
            AnthropicErrorKind::Overloaded,
        ];
        for kind in kinds {
            assert_eq!(
                serde_json::to_value(kind).expect("ser"),
                json!(kind.as_str())
            );
            assert_eq!(AnthropicErrorKind::from_status(kind.status()), kind);
        }
        assert_eq!(
            AnthropicErrorKind::from_status(529),
            AnthropicErrorKind::Overloaded
        );
    }
}
