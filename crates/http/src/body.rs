//! Reading a request body whole, up to a size limit: the one place a body that is too large
//! (413) is told apart from one that failed to arrive (400: the client aborted, the connection
//! broke, the body went idle past its timeout). The two are told apart by the error's type,
//! never by its text.

use axum::body::{Body, Bytes};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use lastmile_protocol::ApiError;

/// The whole body, if it is at most `limit` bytes: otherwise 413 `payload_too_large`, and 400
/// `invalid_request_error` when reading it failed for any other reason.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Err(e) => Err(ApiError::invalid_request(
            format!("could not read the request body: {e}"),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;

    use super::*;

    /// A body that sends `first`, then fails as a client that went away mid-body does.
    fn aborted_body(first: &'static [u8]) -> Body {
        Body::from_stream(stream::iter([
            Ok(Bytes::from_static(first)),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
        ]))
    }

    /// A body of `chunks` pieces of `size` bytes with no declared length (chunked transfer).
    fn chunked(chunks: usize, size: usize) -> Body {
        let piece = Bytes::from(vec![b'a'; size]);
        Body::from_stream(stream::iter(
            (0..chunks).map(move |_| Ok::<_, std::io::Error>(piece.clone())),
        ))
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let body = read_body(Body::from("{\"a\": 1}"), 8).await.expect("fits");
        assert_eq!(&body[..], b"{\"a\": 1}");
        let body = read_body(chunked(4, 4), 16).await.expect("fits");
        assert_eq!(body.len(), 16);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_whether_declared_or_streamed() {
        for body in [Body::from(vec![b'a'; 17]), chunked(5, 4)] {
            let err = read_body(body, 16).await.expect_err("too large");
            assert_eq!(err.status, 413, "{err:?}");
            assert_eq!(err.code.as_deref(), Some("payload_too_large"));
        }
    }

    /// Regression: a client that aborted mid-body was answered 413 by the gateway.
    #[tokio::test]
    async fn a_body_that_fails_to_arrive_is_400_not_413() {
        let err = read_body(aborted_body(b"{\"model\""), 1 << 20)
            .await
            .expect_err("aborted");
        assert_eq!(err.status, 400, "{err:?}");
        assert_eq!(err.error_type, "invalid_request_error");
        assert!(
            err.message.starts_with("could not read the request body"),
            "{}",
            err.message
        );
        assert_eq!(err.code, None);
    }
}
