//! The HTTP server loop every lastmile server runs (worker, gateway, sandboxes): an axum app
//! over HTTP/1.1 with the limits a public server needs and `axum::serve` does not set.
//!
//! - **Header read timeout**: a connection that has not sent a whole request head within
//!   [`ServeLimits::header_read_timeout`] of its first byte (or of the previous response, on a
//!   kept-alive connection) is closed — slowloris clients trickling header bytes cannot hold
//!   sockets forever.
//! - **Body idle timeout**: a request body that sends nothing for
//!   [`ServeLimits::body_idle_timeout`] fails (streamed uploads that keep moving are fine).
//! - **Connection cap**: at most [`ServeLimits::max_connections`] connections are served at
//!   once; past it, new ones wait in the kernel's backlog instead of taking file descriptors.
//!   At start the process's open-files limit is raised to its hard limit, and the cap is kept
//!   below it, so accepting never fails for lack of descriptors.
//! - **Graceful shutdown**: when `shutdown` resolves, the listener closes, idle connections end,
//!   and requests in flight finish.
//!
//! [`metrics`] is the one Prometheus writer every server's `/metrics` goes through, and
//! [`read_body`] the one way a handler reads a request body whole.

mod body;
pub mod metrics;

pub use body::read_body;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// A request extension every request carries: it turns `true` when the server starts shutting
/// down, so a handler streaming without end (an SSE feed) can end its stream and let the
/// shutdown finish.
#[derive(Clone, Debug)]
pub struct Draining(pub watch::Receiver<bool>);

impl Draining {
    /// Resolves once shutdown has begun.
    pub async fn started(mut self) {
        let _ = self.0.wait_for(|d| *d).await;
    }
}

/// Renders a refused request's error in its API's shape (OpenAI's or Anthropic's, by path).
pub type RenderError =
    fn(path: &str, error: &lastmile_protocol::ApiError) -> axum::response::Response;

/// What [`guard`] checks, and how it answers.
#[derive(Clone, Copy)]
pub struct Guard {
    /// The server listens on loopback only (the `Host` rule applies).
    pub loopback_only: bool,
    /// Also require JSON bodies on POST (off for APIs that take files).
    pub json_posts: bool,
    /// The answer's shape.
    pub render: RenderError,
}

/// Middleware refusing what a web page could send to drive a server on this machine (a foreign
/// `Host` on a loopback listener; a POST that is not JSON); see
/// `lastmile_protocol::request_guard`.
pub async fn guard(
    axum::extract::State(g): axum::extract::State<Guard>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use lastmile_protocol::request_guard::{check_host, check_request, RequestHead};
    let checked = {
        // An unreadable header value counts as present and wrong.
        let header = |name| req.headers().get(name).map(|v| v.to_str().unwrap_or("?"));
        let host = header(axum::http::header::HOST);
        if g.json_posts {
            let head = RequestHead {
                method: req.method().as_str(),
                host,
                content_type: header(axum::http::header::CONTENT_TYPE),
            };
            check_request(&head, g.loopback_only)
        } else {
            check_host(host, g.loopback_only)
        }
    };
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => (g.render)(req.uri().path(), &e),
    }
}

/// Descriptors kept free for everything but client connections (files, workers, etcd).
const RESERVED_FDS: u64 = 256;

/// The limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Longest time to receive a request head.
    pub header_read_timeout: Duration,
    /// Longest silence inside a request body.
    pub body_idle_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    /// 10 s for a head, 60 s of body silence, and as many connections as the open-files limit
    /// (raised to its hard limit) allows after a reserve, at most 16,384.
    fn default() -> Self {
        let fds = raise_fd_limit();
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(60),
            max_connections: fds.saturating_sub(RESERVED_FDS).clamp(64, 16_384) as usize,
        }
    }
}

/// Raises the soft open-files limit to the hard one; returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        if l.rlim_cur < l.rlim_max {
            let want = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
    }
    l.rlim_cur
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_idle_timeout,
    ));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Connections hold a receiver; shutdown is announced by dropping the sender, and done
    // when every receiver is gone.
    let (stop_tx, stop_rx) = watch::channel(());
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let draining = Draining(drain_rx.clone());
        let mut stop = stop_rx.clone();
        let header_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let svc = TowerToHyperService::new(app.map_request(
                move |req: axum::http::Request<Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(draining.clone());
                    req
                },
            ));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!("connection ended: {e}");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(stop);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    drop(stop_rx);
    let _ = stop_tx.send(());
    // Every connection task holds a receiver until it is done.
    stop_tx.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_leave_descriptors_in_reserve() {
        let l = ServeLimits::default();
        let fds = raise_fd_limit();
        assert!(l.max_connections as u64 <= fds.saturating_sub(RESERVED_FDS).max(64));
        assert!(l.header_read_timeout <= Duration::from_secs(30));
    }
}
