//! How a decode worker reaches the blocks a prefill worker holds: the one seam between a pull
//! (which checks and imports what arrives, `disagg::pull`) and the wire. A transport opens the
//! held blocks as a byte stream in the `lastmile_engine::kv_transfer` format and lets them go
//! afterwards; everything else — checksums, layout, the prompt's own tokens, batching imports,
//! falling back to computing — is the pull's, whatever carries the bytes.
//!
//! HTTP (`GET /internal/kv/{lease}` on the prefill worker, with the internal token) is the
//! transport lastmile ships. An RDMA (NIXL, UCX) or same-host shared-memory transport implements
//! [`KvTransport`] and is given to the worker in `DisaggConfig::transport`.

use std::fmt;
use std::time::Duration;

use axum::body::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use lastmile_protocol::disagg::INTERNAL_TOKEN_HEADER;

/// The bytes of a KV stream as they arrive; an item that is an error ends it (the reader then
/// finds the stream cut).
pub type KvBytes = BoxStream<'static, Result<Bytes, TransportError>>;

/// Why a transport could not deliver (a pull then computes what it lacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    /// The holder could not be reached, or the connection broke.
    Unreachable,
    /// The holder answered that it would not send (the lease expired, a bad token).
    Refused,
}

/// A way to fetch held KV blocks from the worker that holds them.
pub trait KvTransport: Send + Sync + fmt::Debug {
    /// Opens the stream of the blocks held at `source` (the `x-lastmile-kv-source` the gateway
    /// named, as the prefill worker's reply made it).
    fn open<'a>(&'a self, source: &'a str) -> BoxFuture<'a, Result<KvBytes, TransportError>>;

    /// Lets the blocks held at `source` go (best effort: unreleased leases expire on their own).
    fn release(&self, source: &str);
}

/// The HTTP transport: `GET` the lease's URL for its stream, `DELETE` it to release it, both
/// with the internal token.
pub(crate) struct HttpTransport {
    http: reqwest::Client,
    token: String,
}

impl fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.write_str("HttpTransport")
    }
}

impl HttpTransport {
    pub(crate) fn new(token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            token: token.unwrap_or_default(),
        }
    }
}

impl KvTransport for HttpTransport {
    fn open<'a>(&'a self, source: &'a str) -> BoxFuture<'a, Result<KvBytes, TransportError>> {
        Box::pin(async move {
            let resp = self
                .http
                .get(source)
                .header(INTERNAL_TOKEN_HEADER, &self.token)
                .send()
                .await
                .map_err(|_| TransportError::Unreachable)?;
            if !resp.status().is_success() {
                return Err(TransportError::Refused);
            }
            Ok(resp
                .bytes_stream()
                .map(|chunk| chunk.map_err(|_| TransportError::Unreachable))
                .boxed())
        })
    }

    fn release(&self, source: &str) {
        let request = self
            .http
            .delete(source.split('?').next().unwrap_or(source))
            .header(INTERNAL_TOKEN_HEADER, &self.token)
            .timeout(Duration::from_secs(2));
        tokio::spawn(async move {
            let _ = request.send().await;
        });
    }
}
