//! The gateway's view of its workers: health and load from polling each worker's `/health`,
//! requests in flight through the gateway, and a circuit breaker per worker.
//!
//! Invariants: a worker receives new requests only while it is healthy and its breaker is
//! closed; the breaker opens after `breaker_failures` consecutive failures (connection refused,
//! failed health checks) and closes again on the next successful health check after the
//! cool-down.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
    /// Prompt tokens it reported still to compute.
    queued_prefill_tokens: usize,
    /// Its recent p90 time to first token and inter-token gap, in ms, when it has served
    /// requests lately.
    ttft_p90_ms: Option<f64>,
    itl_p90_ms: Option<f64>,
    /// Its part in disaggregated serving, from its health report.
    role: lastmile_protocol::WorkerRole,
    consecutive_failures: u32,
    /// The breaker is open until then.
    open_until: Option<Instant>,
}

/// One worker. A worker that leaves discovery stays in the list, unlisted, and takes its id
/// (position) back if it registers again, unless a new address has taken that slot meanwhile
/// (slots of departed workers with nothing in flight are reused, so the list stays as long as
/// the most workers ever listed at once).
pub(crate) struct Worker {
    pub(crate) url: String,
    status: Mutex<Status>,
    in_flight: AtomicUsize,
    /// Requests routed to it.
    pub(crate) routed: AtomicU64,
    /// Prompt tokens (predicted uncached) of requests routed to it since its last health
    /// report: load it has been given but has not reported yet.
    recent_prefill: AtomicUsize,
    /// Its discovery source lists it (static workers always are).
    listed: AtomicBool,
    /// The model it serves (from its health report, or from the controller that started it);
    /// `None` until known, when it is a candidate for any model.
    model: RwLock<Option<String>>,
    /// Its context window in tokens, from its health report (0 until reported).
    context_length: AtomicU64,
}

