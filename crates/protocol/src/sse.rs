//! Server-sent-event framing for streamed responses.
//!
//! Each event is a single `data:` line followed by a blank line. Compact JSON
//! escapes newlines inside strings, so one payload never spans lines. A stream
//! ends with [`SSE_DONE`].

use serde::Serialize;

use crate::error::ApiError;

/// The terminator OpenAI clients wait for.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Frames `value` as one event: `data: {compact json}\n\n`.
///
/// Serializing the protocol's own types cannot fail; should a caller's type
/// fail, the event carries an internal-error body instead, so a stream is
/// never cut without a word.
pub fn sse_event<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_string(value).unwrap_or_else(|e| {
        ApiError::internal(format!("failed to serialize stream event: {e}"))
            .body()
            .to_string()
    });
    format!("data: {json}\n\n")
}

/// The payloads of the `data:` fields in an SSE body, one per event.
///
/// Follows the SSE rules that matter for clients and tests: `\n`, `\r\n` or `\r`
/// line ends; one optional space after the colon; several `data:` lines in one
/// event joined by `\n`; comments and other fields ignored. A final event
/// without its closing blank line is still returned.
pub fn parse_sse_data(body: &str) -> Vec<String> {
    let mut events = Vec::new();
    let mut pending: Option<String> = None;
    let normalized = body.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            events.extend(pending.take());
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field != "data" {
            continue;
        }
        match &mut pending {
            Some(data) => {
                data.push('\n');
                data.push_str(value);
            }
            None => pending = Some(value.to_owned()),
        }
    }
    events.extend(pending);
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatCompletionChunk;
    use crate::sampling::{FinishReason, ResponseMeta, Usage};
    use serde_json::{json, Value};

    #[test]
    fn event_framing() {
        assert_eq!(sse_event(&json!({"a": 1})), "data: {\"a\":1}\n\n");
        assert_eq!(
            sse_event(&json!("line1\nline2")),
            "data: \"line1\\nline2\"\n\n"
        );
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
    }

    #[test]
    fn serialization_failure_becomes_error_event() {
        use std::collections::BTreeMap;
        let mut bad = BTreeMap::new();
        bad.insert(vec![1u8], 1); // non-string map keys cannot be JSON
        let event = sse_event(&bad);
        let payloads = parse_sse_data(&event);
        let v: Value = serde_json::from_str(&payloads[0]).expect("json");
        assert_eq!(v["error"]["type"], json!("server_error"));
    }

    #[test]
    fn parse_round_trips_a_stream() {
        let m = ResponseMeta::new("chatcmpl-1", 1, "m");
        let chunks = [
            ChatCompletionChunk::role(&m),
            ChatCompletionChunk::content(&m, "multi\nline"),
            ChatCompletionChunk::finish(&m, FinishReason::Stop),
            ChatCompletionChunk::usage(&m, Usage::new(1, 2)),
        ];
        let mut body: String = chunks.iter().map(sse_event).collect();
        body.push_str(SSE_DONE);
        let payloads = parse_sse_data(&body);
        assert_eq!(payloads.len(), 5);
        assert_eq!(payloads[4], "[DONE]");
        for (payload, chunk) in payloads.iter().zip(&chunks) {
            let back: ChatCompletionChunk = serde_json::from_str(payload).expect("de");
            assert_eq!(&back, chunk);
        }
    }

    #[test]
    fn parse_follows_sse_rules() {
        let body =
            ": keep-alive\r\n\r\nevent: message\r\ndata:a\r\ndata: b\r\nid: 3\r\n\r\ndata: last";
        assert_eq!(
            parse_sse_data(body),
            vec!["a\nb".to_string(), "last".to_string()]
        );
        assert_eq!(parse_sse_data("data:\n\n"), vec![String::new()]);
        assert!(parse_sse_data("").is_empty());
        assert!(parse_sse_data("\n\n: comment\n\n").is_empty());
    }
}
