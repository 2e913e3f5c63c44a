//! Prometheus metrics of one worker: counters and histograms kept in atomics (no locks on the
//! request path), rendered in the text exposition format on `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lastmile_engine::EngineStats;

/// A histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation in seconds.
    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];

/// The worker's metrics.
pub struct Metrics {
    requests: Mutex<Vec<(String, u16, u64)>>,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: AtomicU64,
    /// Generated tokens streamed to clients.
    pub generation_tokens: AtomicU64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between consecutive tokens of a stream.
    pub itl: Histogram,
    /// Whole-request latency.
    pub e2e: Histogram,
    /// The latest times to first token and inter-token gaps, for the recent p90s the
    /// autoscaler reads.
    recent_ttft: RecentP90,
    recent_itl: RecentP90,
}

/// The p90 of the last `capacity` observations of the last 30 s.
struct RecentP90 {
    capacity: usize,
    samples: Mutex<std::collections::VecDeque<(std::time::Instant, f64)>>,
}

impl RecentP90 {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            samples: Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
        }
    }

    fn observe(&self, v: f64) {
        let mut r = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == self.capacity {
            r.pop_front();
        }
        r.push_back((std::time::Instant::now(), v));
    }

    fn p90(&self) -> Option<f64> {
        let r = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<f64> = r
            .iter()
            .filter(|(t, _)| t.elapsed() <= RECENT_AGE)
            .map(|&(_, s)| s)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = ((v.len() as f64) * 0.9).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
            e2e: Histogram::new(LATENCY_BOUNDS),
            recent_ttft: RecentP90::new(64),
            recent_itl: RecentP90::new(1024),
        }
    }
}

/// How old the observations behind the recent p90s may be.
const RECENT_AGE: std::time::Duration = std::time::Duration::from_secs(30);

impl Metrics {
    /// Records one time to first token (seconds).
    pub fn observe_ttft(&self, seconds: f64) {
        self.ttft.observe(seconds);
        self.recent_ttft.observe(seconds);
    }

    /// Records one gap between two tokens of a stream (seconds).
    pub fn observe_itl(&self, seconds: f64) {
        self.itl.observe(seconds);
        self.recent_itl.observe(seconds);
    }

    /// p90 of the times to first token of the last 30 s (at most the last 64), if any.
    pub fn recent_ttft_p90(&self) -> Option<f64> {
        self.recent_ttft.p90()
    }

    /// p90 of the inter-token gaps of the last 30 s (at most the last 1,024), if any.
    pub fn recent_itl_p90(&self) -> Option<f64> {
        self.recent_itl.p90()
    }

    /// Counts one finished request by endpoint and status.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        match r.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
            Some(entry) => entry.2 += 1,
            None => r.push((endpoint.to_string(), status, 1)),
        }
    }

    /// The Prometheus text page.
    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::new();
        out.push_str("# HELP lastmile_requests_total Requests served, by endpoint and HTTP status.\n# TYPE lastmile_requests_total counter\n");
        for (e, s, n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "lastmile_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "lastmile_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            ld(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "lastmile_generation_tokens_total",
            "Tokens generated for clients.",
            ld(&self.generation_tokens),
        );
        counter(
            &mut out,
            "lastmile_engine_prefill_tokens_total",
            "Prompt tokens computed by the engine.",
            ld(&engine.prefill_tokens),
        );
        counter(
            &mut out,
            "lastmile_engine_preemptions_total",
            "Sequences preempted for lack of KV blocks.",
            ld(&engine.preemptions),
        );
        counter(
            &mut out,
            "lastmile_engine_steps_total",
            "Engine steps (batched forward passes).",
            ld(&engine.steps),
        );
        let us = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
        gauge(
            &mut out,
            "lastmile_running_sequences",
            "Sequences in the running batch.",
            us(&engine.running),
        );
        gauge(
            &mut out,
            "lastmile_waiting_sequences",
            "Requests waiting to start.",
            us(&engine.waiting),
        );
        gauge(
            &mut out,
            "lastmile_kv_blocks_used",
            "KV cache blocks in use.",
            us(&engine.kv_blocks_used),
        );
        gauge(
            &mut out,
            "lastmile_kv_blocks_cached",
            "KV blocks indexed by the prefix cache.",
            us(&engine.kv_blocks_cached),
        );
        counter(
            &mut out,
            "lastmile_prefix_cache_query_tokens_total",
            "Prompt tokens looked up in the prefix cache.",
            ld(&engine.prefix_query_tokens),
        );
        counter(
            &mut out,
            "lastmile_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache instead of recomputed.",
            ld(&engine.prefix_hit_tokens),
        );
        let (q, h) = (
            ld(&engine.prefix_query_tokens),
            ld(&engine.prefix_hit_tokens),
        );
        let _ = writeln!(
            out,
            "# HELP lastmile_prefix_cache_hit_rate Share of prompt tokens served from the prefix cache.\n# TYPE lastmile_prefix_cache_hit_rate gauge\nlastmile_prefix_cache_hit_rate {}",
            if q == 0 { 0.0 } else { h as f64 / q as f64 }
        );
        gauge(
            &mut out,
            "lastmile_kv_blocks_total",
            "KV cache blocks in the pool.",
            us(&engine.kv_blocks_total),
        );
        self.ttft.render(
            &mut out,
            "lastmile_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        self.itl.render(
            &mut out,
            "lastmile_inter_token_latency_seconds",
            "Time between consecutive tokens.",
        );
        self.e2e.render(
            &mut out,
            "lastmile_request_duration_seconds",
            "Time from request to last token.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1"));
        assert!(s.contains("x_bucket{le=\"1\"} 2"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"));
        assert!(s.contains("x_count 3"));
    }

    #[test]
    fn recent_ttft_p90_covers_the_last_64() {
        let m = Metrics::default();
        assert_eq!(m.recent_ttft_p90(), None);
        for i in 1..=10 {
            m.observe_ttft(i as f64 / 10.0);
        }
        assert_eq!(m.recent_ttft_p90(), Some(0.9));
        // 64 fast ones push the slow ones out.
        for _ in 0..64 {
            m.observe_ttft(0.01);
        }
        assert_eq!(m.recent_ttft_p90(), Some(0.01));
        assert_eq!(m.ttft.count(), 74);
        assert_eq!(m.recent_itl_p90(), None);
        m.observe_itl(0.02);
        assert_eq!(m.recent_itl_p90(), Some(0.02));
    }
}