impl Worker {
    fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            status: Mutex::new(Status::default()),
            in_flight: AtomicUsize::new(0),
            routed: AtomicU64::new(0),
            recent_prefill: AtomicUsize::new(0),
            listed: AtomicBool::new(true),
            model: RwLock::new(None),
            context_length: AtomicU64::new(0),
        }
    }

    /// Whether it may serve requests for `model` (`None`: the request names no model).
    pub(crate) fn serves(&self, model: Option<&str>) -> bool {
        match (
            model,
            &*self.model.read().unwrap_or_else(|e| e.into_inner()),
        ) {
            (Some(want), Some(has)) => want == has,
            _ => true,
        }
    }

    /// The model it serves, when known.
    pub(crate) fn model(&self) -> Option<String> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_model(&self, model: &str) {
        let mut m = self.model.write().unwrap_or_else(|e| e.into_inner());
        if m.as_deref() != Some(model) {
            *m = Some(model.to_string());
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests in flight through the gateway.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether it takes traffic now (listed, healthy, breaker closed).
    pub(crate) fn available(&self) -> bool {
        let s = self.status();
        self.listed.load(Ordering::Relaxed)
            && s.healthy
            && s.open_until.is_none_or(|t| t <= Instant::now())
    }

    /// Whether its last health check succeeded.
    pub(crate) fn healthy(&self) -> bool {
        self.status().healthy
    }

    /// Whether its breaker is open.
    pub(crate) fn breaker_open(&self) -> bool {
        self.status().open_until.is_some_and(|t| t > Instant::now())
    }

    /// Its recent p90 time to first token and inter-token gap (ms), as it last reported.
    pub(crate) fn latency_p90_ms(&self) -> LatencyP90 {
        let s = self.status();
        LatencyP90 {
            ttft_ms: s.ttft_p90_ms,
            itl_ms: s.itl_p90_ms,
        }
    }

    /// Its context window in tokens, once reported.
    pub(crate) fn context_length(&self) -> Option<u64> {
        Some(self.context_length.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// Whether its discovery source lists it.
    pub(crate) fn listed(&self) -> bool {
        self.listed.load(Ordering::Relaxed)
    }
}

/// A worker's recent p90 latencies (ms), when it has served requests lately.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LatencyP90 {
    pub(crate) ttft_ms: Option<f64>,
    pub(crate) itl_ms: Option<f64>,
}

/// Decrements a worker's in-flight count when the response it belongs to is finished or dropped
/// (and wakes the activator's waiters: capacity was freed).
pub(crate) struct InFlight(Arc<Worker>, Arc<tokio::sync::Notify>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.1.notify_waiters();
    }
}

/// The most bytes the gateway reads of a worker's answer to `/health`, or of a refused prefill's
/// error object.
pub(crate) const SMALL_REPLY: usize = 64 << 10;
/// The most bytes of a worker's `/v1/models` list or prefill reply.
pub(crate) const LIST_REPLY: usize = 1 << 20;

/// Reads a worker's reply as JSON, at most `cap` bytes of it: a worker is not trusted to end
/// its body (a broken or hostile one could stream without end), so a longer body is given up
/// as unreadable instead of buffered.
pub(crate) async fn json_capped<T: serde::de::DeserializeOwned>(
    reply: reqwest::Response,
    cap: usize,
) -> Option<T> {
    use futures::StreamExt;
    if reply.content_length().is_some_and(|n| n > cap as u64) {
        return None;
    }
    let mut body = Vec::new();
    let mut chunks = reply.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.ok()?;
        if body.len() + chunk.len() > cap {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).ok()
}

/// Every worker, and the client used to reach them.
pub(crate) struct Workers {
    list: RwLock<Vec<Arc<Worker>>>,
    pub(crate) client: reqwest::Client,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    /// Wakes everyone waiting for a worker to become available or to finish a request (the
    /// activator).
    pub(crate) became_available: Arc<tokio::sync::Notify>,
}

impl Workers {
    pub(crate) fn new(config: &GatewayConfig) -> Self {
        Self {
            list: RwLock::new(
                config
                    .workers
                    .iter()
                    .map(|url| Arc::new(Worker::new(url)))
                    .collect(),
            ),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            breaker_failures: config.breaker_failures,
            breaker_cooldown: config.breaker_cooldown,
            became_available: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Every worker ever known, listed or not; a worker's id is its position.
    pub(crate) fn all(&self) -> Vec<Arc<Worker>> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Worker `id`.
    pub(crate) fn get(&self, id: usize) -> Arc<Worker> {
        self.list.read().unwrap_or_else(|e| e.into_inner())[id].clone()
    }

    /// Adds (or lists again) the worker at `url`; returns its id and whether it was not listed
    /// before.
    pub(crate) fn add(&self, url: &str) -> (usize, bool) {
        let url = url.trim_end_matches('/');
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = list.iter().position(|w| w.url == url) {
            let was = list[id].listed.swap(true, Ordering::Relaxed);
            return (id, !was);
        }
        // A new address takes the slot of one that left and has nothing in flight: replicas
        // come and go on fresh ports, and the list must not grow with every one.
        if let Some(id) = list.iter().position(|w| !w.listed() && w.in_flight() == 0) {
            list[id] = Arc::new(Worker::new(url));
            return (id, true);
        }
        list.push(Arc::new(Worker::new(url)));
        (list.len() - 1, true)
    }

    /// Adds the worker at `url`, serving `model`, known healthy now (its supervisor just saw
    /// it answer), and wakes requests waiting for one; returns its id and whether it is new
    /// to rotation.
    pub(crate) fn add_ready(&self, url: &str, model: &str) -> (usize, bool) {
        let (id, new) = self.add(url);
        let w = self.get(id);
        w.set_model(model);
        {
            let mut s = w.status();
            s.healthy = true;
            s.consecutive_failures = 0;
            s.open_until = None;
        }
        self.became_available.notify_waiters();
        (id, new)
    }

    /// Takes the worker at `url` out of rotation (its discovery entry is gone); returns its id
    /// if it was listed.
    pub(crate) fn unlist(&self, url: &str) -> Option<usize> {
        let url = url.trim_end_matches('/');
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        let id = list.iter().position(|w| w.url == url)?;
        let w = &list[id];
        w.status().healthy = false;
        w.listed.swap(false, Ordering::Relaxed).then_some(id)
    }

    /// Load snapshots for the routing policy; `exclude` are workers already tried for this
    /// request, and only workers serving `model` are candidates.
    pub(crate) fn snapshot(&self, exclude: &[usize], model: Option<&str>) -> Vec<WorkerLoad> {
        self.all()
            .iter()
            .enumerate()
            .map(|(id, w)| {
                let s = w.status().clone();
                // Prefill workers take prompts from the gateway, not requests.
                let available = w.available() && w.serves(model) && s.role.decodes();
                let in_flight = w.in_flight();
                WorkerLoad {
                    id,
                    healthy: available && !exclude.contains(&id),
                    // Requests sent since the last health check count as waiting.
                    running: s.running,
                    waiting: s.waiting.max(in_flight.saturating_sub(s.running)),
                    queued_prefill_tokens: s.queued_prefill_tokens
                        + w.recent_prefill.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Load snapshots of the prefill workers serving `model`, for choosing where a prompt is
    /// computed: only available ones with fewer than `max_queue_tokens` prompt tokens still to
    /// compute are candidates.
    pub(crate) fn prefill_snapshot(
        &self,
        model: Option<&str>,
        max_queue_tokens: usize,
    ) -> Vec<WorkerLoad> {
        self.all()
            .iter()
            .enumerate()
            .map(|(id, w)| {
                let s = w.status().clone();
                let queued = s.queued_prefill_tokens + w.recent_prefill.load(Ordering::Relaxed);
                WorkerLoad {
                    id,
                    healthy: w.available()
                        && w.serves(model)
                        && s.role == lastmile_protocol::WorkerRole::Prefill
                        && queued < max_queue_tokens,
                    running: s.running,
                    waiting: s.waiting.max(w.in_flight().saturating_sub(s.running)),
                    queued_prefill_tokens: queued,
                }
            })
            .collect()
    }

    /// Whether any available worker serving `model` has the prefill role.
    pub(crate) fn any_prefill_worker(&self, model: Option<&str>) -> bool {
        self.all().iter().any(|w| {
            w.available()
                && w.serves(model)
                && w.status().role == lastmile_protocol::WorkerRole::Prefill
        })
    }

    /// Marks a request as in flight on `id` until the returned guard is dropped; counts the
    /// routing decision and the prompt tokens it is predicted to compute there.
    pub(crate) fn start(&self, id: usize, prefill_tokens: usize) -> InFlight {
        let w = self.get(id);
        w.in_flight.fetch_add(1, Ordering::Relaxed);
        w.routed.fetch_add(1, Ordering::Relaxed);
        w.recent_prefill
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        InFlight(w, self.became_available.clone())
    }

    /// Takes back `prefill_tokens` of the prompt load [`Workers::start`] predicted for `id`:
    /// another worker computes that prompt (disaggregation).
    pub(crate) fn prefilled_elsewhere(&self, id: usize, prefill_tokens: usize) {
        let _ =
            self.get(id)
                .recent_prefill
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(prefill_tokens))
                });
    }

    /// Records a failure to reach `id`; enough of them in a row open its breaker.
    pub(crate) fn failed(&self, id: usize) {
        let w = self.get(id);
        let mut s = w.status();
        s.consecutive_failures += 1;
        if s.consecutive_failures >= self.breaker_failures {
            s.healthy = false;
            s.open_until = Some(Instant::now() + self.breaker_cooldown);
        }
    }

    /// Records that `id` answered.
    pub(crate) fn succeeded(&self, id: usize) {
        self.get(id).status().consecutive_failures = 0;
    }

    /// Checks every listed worker's `/health` once.
    pub(crate) async fn check_all(&self) {
        let checks = (0..self.all().len()).map(|id| self.check(id));
        futures::future::join_all(checks).await;
    }

    /// Checks worker `id`'s `/health` (unlisted workers are left alone).
    pub(crate) async fn check(&self, id: usize) {
        let w = self.get(id);
        if !w.listed() {
            return;
        }
        let reply = self
            .client
            .get(format!("{}/health", w.url))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        let body = match reply {
            Ok(r) if r.status().is_success() => {
                json_capped::<serde_json::Value>(r, SMALL_REPLY).await
            }
            _ => None,
        };
        let Some(body) = body else {
            w.status().healthy = false;
            self.failed(id);
            return;
        };
        let count = |k: &str| body.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        if let Some(model) = body.get("model").and_then(|v| v.as_str()) {
            w.set_model(model);
        }
        if let Some(ctx) = body.get("context_length").and_then(|v| v.as_u64()) {
            w.context_length.store(ctx, Ordering::Relaxed);
        }
        let mut s = w.status();
        let was_healthy = std::mem::replace(&mut s.healthy, true);
        s.running = count("running");
        s.waiting = count("waiting");
        s.queued_prefill_tokens = count("queued_prefill_tokens");
        s.ttft_p90_ms = body.get("ttft_p90_ms").and_then(|v| v.as_f64());
        s.itl_p90_ms = body.get("itl_p90_ms").and_then(|v| v.as_f64());
        s.role = body
            .get("role")
            .and_then(|v| v.as_str())
            .and_then(|r| r.parse().ok())
            .unwrap_or_default();
        // The report covers what was routed before it was asked for.
        w.recent_prefill.store(0, Ordering::Relaxed);
        s.consecutive_failures = 0;
        if s.open_until.is_some_and(|t| t <= Instant::now()) {
            s.open_until = None;
        }
        drop(s);
        if !was_healthy {
            self.became_available.notify_waiters();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_prompt_tokens_count_as_load_until_the_next_report() {
        let w = Workers::new(&GatewayConfig::new(vec![
            "http://a".into(),
            "http://b/".into(),
        ]));
        let g1 = w.start(0, 300);
        let _g2 = w.start(0, 200);
        let snap = w.snapshot(&[], None);
        assert_eq!(snap[0].queued_prefill_tokens, 500);
        assert_eq!(snap[0].waiting, 2, "in flight, not yet reported running");
        assert_eq!(snap[1].queued_prefill_tokens, 0);
        // A prompt another worker computes is not this one's load (and never goes below zero).
        w.prefilled_elsewhere(0, 200);
        assert_eq!(w.snapshot(&[], None)[0].queued_prefill_tokens, 300);
        w.prefilled_elsewhere(0, 1000);
        assert_eq!(w.snapshot(&[], None)[0].queued_prefill_tokens, 0);
        drop(g1);
        assert_eq!(w.get(0).in_flight(), 1);
        assert_eq!(w.get(0).routed.load(Ordering::Relaxed), 2);
        // Discovery: an address is one worker whatever its trailing slash; unlisting takes it out
        // of rotation and listing it again brings the same id back.
        assert_eq!(w.add("http://b"), (1, false));
        assert_eq!(w.unlist("http://b/"), Some(1));
        assert!(!w.get(1).listed() && !w.get(1).available());
        assert_eq!(w.unlist("http://b"), None, "already unlisted");
        assert_eq!(w.add("http://b"), (1, true));
        assert_eq!(w.add("http://c"), (2, true));
        // A departed worker's slot goes to the next new address; the list does not grow.
        assert_eq!(w.unlist("http://c"), Some(2));
        assert_eq!(w.add("http://d"), (2, true));
        assert_eq!(w.get(2).url, "http://d");
        assert_eq!(w.all().len(), 3);
    }
}
