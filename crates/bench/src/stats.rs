//! Aggregates of a load run: latency percentiles and throughput.

use serde::Serialize;

use crate::client::RequestResult;

/// p50 / p90 / p99 and the mean of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Percentiles {
    /// From samples in seconds (nearest-rank percentiles).
    pub fn from_seconds(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|s| s * 1000.0).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[(((v.len() as f64) * q).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// The headline numbers of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed.
    pub errors: usize,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Wall-clock seconds of the run.
    pub duration_s: f64,
    /// Prompt tokens of completed requests (server counts).
    pub prompt_tokens: u64,
    /// Generated tokens of completed requests (server counts).
    pub output_tokens: u64,
    /// Generated tokens per second of wall time.
    pub output_tok_s: f64,
    /// Completed requests per second.
    pub requests_s: f64,
    /// Time to first token (ms).
    pub ttft_ms: Percentiles,
    /// Inter-token latency (ms).
    pub itl_ms: Percentiles,
    /// End-to-end latency (ms).
    pub e2e_ms: Percentiles,
}

impl Summary {
    /// Aggregates results of a run that took `wall` seconds.
    pub fn from_results(results: &[RequestResult], wall: f64) -> Self {
        let ok: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_none()).collect();
        let errors: Vec<&RequestResult> = results.iter().filter(|r| r.error.is_some()).collect();
        let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
        let e2e: Vec<f64> = ok.iter().map(|r| r.e2e).collect();
        let output_tokens: u64 = ok.iter().map(|r| r.completion_tokens).sum();
        let wall = wall.max(1e-9);
        Self {
            completed: ok.len(),
            errors: errors.len(),
            error_samples: errors
                .iter()
                .take(3)
                .filter_map(|r| r.error.clone())
                .collect(),
            duration_s: wall,
            prompt_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
            output_tokens,
            output_tok_s: output_tokens as f64 / wall,
            requests_s: ok.len() as f64 / wall,
            ttft_ms: Percentiles::from_seconds(&ttft),
            itl_ms: Percentiles::from_seconds(&itl),
            e2e_ms: Percentiles::from_seconds(&e2e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(|i| i as f64 / 1000.0).collect();
        let p = Percentiles::from_seconds(&s);
        assert!(
            (p.p50 - 50.0).abs() < 1e-9
                && (p.p90 - 90.0).abs() < 1e-9
                && (p.p99 - 99.0).abs() < 1e-9
        );
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::from_seconds(&[]).p50, 0.0);
    }

    #[test]
    fn failed_requests_count_as_errors_not_latency() {
        let ok = RequestResult {
            ttft: Some(0.1),
            itl: vec![0.02, 0.03],
            e2e: 0.2,
            prompt_tokens: 10,
            completion_tokens: 3,
            error: None,
            text: String::new(),
        };
        let bad = RequestResult {
            error: Some("boom".into()),
            ttft: None,
            e2e: 9.0,
            ..ok.clone()
        };
        let s = Summary::from_results(&[ok, bad], 2.0);
        assert_eq!((s.completed, s.errors), (1, 1));
        assert_eq!(s.output_tokens, 3);
        assert!((s.output_tok_s - 1.5).abs() < 1e-9);
        assert!((s.e2e_ms.p99 - 200.0).abs() < 1e-9);
    }
}
