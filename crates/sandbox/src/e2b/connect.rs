//! Connect-RPC with the JSON codec, as E2B's SDKs speak it to the in-sandbox daemon.
//!
//! - Unary: `POST /<service>/<Method>`, `application/json` body in and out; an error is a
//!   non-200 status with `{"code": "not_found", "message"}`.
//! - Streaming: `application/connect+json`; each message is an envelope (`flags: u8`,
//!   big-endian `u32` length, JSON); a server stream ends with an envelope of flag `0x02`
//!   holding `{}` or `{"error": {...}}`, always under HTTP 200.
//!
//! Messages are proto3 JSON: camelCase names, `bytes` as base64, 64-bit integers as strings.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::wire::Failure;

/// The largest request message accepted (stdin chunks and paths are small).
pub const MAX_MESSAGE: usize = 4 << 20;
/// Envelope flag of the last message of a stream.
const END_STREAM: u8 = 0x02;

/// An RPC error: a Connect code and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError {
    /// Connect's code name (`not_found`, `invalid_argument`, …).
    pub code: &'static str,
    /// What happened.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status Connect gives the code.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

impl From<Failure> for RpcError {
    fn from(f: Failure) -> Self {
        let code = match f.code.as_str() {
            "not_found" => "not_found",
            "already_exists" => "already_exists",
            "invalid_argument" => "invalid_argument",
            "permission_denied" => "permission_denied",
            "resource_exhausted" => "resource_exhausted",
            "unavailable" => "unavailable",
            "canceled" => "canceled",
            _ => "internal",
        };
        Self::new(code, f.message)
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.json())).into_response()
    }
}

/// Parses a unary request body.
pub fn unary_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    if body.len() > MAX_MESSAGE {
        return Err(RpcError::new("resource_exhausted", "message too large"));
    }
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    serde_json::from_slice(body).map_err(|e| RpcError::new("invalid_argument", e.to_string()))
}

/// A unary answer.
pub fn unary_response(v: serde_json::Value) -> Response {
    axum::Json(v).into_response()
}

/// A unary answer or its error.
pub fn reply(r: Result<serde_json::Value, RpcError>) -> Response {
    match r {
        Ok(v) => unary_response(v),
        Err(e) => e.into_response(),
    }
}

/// Splits enveloped messages off the front of `buf`; returns the JSON payloads and how many
/// bytes they took. Compressed envelopes are refused (the SDKs send none).
pub fn envelopes(buf: &[u8]) -> Result<(Vec<&[u8]>, usize), RpcError> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 5 {
        let flags = buf[at];
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(RpcError::new("resource_exhausted", "message too large"));
        }
        if flags & 0x01 != 0 {
            return Err(RpcError::new(
                "unimplemented",
                "compressed messages are not supported",
            ));
        }
        if buf.len() - at - 5 < len {
            break;
        }
        out.push(&buf[at + 5..at + 5 + len]);
        at += 5 + len;
    }
    Ok((out, at))
}

/// Parses the one message of a server-streaming request.
pub fn stream_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let (msgs, used) = envelopes(body)?;
    match (msgs.as_slice(), used == body.len()) {
        ([one], true) => serde_json::from_slice(one)
            .map_err(|e| RpcError::new("invalid_argument", e.to_string())),
        _ => Err(RpcError::new(
            "invalid_argument",
            "expected exactly one enveloped message",
        )),
    }
}

/// One envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + payload.len());
    b.push(flags);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    Bytes::from(b)
}

/// The sending side of a server stream: messages, then [`StreamTx::finish`].
pub struct StreamTx(mpsc::Sender<Result<Bytes, Infallible>>);

impl StreamTx {
    /// Sends one message; `false` once the client has gone.
    pub async fn send(&self, msg: &serde_json::Value) -> bool {
        let payload = serde_json::to_vec(msg).unwrap_or_default();
        self.0.send(Ok(envelope(0, &payload))).await.is_ok()
    }

    /// Ends the stream, with an error or without.
    pub async fn finish(self, error: Option<RpcError>) {
        let end = match error {
            None => serde_json::json!({}),
            Some(e) => serde_json::json!({ "error": e.json() }),
        };
        let payload = serde_json::to_vec(&end).unwrap_or_default();
        let _ = self.0.send(Ok(envelope(END_STREAM, &payload))).await;
    }

    /// Whether the client has gone.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// A streaming response and its sender.
pub fn server_stream() -> (StreamTx, Response) {
    let (tx, rx) = mpsc::channel(16);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    (StreamTx(tx), resp)
}

/// A stream that is only its end: how a streaming call fails before it starts.
pub async fn stream_error(e: RpcError) -> Response {
    let (tx, resp) = server_stream();
    tokio::spawn(tx.finish(Some(e)));
    resp
}

/// The deadline the client gave (`connect-timeout-ms`), if any.
pub fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// How often to send keepalive messages (`Keepalive-Ping-Interval`, seconds; default 50).
pub fn keepalive(headers: &HeaderMap) -> std::time::Duration {
    let s = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(50)
        .clamp(1, 3600);
    std::time::Duration::from_secs(s)
}

/// `bytes` in proto3 JSON.
pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `bytes` from proto3 JSON (standard or URL-safe, padded or not).
pub fn from_b64(s: &str) -> Result<Vec<u8>, RpcError> {
    use base64::Engine;
    let t = s.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(t)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
        .map_err(|e| RpcError::new("invalid_argument", format!("bad base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_and_refuse_what_they_must() {
        let mut buf = envelope(0, b"{\"a\":1}").to_vec();
        buf.extend_from_slice(&envelope(0, b"{}"));
        buf.extend_from_slice(&[0, 0, 0]); // a partial header stays for later
        let (msgs, used) = envelopes(&buf).unwrap();
        assert_eq!(msgs, vec![&b"{\"a\":1}"[..], &b"{}"[..]]);
        assert_eq!(used, buf.len() - 3);
        assert!(envelopes(&envelope(1, b"x")).is_err());
        let mut huge = vec![0u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(envelopes(&huge).is_err());
        let one: serde_json::Value = stream_request(&envelope(0, b"{\"x\":2}")).unwrap();
        assert_eq!(one["x"], 2);
        assert!(stream_request::<serde_json::Value>(&buf).is_err());
    }

    #[test]
    fn codes_map_to_connect_statuses() {
        assert_eq!(
            RpcError::new("not_found", "").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            RpcError::new("already_exists", "").status(),
            StatusCode::CONFLICT
        );
        assert_eq!(
            RpcError::new("unimplemented", "").status(),
            StatusCode::NOT_IMPLEMENTED
        );
    }

    #[test]
    fn base64_round_trips_both_alphabets() {
        let data = b"\xff\xfe hello";
        assert_eq!(from_b64(&b64(data)).unwrap(), data);
        assert_eq!(from_b64("__4").unwrap(), vec![0xff, 0xfe]);
        assert!(from_b64("!!").is_err());
    }
}
