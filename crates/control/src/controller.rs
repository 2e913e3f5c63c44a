//! The controller: one task per deployment that keeps the number of replicas where the
//! autoscaler wants it.
//!
//! Every tick it reads the deployment's load from the [`Balancer`] (the gateway: requests in
//! flight on its replicas and held by the activator), asks the [`Autoscaler`] how many replicas
//! that needs, and starts or stops replicas through the [`ReplicaBackend`]. A request held at
//! zero replicas wakes it at once (`wake`) instead of waiting for the tick, and asks for as many
//! replicas as the held requests need at the target concurrency; because it counts the replicas
//! already starting, any number of such wakes start that many replicas, not one per request.
//!
//! A replica is put in rotation (`Balancer::replica_ready`) once it has reported the address it
//! listens at and its `/health` answers there (both within `ready_timeout`), and
//! taken out (`replica_gone`) before it is stopped or as soon as it is seen dead. A replica that
//! exits without being asked to has crashed: it is replaced, after a back-off that doubles with
//! each crash in a row (from `backoff_base` up to `backoff_max`) and starts over once a replica
//! has stayed up for a minute.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lastmile_http::metrics::{Exposition, Histogram};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};

use crate::autoscaler::{Autoscaler, Observation};
use crate::deployments::DeploymentSpec;
use crate::lock;
use crate::supervisor::{wait_healthy, ReplicaBackend, ReplicaSpec, StartedReplica, Stop};

/// Upper bounds (seconds) of the cold-start histogram.
pub const COLD_START_BOUNDS: [f64; 8] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A deployment's load as the front door sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Requests in flight on its replicas.
    pub in_flight: usize,
    /// Requests waiting for a replica.
    pub held: usize,
    /// Recent p90 time to first token, when measured.
    pub ttft_p90: Option<Duration>,
    /// Recent p90 gap between streamed tokens, when measured.
    pub itl_p90: Option<Duration>,
    /// Requests that have arrived, ever (a counter).
    pub arrivals: u64,
}

/// The front door the controller feeds replicas to (the gateway).
pub trait Balancer: Send + Sync + 'static {
    /// `deployment`'s load now.
    fn load(&self, deployment: &str) -> Load;
    /// The replica at `url` answers its health check: send it requests.
    fn replica_ready(&self, deployment: &str, url: &str);
    /// The replica at `url` is stopping or dead: send it nothing more.
    fn replica_gone(&self, deployment: &str, url: &str);
    /// `n` replicas of `deployment` are starting (the front door can pace held requests over
    /// the replicas that are ready until they are up).
    fn replicas_starting(&self, deployment: &str, n: usize);
}

/// The controller's timings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// How often the autoscaler samples load and decides.
    pub tick: Duration,
    /// A replica not healthy within this is killed and counted as a crash.
    pub ready_timeout: Duration,
    /// A replica asked to stop is killed if still running after this.
    pub stop_grace: Duration,
    /// First restart delay after a crash.
    pub backoff_base: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(250),
            ready_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(30),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// One replica as the admin API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplicaStatus {
    /// Backend id (process id).
    pub id: String,
    /// Base URL (`None` until it has reported the address it listens at).
    pub url: Option<String>,
    /// Where it is in its life (`starting`, `ready` or `stopping` on the wire).
    pub state: ReplicaState,
    /// Seconds since it was started.
    pub age_s: f64,
}

/// One deployment's state, for the admin API and metrics.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DeploymentStatus {
    /// Replicas the autoscaler wants.
    pub desired: usize,
    /// Replicas serving.
    pub ready: usize,
    /// Replicas started, not yet healthy.
    pub starting: usize,
    /// Replicas draining before they exit.
    pub stopping: usize,
    /// The autoscaler is in panic mode.
    pub panicking: bool,
    /// Requests in flight at the last tick.
    pub in_flight: usize,
    /// Requests held by the activator at the last tick.
    pub held: usize,
    /// Replicas that became ready, ever.
    pub cold_starts: u64,
    /// Sum of their start-to-ready times, in seconds.
    pub cold_start_seconds_sum: f64,
    /// The last one's start-to-ready time, in milliseconds.
    pub last_cold_start_ms: Option<f64>,
    /// Replicas that exited without being asked to (or never became healthy).
    pub crashes: u64,
    /// Every replica now.
    pub replicas: Vec<ReplicaStatus>,
}

