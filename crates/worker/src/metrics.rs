//! Prometheus metrics of one worker: request counts and latency histograms, the engine's
//! counters and gauges, and the three gauges Gateway API Inference Extension endpoint pickers
//! read under vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`), rendered through `lastmile_http::metrics` on `GET /metrics`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use lastmile_engine::EngineStats;
use lastmile_http::metrics::{Exposition, Histogram};

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
    /// Requests whose prompt tokens came with them (built by a gateway), not built here.
    pub given_prompts: AtomicU64,
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
            given_prompts: AtomicU64::new(0),
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
    /// `extra` writes further families (the KV transfer's).
    pub fn render(&self, engine: &EngineStats, extra: impl FnOnce(&mut Exposition)) -> String {
        // Read once: the lastmile_ and vllm: names of one page agree.
        let gauges = EngineGauges::read(engine);
        let mut page = Exposition::new();
        self.write_request_counts(&mut page);
        write_engine(&mut page, engine, &gauges);
        self.write_latencies(&mut page);
        write_gaie(&mut page, &gauges);
        extra(&mut page);
        page.encode()
    }

    /// Writes the request counts by endpoint and status and the worker's token counters.
    fn write_request_counts(&self, page: &mut Exposition) {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let requests: Vec<_> = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(e, s, n)| (vec![("endpoint", e.clone()), ("status", s.to_string())], *n))
            .collect();
        page.counters(
            "lastmile_requests_total",
            "Requests served, by endpoint and HTTP status.",
            requests,
        )
        .counter(
            "lastmile_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            ld(&self.prompt_tokens),
        )
        .counter(
            "lastmile_generation_tokens_total",
            "Tokens generated for clients.",
            ld(&self.generation_tokens),
        )
        .counter(
            "lastmile_given_prompts_total",
            "Requests whose prompt tokens a gateway built and sent along (not tokenized here).",
            ld(&self.given_prompts),
        );
    }

    /// Writes the latency histograms (first token, between tokens, whole request).
    fn write_latencies(&self, page: &mut Exposition) {
        page.histogram(
            "lastmile_time_to_first_token_seconds",
            "Time from request to first token.",
            &self.ttft,
        )
        .histogram(
            "lastmile_inter_token_latency_seconds",
            "Time between consecutive tokens.",
            &self.itl,
        )
        .histogram(
            "lastmile_request_duration_seconds",
            "Time from request to last token.",
            &self.e2e,
        );
    }
}

/// The engine gauges that appear under both lastmile_ and vllm: names, read once per page.
struct EngineGauges {
    used: u64,
    total: u64,
    running: u64,
    waiting: u64,
}

impl EngineGauges {
    /// Reads them from `engine` now.
    fn read(engine: &EngineStats) -> Self {
        let us = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
        Self {
            used: us(&engine.kv_blocks_used),
            total: us(&engine.kv_blocks_total),
            running: us(&engine.running),
            waiting: us(&engine.waiting),
        }
    }
}

/// Writes the engine's counters and gauges: work done, batch and KV pool, prefix cache.
fn write_engine(page: &mut Exposition, engine: &EngineStats, g: &EngineGauges) {
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let us = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
    let (q, h) = (
        ld(&engine.prefix_query_tokens),
        ld(&engine.prefix_hit_tokens),
    );
    page.counter(
        "lastmile_engine_prefill_tokens_total",
        "Prompt tokens computed by the engine.",
        ld(&engine.prefill_tokens),
    )
    .counter(
        "lastmile_engine_preemptions_total",
        "Sequences preempted for lack of KV blocks.",
        ld(&engine.preemptions),
    )
    .counter(
        "lastmile_engine_steps_total",
        "Engine steps (batched forward passes).",
        ld(&engine.steps),
    )
    .counter(
        "lastmile_engine_draft_tokens_total",
        "Draft tokens verified by speculative decoding.",
        ld(&engine.draft_tokens),
    )
    .counter(
        "lastmile_engine_accepted_draft_tokens_total",
        "Draft tokens kept (generated without a step of their own).",
        ld(&engine.accepted_draft_tokens),
    )
    .gauge(
        "lastmile_running_sequences",
        "Sequences in the running batch.",
        g.running,
    )
    .gauge(
        "lastmile_waiting_sequences",
        "Requests waiting to start.",
        g.waiting,
    )
    .gauge("lastmile_kv_blocks_used", "KV cache blocks in use.", g.used)
    .gauge(
        "lastmile_kv_blocks_cached",
        "KV blocks indexed by the prefix cache.",
        us(&engine.kv_blocks_cached),
    )
    .counter(
        "lastmile_prefix_cache_query_tokens_total",
        "Prompt tokens looked up in the prefix cache.",
        q,
    )
    .counter(
        "lastmile_prefix_cache_hit_tokens_total",
        "Prompt tokens served from the prefix cache instead of recomputed.",
        h,
    )
    .gauge(
        "lastmile_prefix_cache_hit_rate",
        "Share of prompt tokens served from the prefix cache.",
        if q == 0 { 0.0 } else { h as f64 / q as f64 },
    )
    .gauge(
        "lastmile_kv_blocks_total",
        "KV cache blocks in the pool.",
        g.total,
    )
    .gauge(
        "lastmile_kv_blocks_held",
        "KV blocks held under leases for decode workers to read.",
        us(&engine.kv_blocks_held),
    )
    .counter(
        "lastmile_kv_blocks_exported_total",
        "KV blocks read out for decode workers.",
        ld(&engine.kv_blocks_exported),
    )
    .counter(
        "lastmile_kv_blocks_imported_total",
        "KV blocks received from prefill workers and stored in the prefix cache.",
        ld(&engine.kv_blocks_imported),
    )
    .gauge(
        "lastmile_kv_disk_blocks",
        "KV blocks in the disk tier (--kv-disk-dir).",
        us(&engine.kv_disk_blocks),
    )
    .gauge(
        "lastmile_kv_disk_bytes",
        "Bytes of block files in the disk tier.",
        ld(&engine.kv_disk_bytes),
    )
    .counter(
        "lastmile_kv_disk_hit_blocks_total",
        "Prompt blocks missing from memory that were read back from the disk tier.",
        ld(&engine.kv_disk_hit_blocks),
    )
    .counter(
        "lastmile_kv_disk_miss_blocks_total",
        "Prompt blocks missing from memory that the disk tier did not have either.",
        ld(&engine.kv_disk_miss_blocks),
    )
    .counter(
        "lastmile_kv_disk_written_bytes_total",
        "Bytes written to the disk tier.",
        ld(&engine.kv_disk_written_bytes),
    )
    .counter(
        "lastmile_kv_disk_read_bytes_total",
        "Bytes read back from the disk tier.",
        ld(&engine.kv_disk_read_bytes),
    )
    .counter(
        "lastmile_kv_disk_dropped_blocks_total",
        "Evicted blocks not saved because the disk tier's writer was behind.",
        ld(&engine.kv_disk_dropped_blocks),
    )
    .counter(
        "lastmile_kv_disk_errors_total",
        "Disk tier writes and reads that failed (those blocks are recomputed).",
        ld(&engine.kv_disk_errors),
    );
}

