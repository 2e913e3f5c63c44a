//! Prometheus metrics of the sandbox service: live sandboxes per template and owner, their
//! CPU and memory (read from their cgroups when scraped), create latency, commands run,
//! code executions, kills and expiries. Written through `lastmile_http::metrics`, which escapes
//! label values.

use std::sync::atomic::{AtomicU64, Ordering};

use lastmile_http::metrics::{Exposition, Histogram, Labels};

use crate::service::SandboxService;

/// Bounds of the create-latency histogram, seconds.
const CREATE_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// The service's counters.
#[derive(Debug)]
pub struct Metrics {
    /// Create latency (request to agent running), seconds.
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

impl Default for Metrics {
    fn default() -> Self {
        Self {
            create_seconds: Histogram::new(CREATE_BOUNDS),
            commands: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            killed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            paused: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        }
    }
}

/// The whole exposition.
pub fn render(svc: &SandboxService) -> String {
    let m = &svc.metrics;
    let all = svc.all();
    let mut live: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for s in &all {
        *live
            .entry((s.template.name.clone(), s.owner.clone()))
            .or_default() += 1;
    }
    let by_sandbox = |id: &str| -> Labels { vec![("sandbox", id.to_string())] };
    let mut page = Exposition::new();
    page.gauges(
        "lastmile_sandboxes_live",
        "Live sandboxes per template and owner (API key id).",
        live.into_iter()
            .map(|((t, o), n)| (vec![("template", t), ("owner", o)], n)),
    )
    .gauges(
        "lastmile_sandbox_memory_bytes",
        "Memory in use per sandbox (tmpfs files included).",
        all.iter()
            .filter_map(|s| Some((by_sandbox(&s.id), s.memory_bytes()?))),
    )
    .counters(
        "lastmile_sandbox_cpu_seconds_total",
        "CPU time used per sandbox.",
        all.iter()
            .filter_map(|s| Some((by_sandbox(&s.id), s.cpu_ns()? as f64 / 1e9))),
    )
    .histogram(
        "lastmile_sandbox_create_seconds",
        "Time to create a sandbox.",
        &m.create_seconds,
    );
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
        page.counter(name, help, v.load(Ordering::Relaxed));
    }
    page.encode()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::{IsolationBackend, LaunchSpec, Launched};
    use crate::{SandboxError, ServiceConfig};

    /// A backend that starts nothing: the page of a service with no sandboxes.
    struct NoBackend;

    impl IsolationBackend for NoBackend {
        fn name(&self) -> &'static str {
            "none"
        }
        fn describe(&self) -> String {
            "starts nothing".to_string()
        }
        fn launch(&self, _: &LaunchSpec<'_>) -> Result<Launched, SandboxError> {
            Err(SandboxError::Unavailable("no backend".to_string()))
        }
    }

    #[tokio::test]
    async fn the_page_keeps_its_names_and_types() {
        let svc =
            SandboxService::start(Arc::new(NoBackend), ServiceConfig::default()).expect("service");
        svc.metrics.create_seconds.observe(0.015);
        svc.metrics.create_seconds.observe(3.0);
        svc.metrics.commands.fetch_add(2, Ordering::Relaxed);
        let text = render(&svc);
        for line in [
            "# TYPE lastmile_sandboxes_live gauge",
            "# TYPE lastmile_sandbox_memory_bytes gauge",
            "# TYPE lastmile_sandbox_cpu_seconds_total counter",
            "# TYPE lastmile_sandbox_create_seconds histogram",
            "lastmile_sandbox_create_seconds_bucket{le=\"0.01\"} 0",
            "lastmile_sandbox_create_seconds_bucket{le=\"0.02\"} 1",
            "lastmile_sandbox_create_seconds_bucket{le=\"5\"} 2",
            "lastmile_sandbox_create_seconds_count 2",
            "lastmile_sandbox_commands_total 2",
            "lastmile_sandbox_executions_total 0",
            "lastmile_sandboxes_killed_total 0",
            "lastmile_sandboxes_expired_total 0",
            "lastmile_sandbox_pauses_total 0",
            "lastmile_sandbox_resumes_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