/// A deployment under control.
struct Managed {
    spec: DeploymentSpec,
    replica: ReplicaSpec,
    wake: Notify,
    status: Mutex<DeploymentStatus>,
    /// Start-to-ready times, over `COLD_START_BOUNDS`.
    cold_start: Histogram,
}

/// Runs every deployment's control loop.
pub struct Controller {
    managed: Vec<Arc<Managed>>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Controller {
    /// Starts a control loop per deployment (each starts its `min_replicas` at once).
    pub fn start(
        deployments: Vec<(DeploymentSpec, ReplicaSpec)>,
        backend: Arc<dyn ReplicaBackend>,
        balancer: Arc<dyn Balancer>,
        config: ControllerConfig,
    ) -> Arc<Self> {
        let (shutdown, _) = watch::channel(false);
        let managed: Vec<Arc<Managed>> = deployments
            .into_iter()
            .map(|(spec, replica)| {
                Arc::new(Managed {
                    spec,
                    replica,
                    wake: Notify::new(),
                    status: Mutex::new(DeploymentStatus::default()),
                    cold_start: Histogram::new(&COLD_START_BOUNDS),
                })
            })
            .collect();
        let tasks = managed
            .iter()
            .map(|m| {
                let lp = Loop {
                    m: m.clone(),
                    backend: backend.clone(),
                    balancer: balancer.clone(),
                    config: config.clone(),
                    replicas: Vec::new(),
                    next_seq: 0,
                    crash_streak: 0,
                    not_before: Instant::now(),
                    client: reqwest::Client::new(),
                };
                tokio::spawn(lp.run(shutdown.subscribe()))
            })
            .collect();
        Arc::new(Self {
            managed,
            shutdown,
            tasks: Mutex::new(tasks),
        })
    }

    /// A request waits for `deployment`: decide now rather than at the next tick.
    pub fn wake(&self, deployment: &str) {
        if let Some(m) = self.managed.iter().find(|m| m.spec.name == deployment) {
            m.wake.notify_one();
        }
    }

    /// Every deployment with its status, in declaration order.
    pub fn deployments(&self) -> Vec<(DeploymentSpec, DeploymentStatus)> {
        self.managed
            .iter()
            .map(|m| (m.spec.clone(), lock(&m.status).clone()))
            .collect()
    }

    /// Stops every replica (gracefully, then killed after the grace) and the control loops.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Prometheus text: replicas per deployment (desired, ready, starting), cold starts and
    /// their duration, crashes.
    pub fn metrics(&self) -> String {
        let rows: Vec<MetricsRow> = self
            .managed
            .iter()
            .map(|m| MetricsRow {
                deployment: m.spec.name.clone(),
                status: lock(&m.status).clone(),
                cold_start: m.cold_start.clone(),
            })
            .collect();
        exposition(&rows)
    }
}

/// One deployment on the metrics page.
struct MetricsRow {
    deployment: String,
    status: DeploymentStatus,
    cold_start: Histogram,
}

/// The deployments' metrics, in declaration order (names are label values: escaped).
fn exposition(rows: &[MetricsRow]) -> String {
    let by_deployment = |r: &MetricsRow| vec![("deployment", r.deployment.clone())];
    let mut page = Exposition::new();
    page.gauges(
        "lastmile_deployment_replicas",
        "Replicas per deployment by state (desired: what the autoscaler wants).",
        rows.iter().flat_map(|r| {
            let s = &r.status;
            [
                ("desired", s.desired),
                ("ready", s.ready),
                ("starting", s.starting),
                ("stopping", s.stopping),
            ]
            .map(|(state, n)| {
                let mut labels = by_deployment(r);
                labels.push(("state", state.to_string()));
                (labels, n)
            })
        }),
    )
    .counters(
        "lastmile_cold_starts_total",
        "Replicas started that became ready.",
        rows.iter()
            .map(|r| (by_deployment(r), r.status.cold_starts)),
    )
    .histograms(
        "lastmile_cold_start_seconds",
        "Time from starting a replica to its first successful health check.",
        rows.iter()
            .map(|r| (by_deployment(r), r.cold_start.clone())),
    )
    .counters(
        "lastmile_replica_crashes_total",
        "Replicas that exited unasked or never became healthy.",
        rows.iter().map(|r| (by_deployment(r), r.status.crashes)),
    )
    .gauges(
        "lastmile_autoscaler_panicking",
        "1 while the autoscaler is in panic mode.",
        rows.iter().map(|r| (by_deployment(r), r.status.panicking)),
    );
    page.encode()
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Started, not yet healthy.
    Starting,
    /// Serving.
    Ready,
    /// Draining before it exits.
    Stopping,
}

struct Live {
    seq: u64,
    replica: StartedReplica,
    /// Its base URL, once it is healthy there.
    url: Option<String>,
    state: ReplicaState,
    started: Instant,
    ready_at: Option<Instant>,
}

enum Event {
    /// Listening and healthy at this URL, or not within the ready timeout (`None`).
    Health(u64, Option<String>),
    Exited(u64, String),
    /// Its stop grace is over.
    GraceOver(u64),
}

/// One deployment's control loop and the replicas it owns.
struct Loop {
    m: Arc<Managed>,
    backend: Arc<dyn ReplicaBackend>,
    balancer: Arc<dyn Balancer>,
    config: ControllerConfig,
    replicas: Vec<Live>,
    next_seq: u64,
    crash_streak: u32,
    not_before: Instant,
    client: reqwest::Client,
}

impl Loop {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.m.spec.name.clone();
        let mut scaler = Autoscaler::new(self.m.spec.autoscaling.clone());
        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut desired = self.m.spec.min_replicas;
        let mut panicking = false;
        let mut load = Load::default();
        let mut starting_reported = 0;
        let mut arrivals_seen = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    load = self.balancer.load(&name);
                    let arrivals = load.arrivals.saturating_sub(arrivals_seen);
                    arrivals_seen = load.arrivals;
                    let d = scaler.decide(t0.elapsed(), Observation {
                        concurrency: (load.in_flight + load.held) as f64,
                        arrivals,
                        ready: self.count(ReplicaState::Ready),
                        ttft_p90: load.ttft_p90,
                        itl_p90: load.itl_p90,
                    });
                    desired = d.desired;
                    panicking = d.panicking;
                }
                _ = self.m.wake.notified() => {
                    // Requests are held: enough replicas for them at once (as Knative's
                    // activator pokes its autoscaler), without waiting for the averages.
                    load = self.balancer.load(&name);
                    if load.held > 0 {
                        let target = self.m.spec.autoscaling.target_concurrency;
                        let for_held = ((load.in_flight + load.held) as f64 / target).ceil() as usize;
                        scaler.burst(t0.elapsed(), for_held.max(1));
                        desired = desired.max(for_held).max(1).min(self.m.spec.max_replicas);
                    }
                }
                Some(ev) = rx.recv() => self.on_event(ev),
                _ = shutdown.changed() => break,
            }
            self.reconcile(desired, &tx);
            let starting = self.count(ReplicaState::Starting);
            if starting != starting_reported {
                self.balancer.replicas_starting(&name, starting);
                starting_reported = starting;
            }
            let mut s = lock(&self.m.status);
            s.desired = desired;
            s.panicking = panicking;
            s.in_flight = load.in_flight;
            s.held = load.held;
            s.ready = self.count(ReplicaState::Ready);
            s.starting = self.count(ReplicaState::Starting);
            s.stopping = self.count(ReplicaState::Stopping);
            s.replicas = self
                .replicas
                .iter()
                .map(|r| ReplicaStatus {
                    id: r.replica.id.clone(),
                    url: r.url.clone(),
                    state: r.state,
                    age_s: r.started.elapsed().as_secs_f64(),
                })
                .collect();
        }
        self.stop_all(&mut rx).await;
    }

    fn count(&self, state: ReplicaState) -> usize {
        self.replicas.iter().filter(|r| r.state == state).count()
    }

    /// Starts or stops replicas so that `desired` are starting or ready.
    fn reconcile(&mut self, desired: usize, tx: &mpsc::UnboundedSender<Event>) {
        let active = self
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Stopping)
            .count();
        if desired > active && Instant::now() >= self.not_before {
            for _ in active..desired {
                if !self.start_one(tx) {
                    break;
                }
            }
        }
        if desired < active {
            for _ in desired..active {
                // Starting ones first (they serve nobody yet), newest first.
                let pick = self
                    .replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.state != ReplicaState::Stopping)
                    .max_by_key(|(_, r)| (r.state == ReplicaState::Starting, r.seq))
                    .map(|(i, _)| i);
                let Some(i) = pick else { break };
                self.stop(i, tx);
            }
        }
    }

    fn start_one(&mut self, tx: &mpsc::UnboundedSender<Event>) -> bool {
        let name = &self.m.spec.name;
        let mut replica = match self.backend.start(&self.m.replica) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                self.crashed(false);
                return false;
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        tracing::info!(deployment = %name, replica = %replica.id, "starting a replica");
        let (client, limit, tx) = (self.client.clone(), self.config.ready_timeout, tx.clone());
        let listening =
            std::mem::replace(&mut replica.listening, tokio::sync::oneshot::channel().1);
        let mut exited = std::mem::replace(&mut replica.exited, tokio::sync::oneshot::channel().1);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + limit;
            let ready = async {
                let Ok(url) = tokio::time::timeout_at(deadline, listening).await else {
                    return None;
                };
                let Ok(url) = url else {
                    // It exited without listening: `exited` says how.
                    return std::future::pending().await;
                };
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                wait_healthy(&client, &url, left).await.then_some(url)
            };
            tokio::select! {
                ready = ready => {
                    let _ = tx.send(Event::Health(seq, ready));
                }
                how = &mut exited => {
                    let _ = tx.send(Event::Exited(seq, how.unwrap_or_else(|_| "unknown".into())));
                    return;
                }
            }
            let how = exited.await.unwrap_or_else(|_| "unknown".into());
            let _ = tx.send(Event::Exited(seq, how));
        });
        self.replicas.push(Live {
            seq,
            replica,
            url: None,
            state: ReplicaState::Starting,
            started: Instant::now(),
            ready_at: None,
        });
        true
    }

    /// Takes replica `i` out of rotation and asks it to drain and exit.
    fn stop(&mut self, i: usize, tx: &mpsc::UnboundedSender<Event>) {
        let r = &mut self.replicas[i];
        if let (ReplicaState::Ready, Some(url)) = (r.state, &r.url) {
            self.balancer.replica_gone(&self.m.spec.name, url);
        }
        r.state = ReplicaState::Stopping;
        tracing::info!(deployment = %self.m.spec.name, replica = %r.replica.id, "stopping a replica");
        r.replica.stop(Stop::Graceful);
        let (seq, grace, tx) = (r.seq, self.config.stop_grace, tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = tx.send(Event::GraceOver(seq));
        });
    }

    fn on_event(&mut self, ev: Event) {
        let name = self.m.spec.name.clone();
        match ev {
            Event::Health(seq, Some(url)) => {
                let Some(r) = self.replicas.iter_mut().find(|r| r.seq == seq) else {
                    return;
                };
                if r.state != ReplicaState::Starting {
                    return;
                }
                r.state = ReplicaState::Ready;
                r.ready_at = Some(Instant::now());
                r.url = Some(url.clone());
                let took = r.started.elapsed().as_secs_f64();
                tracing::info!(deployment = %name, replica = %r.replica.id, url = %url, "replica ready in {:.0} ms", took * 1e3);
                self.balancer.replica_ready(&name, &url);
                let mut s = lock(&self.m.status);
                s.cold_starts += 1;
                s.cold_start_seconds_sum += took;
                self.m.cold_start.observe(took);
                s.last_cold_start_ms = Some(took * 1e3);
            }
            Event::Health(seq, None) => {
                if let Some(i) = self.replicas.iter().position(|r| r.seq == seq) {
                    tracing::error!(deployment = %name, "a replica was not healthy in time; killing it");
                    self.replicas[i].replica.stop(Stop::Kill);
                    self.replicas[i].state = ReplicaState::Stopping;
                    self.crashed(false);
                }
            }
            Event::Exited(seq, how) => {
                let Some(i) = self.replicas.iter().position(|r| r.seq == seq) else {
                    return;
                };
                let r = self.replicas.remove(i);
                if r.state == ReplicaState::Stopping {
                    tracing::info!(deployment = %name, replica = %r.replica.id, "replica stopped ({how})");
                    return;
                }
                tracing::warn!(deployment = %name, replica = %r.replica.id, "replica exited unasked ({how}); replacing it");
                if let (ReplicaState::Ready, Some(url)) = (r.state, &r.url) {
                    self.balancer.replica_gone(&name, url);
                }
                let long_lived = r
                    .ready_at
                    .is_some_and(|t| t.elapsed() >= Duration::from_secs(60));
                self.crashed(long_lived);
            }
            Event::GraceOver(seq) => {
                if let Some(r) = self.replicas.iter().find(|r| r.seq == seq) {
                    tracing::warn!(deployment = %name, replica = %r.replica.id, "replica still draining after the grace; killing it");
                    r.replica.stop(Stop::Kill);
                }
            }
        }
    }

    /// Counts a crash and pushes the next start back.
    fn crashed(&mut self, after_long_uptime: bool) {
        self.crash_streak = if after_long_uptime {
            1
        } else {
            self.crash_streak + 1
        };
        let factor = 2u32.saturating_pow(self.crash_streak.saturating_sub(1).min(16));
        let delay = self
            .config
            .backoff_base
            .saturating_mul(factor)
            .min(self.config.backoff_max);
        self.not_before = Instant::now() + delay;
        lock(&self.m.status).crashes += 1;
    }

    /// Stops every replica and waits for them to exit (killing what outlives the grace).
    async fn stop_all(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) {
        let name = self.m.spec.name.clone();
        for r in &mut self.replicas {
            if let (ReplicaState::Ready, Some(url)) = (r.state, &r.url) {
                self.balancer.replica_gone(&name, url);
            }
            r.state = ReplicaState::Stopping;
            r.replica.stop(Stop::Graceful);
        }
        let deadline = tokio::time::Instant::now() + self.config.stop_grace;
        while !self.replicas.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Exited(seq, _))) => self.replicas.retain(|r| r.seq != seq),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    for r in &self.replicas {
                        r.replica.stop(Stop::Kill);
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_states_are_lowercase_words_on_the_wire() {
        let names: Vec<_> = [
            ReplicaState::Starting,
            ReplicaState::Ready,
            ReplicaState::Stopping,
        ]
        .iter()
        .map(|s| serde_json::to_value(s).ok())
        .collect();
        assert_eq!(
            names,
            ["starting", "ready", "stopping"].map(|s| Some(serde_json::Value::from(s)))
        );
    }

    fn row(name: &str) -> MetricsRow {
        let cold_start = Histogram::new(&COLD_START_BOUNDS);
        cold_start.observe(0.3);
        MetricsRow {
            deployment: name.to_string(),
            status: DeploymentStatus {
                desired: 2,
                ready: 1,
                starting: 1,
                cold_starts: 1,
                cold_start_seconds_sum: 0.3,
                crashes: 3,
                ..DeploymentStatus::default()
            },
            cold_start,
        }
    }

    /// Regression: deployment names may hold `"` (only whitespace and control characters are
    /// refused), and were written into label values unescaped, breaking the whole page.
    #[test]
    fn a_quote_in_a_deployment_name_does_not_break_the_metrics() {
        let yaml = "deployments:\n  - name: 'a\"b'\n";
        let parsed = crate::deployments::Deployments::parse(yaml, "test").expect("a valid file");
        assert_eq!(parsed.list[0].name, "a\"b");
        let text = exposition(&[row("a\"b"), row("plain")]);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            assert!(value.parse::<f64>().is_ok(), "value of {line:?}");
            assert!(series.ends_with('}'), "{line:?}");
            if series.contains("a\\\"b") {
                assert!(!series.contains("a\"b\""), "unescaped: {line:?}");
            }
        }
        for series in [
            "lastmile_deployment_replicas{deployment=\"a\\\"b\",state=\"desired\"} 2",
            "lastmile_cold_starts_total{deployment=\"a\\\"b\"} 1",
            "lastmile_cold_start_seconds_bucket{deployment=\"a\\\"b\",le=\"0.5\"} 1",
            "lastmile_cold_start_seconds_count{deployment=\"a\\\"b\"} 1",
            "lastmile_replica_crashes_total{deployment=\"a\\\"b\"} 3",
            "lastmile_autoscaler_panicking{deployment=\"a\\\"b\"} 0",
            "lastmile_cold_start_seconds_bucket{deployment=\"plain\",le=\"30\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing from:\n{text}"
            );
        }
    }
}
