//! The gateway's view of its workers: health and load from polling each worker's `/health`,
//! requests in flight through the gateway, and a circuit breaker per worker.
//!
//! Invariants: a worker receives new requests only while it is healthy and its breaker is
//! closed; the breaker opens after `breaker_failures` consecutive failures (connection refused,
//! failed health checks) and closes again on the next successful health check after the
//! cool-down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lastmile_router::WorkerLoad;

use crate::GatewayConfig;

/// What the gateway knows about one worker.
#[derive(Debug, Clone, Default)]
struct Status {
    /// The last health check succeeded.
    healthy: bool,
    running: usize,
    waiting: usize,
    consecutive_failures: u32,
    /// The breaker is open until then.
    open_until: Option<Instant>,
}

/// One worker.
pub(crate) struct Worker {
    pub(crate) url: String,
    status: Mutex<Status>,
    in_flight: AtomicUsize,
}

/// Decrements a worker's in-flight count when the response it belongs to is finished or dropped.
pub(crate) struct InFlight(Arc<Workers>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.list[self.1]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every worker, and the client used to reach them.
pub(crate) struct Workers {
    pub(crate) list: Vec<Worker>,
    pub(crate) client: reqwest::Client,
    breaker_failures: u32,
    breaker_cooldown: Duration,
}

impl Workers {
    pub(crate) fn new(config: &GatewayConfig) -> Self {
        Self {
            list: config
                .workers
                .iter()
                .map(|url| Worker {
                    url: url.trim_end_matches('/').to_string(),
                    status: Mutex::new(Status::default()),
                    in_flight: AtomicUsize::new(0),
                })
                .collect(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            breaker_failures: config.breaker_failures,
            breaker_cooldown: config.breaker_cooldown,
        }
    }

    fn status(&self, id: usize) -> std::sync::MutexGuard<'_, Status> {
        self.list[id]
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Load snapshots for the routing policy; `exclude` are workers already tried for this
    /// request.
    pub(crate) fn snapshot(&self, exclude: &[usize]) -> Vec<WorkerLoad> {
        let now = Instant::now();
        (0..self.list.len())
            .map(|id| {
                let s = self.status(id).clone();
                let open = s.open_until.is_some_and(|t| t > now);
                let in_flight = self.list[id].in_flight.load(Ordering::Relaxed);
                WorkerLoad {
                    id,
                    healthy: s.healthy && !open && !exclude.contains(&id),
                    // Requests sent since the last health check count as waiting.
                    running: s.running,
                    waiting: s.waiting.max(in_flight.saturating_sub(s.running)),
                    queued_prefill_tokens: 0,
                }
            })
            .collect()
    }

    /// Marks a request as in flight on `id` until the returned guard is dropped.
    pub(crate) fn start(self: &Arc<Self>, id: usize) -> InFlight {
        self.list[id].in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone(), id)
    }

    /// Records a failure to reach `id`; enough of them in a row open its breaker.
    pub(crate) fn failed(&self, id: usize) {
        let mut s = self.status(id);
        s.consecutive_failures += 1;
        if s.consecutive_failures >= self.breaker_failures {
            s.healthy = false;
            s.open_until = Some(Instant::now() + self.breaker_cooldown);
        }
    }

    /// Records that `id` answered.
    pub(crate) fn succeeded(&self, id: usize) {
        self.status(id).consecutive_failures = 0;
    }

    /// Requests in flight through the gateway on `id`.
    pub(crate) fn in_flight(&self, id: usize) -> usize {
        self.list[id].in_flight.load(Ordering::Relaxed)
    }

    /// Whether `id` takes traffic now (healthy, breaker closed).
    pub(crate) fn available(&self, id: usize) -> bool {
        let s = self.status(id);
        s.healthy && s.open_until.is_none_or(|t| t <= Instant::now())
    }

    /// Whether `id`'s breaker is open.
    pub(crate) fn breaker_open(&self, id: usize) -> bool {
        self.status(id)
            .open_until
            .is_some_and(|t| t > Instant::now())
    }

    /// Checks every worker's `/health` once.
    pub(crate) async fn check_all(&self) {
        let checks = (0..self.list.len()).map(|id| self.check(id));
        futures::future::join_all(checks).await;
    }

    async fn check(&self, id: usize) {
        let url = format!("{}/health", self.list[id].url);
        let reply = self
            .client
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        let body = match reply {
            Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
            _ => None,
        };
        let Some(body) = body else {
            self.status(id).healthy = false;
            self.failed(id);
            return;
        };
        let count = |k: &str| body.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let mut s = self.status(id);
        s.healthy = true;
        s.running = count("running");
        s.waiting = count("waiting");
        s.consecutive_failures = 0;
        if s.open_until.is_some_and(|t| t <= Instant::now()) {
            s.open_until = None;
        }
    }

    /// Polls every worker's health forever, starting one interval from now.
    pub(crate) async fn poll(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.check_all().await;
        }
    }
}