/// Writes the engine state under the names Gateway API Inference Extension endpoint pickers
/// read from vLLM.
fn write_gaie(page: &mut Exposition, g: &EngineGauges) {
    page.gauge(
        "vllm:num_requests_waiting",
        "Requests waiting to start (lastmile_waiting_sequences).",
        g.waiting,
    )
    .gauge(
        "vllm:num_requests_running",
        "Sequences in the running batch (lastmile_running_sequences).",
        g.running,
    )
    .gauge(
        "vllm:kv_cache_usage_perc",
        "KV cache usage, 0 to 1 (KV blocks in use over the pool).",
        if g.total == 0 {
            0.0
        } else {
            g.used as f64 / g.total as f64
        },
    );
}

/// The device the engine runs on (`lastmile_device_info`, 1, labelled with it) and, on a GPU, its
/// memory: total, and in use once the weights and the KV cache were allocated.
pub(crate) fn write_device(page: &mut Exposition, device: &lastmile_engine::DeviceReport) {
    let mut labels = vec![("device", device.device.clone())];
    if let Some(name) = &device.name {
        labels.push(("name", name.clone()));
    }
    page.gauges(
        "lastmile_device_info",
        "The device the engine runs on (cpu or cuda:N, and the GPU's name).",
        [(labels, 1u64)],
    );
    if let (Some(total), Some(used)) = (device.memory_total_bytes, device.memory_used_bytes) {
        page.gauges(
            "lastmile_device_memory_bytes",
            "The GPU's memory: total, and used once weights and KV cache were allocated.",
            [
                (vec![("state", "total".to_string())], total),
                (vec![("state", "used".to_string())], used),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `series` on `page`.
    fn sample(page: &str, series: &str) -> Option<f64> {
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn the_page_has_the_engine_state_under_lastmile_and_vllm_names() {
        let m = Metrics::default();
        m.count_request("/v1/completions", 200);
        m.count_request("/v1/completions", 200);
        m.e2e.observe(0.3);
        let engine = EngineStats::default();
        engine.waiting.store(3, Ordering::Relaxed);
        engine.running.store(2, Ordering::Relaxed);
        engine.kv_blocks_used.store(16, Ordering::Relaxed);
        engine.kv_blocks_total.store(64, Ordering::Relaxed);
        let page = m.render(&engine, |_| {});
        let at = |s: &str| sample(&page, s).unwrap_or_else(|| panic!("{s} missing:\n{page}"));
        assert_eq!(
            at("lastmile_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"),
            2.0
        );
        assert_eq!(at("lastmile_waiting_sequences"), 3.0);
        assert_eq!(at("vllm:num_requests_waiting"), 3.0);
        assert_eq!(at("vllm:num_requests_running"), 2.0);
        assert_eq!(at("vllm:kv_cache_usage_perc"), 0.25);
        assert_eq!(at("lastmile_prefix_cache_hit_rate"), 0.0);
        assert_eq!(
            at("lastmile_request_duration_seconds_bucket{le=\"0.25\"}"),
            0.0
        );
        assert_eq!(
            at("lastmile_request_duration_seconds_bucket{le=\"0.5\"}"),
            1.0
        );
        assert_eq!(
            at("lastmile_request_duration_seconds_bucket{le=\"+Inf\"}"),
            1.0
        );
        assert!(page.contains("# TYPE vllm:kv_cache_usage_perc gauge\n"));
        assert!(page.contains("# TYPE lastmile_requests_total counter\n"));
        assert_eq!(
            sample(
                &Metrics::default().render(&EngineStats::default(), |_| {}),
                "vllm:kv_cache_usage_perc"
            ),
            Some(0.0),
            "an empty pool is not NaN"
        );
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
        let page = m.render(&EngineStats::default(), |_| {});
        assert_eq!(
            sample(&page, "lastmile_time_to_first_token_seconds_count"),
            Some(74.0)
        );
        assert_eq!(m.recent_itl_p90(), None);
        m.observe_itl(0.02);
        assert_eq!(m.recent_itl_p90(), Some(0.02));
    }
}
