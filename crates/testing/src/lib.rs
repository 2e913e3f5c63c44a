//! Test support shared by the crates' integration tests (a dev-dependency only): reading a
//! server's `/metrics`, waiting for a condition with a deadline (never for a fixed time), free
//! ports, child processes killed on drop, and a real etcd server.
#![warn(missing_docs)]

mod etcd;

pub use etcd::EtcdServer;

use std::future::Future;
use std::process::Child;
use std::time::{Duration, Instant};

/// A server's `/metrics` page.
pub async fn metrics_page(server: &str) -> String {
    reqwest::get(format!("{server}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the /metrics body")
}

/// The value of one series (`name` or `name{labels}`, exactly as written) on a Prometheus text
/// page, if it is there.
pub fn series_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A series of a server's `/metrics`, if it is there.
pub async fn metric_value(server: &str, series: &str) -> Option<f64> {
    series_value(&metrics_page(server).await, series)
}

/// A counter of a server's `/metrics`: 0 while it has not been written (counters with labels
/// appear on their first increment).
pub async fn metric(server: &str, series: &str) -> u64 {
    metric_value(server, series).await.unwrap_or(0.0) as u64
}

/// The sum of a metric family's series over all their labels (`family{...} N` lines).
pub async fn metric_sum(server: &str, family: &str) -> u64 {
    let prefix = format!("{family}{{");
    metrics_page(server)
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it gives a value, and returns it; panics naming `what` after `within`.
pub async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits (up to `within`) until `url`'s `/health` answers 200.
pub async fn wait_healthy(url: &str, within: Duration) {
    wait_until(&format!("{url} healthy"), within, || async {
        let r = reqwest::get(format!("{url}/health")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
}

/// A local port nothing listens on now (for servers that cannot take port 0 and report theirs).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A child process, killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves on an ephemeral port from a runtime thread of its own (so the server outlives each
/// test's runtime): `serve` gets the listener; returns the base URL (`http://127.0.0.1:PORT`).
pub fn spawn_server<F>(serve: impl FnOnce(tokio::net::TcpListener) -> F + Send + 'static) -> String
where
    F: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = listener.local_addr().expect("address");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            serve(listener).await;
        });
    });
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_matched_exactly() {
        let page = "# TYPE a counter\na_total 3\na_total_other 9\nb{x=\"1\"} 2.5\n";
        assert_eq!(series_value(page, "a_total"), Some(3.0));
        assert_eq!(series_value(page, "b{x=\"1\"}"), Some(2.5));
        assert_eq!(series_value(page, "a"), None);
        assert_eq!(series_value(page, "c_total"), None);
    }
}
