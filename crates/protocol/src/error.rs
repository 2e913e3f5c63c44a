//! The OpenAI error object and the one place request bodies are parsed.
//!
//! Every failure a client can see is an [`ApiError`]: an HTTP status plus the
//! `{"error": {...}}` body OpenAI clients know how to read. The constructors
//! here fix the status, `type` and `code` of each kind of failure so handlers
//! cannot drift apart; the HTTP layer only copies `status` and [`ApiError::body`].

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// `type` of errors caused by the request itself (4xx).
const INVALID_REQUEST: &str = "invalid_request_error";
/// `type` of errors caused by the server (5xx).
const SERVER_ERROR: &str = "server_error";

/// An error in the shape of OpenAI's error object, with the HTTP status it is sent with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code, e.g. 400.
    pub status: u16,
    /// Human-readable message; names the offending parameter and value where there is one.
    pub message: String,
    /// OpenAI error `type`, e.g. `invalid_request_error`; also a stable label for metrics.
    pub error_type: String,
    /// The request parameter at fault, e.g. `temperature` or `messages[2].content`.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>, error_type: &str) -> Self {
        Self {
            status,
            message: message.into(),
            error_type: error_type.to_owned(),
            param: None,
            code: None,
        }
    }

    fn with_param(mut self, param: Option<&str>) -> Self {
        self.param = param.map(str::to_owned);
        self
    }

    fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    /// The JSON body sent to the client:
    /// `{"error":{"message":..,"type":..,"param":..|null,"code":..|null}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// 400: the request is well-formed JSON but asks for something invalid.
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(400, message, INVALID_REQUEST).with_param(param)
    }

    /// 400: the body is not valid JSON or does not match the request schema.
    pub fn invalid_json(serde_message: impl std::fmt::Display) -> Self {
        Self::new(
            400,
            format!("Invalid JSON body: {serde_message}"),
            INVALID_REQUEST,
        )
    }

    /// 404: the requested model is not served here.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            format!("The model `{model}` does not exist."),
            INVALID_REQUEST,
        )
        .with_param(Some("model"))
        .with_code("model_not_found")
    }

    /// 400: prompt plus requested completion does not fit the model's context window.
    pub fn context_length_exceeded(
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    ) -> Self {
        let requested = prompt_tokens.saturating_add(max_tokens);
        Self::new(
            400,
            format!(
                "This model's maximum context length is {context_length} tokens. However, you \
                 requested {requested} tokens ({prompt_tokens} in the messages, {max_tokens} in \
                 the completion). Please reduce the length of the messages or completion."
            ),
            INVALID_REQUEST,
        )
        .with_param(Some("messages"))
        .with_code("context_length_exceeded")
    }

    /// 413: the request body is larger than the server accepts.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            format!("Request body is too large; the limit is {limit_bytes} bytes."),
            INVALID_REQUEST,
        )
        .with_code("payload_too_large")
    }

    /// 404: no route matches the request path.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            format!("Unknown request URL: {path}. Please check the URL for typos."),
            INVALID_REQUEST,
        )
        .with_code("unknown_url")
    }

    /// 404: the named thing (not the URL) does not exist, or no longer does.
    pub fn missing(message: impl Into<String>) -> Self {
        Self::new(404, message, INVALID_REQUEST).with_code("not_found")
    }

    /// 403: the caller may not do this (an internal endpoint without its token).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, message, INVALID_REQUEST).with_code("forbidden")
    }

    /// 403: a server listening on loopback only was reached under a foreign `Host` name (a
    /// DNS-rebinding page).
    pub fn forbidden_host(host: &str) -> Self {
        let shown: String = host.chars().take(100).collect();
        Self::new(
            403,
            format!(
                "Host {shown:?} is not a name of this machine: this server listens on loopback \
                 only and answers requests for localhost or a loopback address (a proxy in \
                 front of it must pass Host: localhost)"
            ),
            INVALID_REQUEST,
        )
        .with_code("forbidden_host")
    }

    /// 415: a POST whose body is not declared `application/json`.
    pub fn unsupported_media_type(content_type: Option<&str>) -> Self {
        let found = match content_type {
            Some(c) => format!("got {:?}", c.chars().take(100).collect::<String>()),
            None => "got none".into(),
        };
        Self::new(
            415,
            format!("Content-Type must be application/json ({found})"),
            INVALID_REQUEST,
        )
        .with_code("unsupported_media_type")
    }

    /// 405: the route exists but not for this HTTP method.
    pub fn method_not_allowed() -> Self {
        Self::new(405, "Method not allowed for this URL.", INVALID_REQUEST)
            .with_code("method_not_allowed")
    }

    /// 503: the server is at capacity; the client should retry later.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(503, message, SERVER_ERROR).with_code("overloaded")
    }

    /// 429: a rate limit of the caller's key is used up. `kind` is what ran out (`requests`
    /// or `tokens`, OpenAI's error `type` for rate limits).
    pub fn rate_limited(kind: &str, message: impl Into<String>) -> Self {
        Self::new(429, message, kind).with_code("rate_limit_exceeded")
    }

    /// 401: no API key, or one that is not valid.
    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(401, message, INVALID_REQUEST).with_code("invalid_api_key")
    }

    /// 502: an upstream worker failed while handling the request.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, message, SERVER_ERROR).with_code("bad_gateway")
    }

    /// 500: something failed on our side.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message, SERVER_ERROR)
    }

    /// 400: a valid OpenAI feature this server does not implement yet.
    ///
    /// The message is ``"`{feature}` is not supported yet"``.
    pub fn unsupported(feature: &str, param: &str) -> Self {
        Self::new(
            400,
            format!("`{feature}` is not supported yet"),
            INVALID_REQUEST,
        )
        .with_param(Some(param))
        .with_code("unsupported_feature")
    }
}

