//! Prometheus metrics of the gateway: routing decisions and requests in flight per worker,
//! retries, worker availability and breaker state, and the time the gateway itself adds (reading
//! the body, choosing a worker, relaying the head: everything but waiting for the worker).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lastmile_router::PolicyKind;

use crate::workers::Workers;

const OVERHEAD_BOUNDS_US: [u64; 8] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000];

/// Counters kept in atomics.
pub(crate) struct Metrics {
    routed: Vec<AtomicU64>,
    overlap_blocks: AtomicU64,
    pub(crate) retries: AtomicU64,
    overhead_buckets: [AtomicU64; 8],
    overhead_count: AtomicU64,
    overhead_sum_us: AtomicU64,
}

impl Metrics {
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            routed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            overlap_blocks: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            overhead_buckets: Default::default(),
            overhead_count: AtomicU64::new(0),
            overhead_sum_us: AtomicU64::new(0),
        }
    }

    /// Records a routing decision and the cached prompt blocks it predicted on the worker.
    pub(crate) fn routed(&self, worker: usize, overlap_blocks: usize) {
        if let Some(c) = self.routed.get(worker) {
            c.fetch_add(1, Ordering::Relaxed);
        }
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

    pub(crate) fn render(&self, workers: &Workers, policy: PolicyKind) -> String {
        let mut out = String::new();
        let policy = policy.name();
        let _ = writeln!(out, "# HELP lastmile_gateway_routed_total Requests sent to each worker, by policy.\n# TYPE lastmile_gateway_routed_total counter");
        for (id, w) in workers.list.iter().enumerate() {
            let n = self.routed[id].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "lastmile_gateway_routed_total{{worker=\"{}\",policy=\"{policy}\"}} {n}",
                w.url
            );
        }
        let _ = writeln!(out, "# HELP lastmile_gateway_in_flight Requests in flight through the gateway per worker.\n# TYPE lastmile_gateway_in_flight gauge");
        for (id, w) in workers.list.iter().enumerate() {
            let _ = writeln!(
                out,
                "lastmile_gateway_in_flight{{worker=\"{}\"}} {}",
                w.url,
                workers.in_flight(id)
            );
        }
        let _ = writeln!(out, "# HELP lastmile_gateway_worker_available Worker healthy with its breaker closed (1) or not (0).\n# TYPE lastmile_gateway_worker_available gauge");
        for (id, w) in workers.list.iter().enumerate() {
            let _ = writeln!(
                out,
                "lastmile_gateway_worker_available{{worker=\"{}\"}} {}",
                w.url,
                u8::from(workers.available(id))
            );
        }
        let _ = writeln!(out, "# HELP lastmile_gateway_breaker_open Worker's circuit breaker open (1) or closed (0).\n# TYPE lastmile_gateway_breaker_open gauge");
        for (id, w) in workers.list.iter().enumerate() {
            let _ = writeln!(
                out,
                "lastmile_gateway_breaker_open{{worker=\"{}\"}} {}",
                w.url,
                u8::from(workers.breaker_open(id))
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
