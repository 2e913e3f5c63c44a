//! Prometheus metrics of the gateway: routing decisions and requests in flight per worker,
//! retries, worker availability and breaker state, and the time the gateway itself adds (reading
//! the body, choosing a worker, relaying the head: everything but waiting for the worker).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lastmile_router::{KvIndex, PolicyKind};

use crate::workers::{Worker, Workers};

const OVERHEAD_BOUNDS_US: [u64; 8] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000];

/// Counters kept in atomics.
pub(crate) struct Metrics {
    overlap_blocks: AtomicU64,
    pub(crate) retries: AtomicU64,
    overhead_buckets: [AtomicU64; 8],
    overhead_count: AtomicU64,
    overhead_sum_us: AtomicU64,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Self {
            overlap_blocks: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            overhead_buckets: Default::default(),
            overhead_count: AtomicU64::new(0),
            overhead_sum_us: AtomicU64::new(0),
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
        let us = d.as_micros() as u64;
        for (b, c) in OVERHEAD_BOUNDS_US.iter().zip(&self.overhead_buckets) {
            if us <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.overhead_count.fetch_add(1, Ordering::Relaxed);
        self.overhead_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Requests the activator holds per deployment, and its totals.
    pub(crate) fn render_activator(
        &self,
        deployments: &[crate::DeploymentRoute],
        activator: &crate::activator::Activator,
    ) -> String {
        let mut out = String::new();
        if deployments.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "# HELP lastmile_activator_waiting Requests held while their deployment has no ready \
             replica.\n# TYPE lastmile_activator_waiting gauge"
        );
        for d in deployments {
            let _ = writeln!(
                out,
                "lastmile_activator_waiting{{deployment=\"{}\"}} {}",
                d.name,
                activator.waiting(&d.name)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lastmile_activator_held_total Requests that waited for a replica.\n# TYPE \
             lastmile_activator_held_total counter\nlastmile_activator_held_total {}",
            activator.activated.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lastmile_activator_rejected_total Requests turned away with 503: queue full \
             or no replica in time.\n# TYPE lastmile_activator_rejected_total counter\n\
             lastmile_activator_rejected_total {}",
            activator.rejected.load(Ordering::Relaxed)
        );
        out
    }

    pub(crate) fn render(&self, workers: &Workers, policy: PolicyKind, index: &KvIndex) -> String {
        let mut out = String::new();
        let policy = policy.name();
        let all = workers.all();
        let gauge =
            |out: &mut String, name: &str, help: &str, kind: &str, v: &dyn Fn(&Worker) -> u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for w in &all {
                    let labels = if name == "lastmile_gateway_routed_total" {
                        format!("worker=\"{}\",policy=\"{policy}\"", w.url)
                    } else {
                        format!("worker=\"{}\"", w.url)
                    };
                    let _ = writeln!(out, "{name}{{{labels}}} {}", v(w));
                }
            };
        gauge(
            &mut out,
            "lastmile_gateway_routed_total",
            "Requests sent to each worker, by policy.",
            "counter",
            &|w| w.routed.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "lastmile_gateway_in_flight",
            "Requests in flight through the gateway per worker.",
            "gauge",
            &|w| w.in_flight() as u64,
        );
        gauge(
            &mut out,
            "lastmile_gateway_worker_listed",
            "Worker listed by its discovery source (1; static workers always are) or gone (0).",
            "gauge",
            &|w| u64::from(w.listed()),
        );
        gauge(
            &mut out,
            "lastmile_gateway_worker_available",
            "Worker listed, healthy and with its breaker closed (1) or not (0).",
            "gauge",
            &|w| u64::from(w.available()),
        );
        gauge(
            &mut out,
            "lastmile_gateway_breaker_open",
            "Worker's circuit breaker open (1) or closed (0).",
            "gauge",
            &|w| u64::from(w.breaker_open()),
        );
        let _ = writeln!(out, "# HELP lastmile_gateway_indexed_blocks KV blocks the routing index holds for each worker (kv_aware).\n# TYPE lastmile_gateway_indexed_blocks gauge");
        for (id, w) in all.iter().enumerate() {
            let _ = writeln!(
                out,
                "lastmile_gateway_indexed_blocks{{worker=\"{}\"}} {}",
                w.url,
                index.blocks_of(id)
            );
        }
        let _ = writeln!(
            out,
            "# HELP lastmile_gateway_predicted_overlap_blocks_total Prompt blocks the chosen workers were predicted to hold (kv_aware).\n# TYPE lastmile_gateway_predicted_overlap_blocks_total counter\nlastmile_gateway_predicted_overlap_blocks_total {}",
            self.overlap_blocks.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lastmile_gateway_retries_total Requests resent to another worker after a connection failure.\n# TYPE lastmile_gateway_retries_total counter\nlastmile_gateway_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP lastmile_gateway_overhead_seconds Time the gateway adds per request, the workers' own time excluded.\n# TYPE lastmile_gateway_overhead_seconds histogram");
        for (b, c) in OVERHEAD_BOUNDS_US.iter().zip(&self.overhead_buckets) {
            let _ = writeln!(
                out,
                "lastmile_gateway_overhead_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1e6,
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.overhead_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "lastmile_gateway_overhead_seconds_bucket{{le=\"+Inf\"}} {count}\nlastmile_gateway_overhead_seconds_sum {}\nlastmile_gateway_overhead_seconds_count {count}",
            self.overhead_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        out
    }
}