/// Parses a request body, mapping any serde failure (syntax, wrong type,
/// missing field, unknown enum value) to [`ApiError::invalid_json`] with serde's message.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(ApiError::invalid_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_exact_openai_shape() {
        let err = ApiError::invalid_request("bad", Some("temperature"));
        assert_eq!(
            err.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error",
                             "param": "temperature", "code": null}})
        );
        let err = ApiError::internal("boom");
        assert_eq!(
            err.body(),
            json!({"error": {"message": "boom", "type": "server_error",
                             "param": null, "code": null}})
        );
        assert_eq!(err.status, 500);
    }

    #[test]
    fn display_is_the_message() {
        assert_eq!(ApiError::internal("boom").to_string(), "boom");
    }

    #[test]
    fn model_not_found() {
        let err = ApiError::model_not_found("gpt-9");
        assert_eq!(err.status, 404);
        assert_eq!(err.message, "The model `gpt-9` does not exist.");
        assert_eq!(err.error_type, "invalid_request_error");
        assert_eq!(err.code.as_deref(), Some("model_not_found"));
    }

    #[test]
    fn context_length_exceeded_names_all_numbers() {
        let err = ApiError::context_length_exceeded(8000, 1000, 8192);
        assert_eq!(err.status, 400);
        assert_eq!(
            err.message,
            "This model's maximum context length is 8192 tokens. However, you requested 9000 \
             tokens (8000 in the messages, 1000 in the completion). Please reduce the length of \
             the messages or completion."
        );
        assert_eq!(err.param.as_deref(), Some("messages"));
        assert_eq!(err.code.as_deref(), Some("context_length_exceeded"));
    }

    #[test]
    fn statuses_and_types() {
        let cases = [
            (
                ApiError::payload_too_large(1024),
                413,
                "invalid_request_error",
            ),
            (
                ApiError::not_found("/v1/nope"),
                404,
                "invalid_request_error",
            ),
            (ApiError::method_not_allowed(), 405, "invalid_request_error"),
            (ApiError::overloaded("busy"), 503, "server_error"),
            (ApiError::internal("x"), 500, "server_error"),
            (
                ApiError::unsupported("tools", "tools"),
                400,
                "invalid_request_error",
            ),
        ];
        for (err, status, ty) in cases {
            assert_eq!(err.status, status, "{err:?}");
            assert_eq!(err.error_type, ty, "{err:?}");
        }
        assert!(ApiError::payload_too_large(1024).message.contains("1024"));
        assert!(ApiError::not_found("/v1/nope").message.contains("/v1/nope"));
    }

    #[test]
    fn unsupported_message_and_param() {
        let err = ApiError::unsupported("logprobs", "logprobs");
        assert_eq!(err.message, "`logprobs` is not supported yet");
        assert_eq!(err.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn parse_json_maps_syntax_and_type_errors() {
        let err = parse_json::<Value>(b"{not json").expect_err("syntax error");
        assert_eq!(err.status, 400);
        assert!(
            err.message.starts_with("Invalid JSON body: "),
            "{}",
            err.message
        );

        let err = parse_json::<u32>(b"\"seven\"").expect_err("type error");
        assert!(
            err.message.starts_with("Invalid JSON body: invalid type"),
            "{}",
            err.message
        );

        let ok: u32 = parse_json(b"7").expect("valid");
        assert_eq!(ok, 7);
    }
}
