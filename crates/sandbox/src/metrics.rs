//! Prometheus metrics of the sandbox service: live sandboxes per template and owner, their
//! CPU and memory (read from their cgroups when scraped), create latency, commands run,
//! code executions, kills and expiries. Label values are escaped as the text format requires.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::service::SandboxService;

/// Bounds of the create-latency histogram, seconds.
const CREATE_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// A histogram with fixed bounds, in atomics.
#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: CREATE_BOUNDS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation, seconds.
    pub fn observe(&self, s: f64) {
        for (b, c) in CREATE_BOUNDS.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add((s * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, c) in CREATE_BOUNDS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

/// The service's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Create latency (request to agent running).
    pub create_seconds: Histogram,
    /// Processes started (commands and code-interpreter contexts).
    pub commands: AtomicU64,
    /// Code-interpreter executions.
    pub executions: AtomicU64,
    /// Sandboxes killed by request.
    pub killed: AtomicU64,
    /// Sandboxes ended by their timeout.
    pub expired: AtomicU64,
    /// Pauses.
    pub paused: AtomicU64,
    /// Resumptions of paused sandboxes.
    pub resumed: AtomicU64,
}

/// A label value in the text format: backslash, quote and newline escaped.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(svc: &SandboxService) -> String {
    let m = &svc.metrics;
    let mut out = String::new();
    let all = svc.all();
    let mut live: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for s in &all {
        *live
            .entry((s.template.name.clone(), s.owner.clone()))
            .or_default() += 1;
    }
    out.push_str(
        "# HELP lastmile_sandboxes_live Live sandboxes per template and owner (API key id).\n",
    );
    out.push_str("# TYPE lastmile_sandboxes_live gauge\n");
    for ((t, o), n) in &live {
        let _ = writeln!(
            out,
            "lastmile_sandboxes_live{{template=\"{}\",owner=\"{}\"}} {n}",
            escape(t),
            escape(o)
        );
    }
    out.push_str(
        "# HELP lastmile_sandbox_memory_bytes Memory in use per sandbox (tmpfs files included).\n",
    );
    out.push_str("# TYPE lastmile_sandbox_memory_bytes gauge\n");
    for s in &all {
        if let Some(b) = s.memory_bytes() {
            let _ = writeln!(
                out,
                "lastmile_sandbox_memory_bytes{{sandbox=\"{}\"}} {b}",
                escape(&s.id)
            );
        }
    }
    out.push_str("# HELP lastmile_sandbox_cpu_seconds_total CPU time used per sandbox.\n");
    out.push_str("# TYPE lastmile_sandbox_cpu_seconds_total counter\n");
    for s in &all {
        if let Some(ns) = s.cpu_ns() {
            let _ = writeln!(
                out,
                "lastmile_sandbox_cpu_seconds_total{{sandbox=\"{}\"}} {}",
                escape(&s.id),
                ns as f64 / 1e9
            );
        }
    }
    out.push_str("# HELP lastmile_sandbox_create_seconds Time to create a sandbox.\n");
    m.create_seconds
        .render("lastmile_sandbox_create_seconds", &mut out);
    for (name, help, v) in [
        (
            "lastmile_sandbox_commands_total",
            "Processes started in sandboxes.",
            &m.commands,
        ),
        (
            "lastmile_sandbox_executions_total",
            "Code-interpreter executions.",
            &m.executions,
        ),
        (
            "lastmile_sandboxes_killed_total",
            "Sandboxes killed by request.",
            &m.killed,
        ),
        (
            "lastmile_sandboxes_expired_total",
            "Sandboxes ended by their timeout.",
            &m.expired,
        ),
        (
            "lastmile_sandbox_pauses_total",
            "Sandboxes paused.",
            &m.paused,
        ),
        (
            "lastmile_sandbox_resumes_total",
            "Paused sandboxes resumed.",
            &m.resumed,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_counts_cumulatively() {
        let h = Histogram::default();
        h.observe(0.015);
        h.observe(3.0);
        let mut s = String::new();
        h.render("x", &mut s);
        assert!(s.contains("x_bucket{le=\"0.01\"} 0"));
        assert!(s.contains("x_bucket{le=\"0.02\"} 1"));
        assert!(s.contains("x_bucket{le=\"5\"} 2"));
        assert!(s.contains("x_count 2"));
    }
}
