//! Prometheus metrics of the gateway: routing decisions and requests in flight per worker,
//! retries, worker availability and breaker state, and the time the gateway itself adds (reading
//! the body, choosing a worker, relaying the head: everything but waiting for the worker).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lastmile_http::metrics::{Exposition, Histogram, Labels};
use lastmile_router::{KvIndex, PolicyKind};

use crate::workers::{Worker, Workers};

/// Bounds of the overhead histogram, seconds (100 µs to 50 ms).
const OVERHEAD_BOUNDS: [f64; 8] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05];

/// Counters kept in atomics, and the overhead histogram.
pub(crate) struct Metrics {
    overlap_blocks: AtomicU64,
    pub(crate) retries: AtomicU64,
    overhead: Histogram,
    /// Disaggregation decisions and outcomes.
    pub(crate) disagg: crate::disagg::DisaggMetrics,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Self {
            overlap_blocks: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            overhead: Histogram::new(&OVERHEAD_BOUNDS),
            disagg: Default::default(),
        }
    }

    /// Records the cached prompt blocks a routing decision predicted on its worker (the
    /// decision itself is counted on the worker).
    pub(crate) fn routed(&self, overlap_blocks: usize) {
        self.overlap_blocks
            .fetch_add(overlap_blocks as u64, Ordering::Relaxed);
    }

    /// Records the gateway's own time for one request (its total minus the workers' time).
    pub(crate) fn observe_overhead(&self, d: Duration) {
        self.overhead.observe(d.as_secs_f64());
    }

    /// Requests the activator holds per deployment, and its totals (nothing without
    /// deployments).
    pub(crate) fn render_activator(
        &self,
        page: &mut Exposition,
        deployments: &[crate::DeploymentRoute],
        activator: &crate::activator::Activator,
    ) {
        if deployments.is_empty() {
            return;
        }
        page.gauges(
            "lastmile_activator_waiting",
            "Requests held while their deployment has no ready replica.",
            deployments.iter().map(|d| {
                (
                    vec![("deployment", d.name.clone())],
                    activator.waiting(&d.name) as u64,
                )
            }),
        )
        .counter(
            "lastmile_activator_held_total",
            "Requests that waited for a replica.",
            activator.activated.load(Ordering::Relaxed),
        )
        .counter(
            "lastmile_activator_rejected_total",
            "Requests turned away with 503: queue full or no replica in time.",
            activator.rejected.load(Ordering::Relaxed),
        );
    }

    /// Routing, availability and overhead (worker URLs are label values).
    pub(crate) fn render(
        &self,
        page: &mut Exposition,
        workers: &Workers,
        policy: PolicyKind,
        index: &KvIndex,
    ) {
        let policy = policy.name();
        let all = workers.all();
        let by_worker = |w: &Worker| -> Labels { vec![("worker", w.url.clone())] };
        let per_worker = |v: &dyn Fn(&Worker) -> u64| -> Vec<(Labels, u64)> {
            all.iter().map(|w| (by_worker(w), v(w))).collect()
        };
        page.counters(
            "lastmile_gateway_routed_total",
            "Requests sent to each worker, by policy.",
            all.iter().map(|w| {
                let mut labels = by_worker(w);
                labels.push(("policy", policy.to_string()));
                (labels, w.routed.load(Ordering::Relaxed))
            }),
        )
        .gauges(
            "lastmile_gateway_in_flight",
            "Requests in flight through the gateway per worker.",
            per_worker(&|w| w.in_flight() as u64),
        )
        .gauges(
            "lastmile_gateway_worker_listed",
            "Worker listed by its discovery source (1; static workers always are) or gone (0).",
            per_worker(&|w| u64::from(w.listed())),
        )
        .gauges(
            "lastmile_gateway_worker_available",
            "Worker listed, healthy and with its breaker closed (1) or not (0).",
            per_worker(&|w| u64::from(w.available())),
        )
        .gauges(
            "lastmile_gateway_breaker_open",
            "Worker's circuit breaker open (1) or closed (0).",
            per_worker(&|w| u64::from(w.breaker_open())),
        )
        .gauges(
            "lastmile_gateway_indexed_blocks",
            "KV blocks the routing index holds for each worker (kv_aware).",
            all.iter()
                .enumerate()
                .map(|(id, w)| (by_worker(w), index.blocks_of(id) as u64)),
        )
        .counter(
            "lastmile_gateway_predicted_overlap_blocks_total",
            "Prompt blocks the chosen workers were predicted to hold (kv_aware).",
            self.overlap_blocks.load(Ordering::Relaxed),
        )
        .counter(
            "lastmile_gateway_retries_total",
            "Requests resent to another worker after a connection failure.",
            self.retries.load(Ordering::Relaxed),
        )
        .histogram(
            "lastmile_gateway_overhead_seconds",
            "Time the gateway adds per request, the workers' own time excluded.",
            &self.overhead,
        );
    }
}
