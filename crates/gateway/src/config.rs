//! The gateway's settings (`GatewayConfig`: workers, etcd discovery, deployments, keys,
//! timeouts, disaggregation) and their validation, which runs before anything starts: a
//! setting that makes no sense stops the start with a `GatewayError` naming it.

use std::time::Duration;

use lastmile_router::PolicyKind;
use thiserror::Error;

use crate::{DisaggRouting, TenantsConfig, WorkerAllow};

/// What can stop a gateway from starting.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// The settings are inconsistent.
    #[error("invalid gateway settings: {0}")]
    InvalidConfig(String),
    /// The keys and usage database failed.
    #[error("keys and usage database: {0}")]
    Store(String),
}

impl GatewayError {
    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_) => "invalid_config",
            Self::Store(_) => "store",
        }
    }
}

/// Where the gateway finds workers in etcd.
#[derive(Debug, Clone)]
pub struct EtcdDiscovery {
    /// How to reach etcd: endpoints, credentials, TLS.
    pub client: lastmile_discovery::EtcdConfig,
    /// Key prefix the workers register under.
    pub prefix: String,
    /// Which worker addresses may join (`10.0.0.0/8`, `192.168.1.7`, `worker-3.internal`);
    /// empty: any. Whoever can write to etcd could otherwise register an address of their own
    /// and receive every tenant's prompts.
    pub allow: Vec<WorkerAllow>,
}

/// A deployment behind the gateway: the model id clients send, how its replicas are chosen,
/// and how requests wait while it has none ready.
#[derive(Debug, Clone)]
pub struct DeploymentRoute {
    /// The model id clients send.
    pub name: String,
    /// How requests are spread over its replicas.
    pub policy: PolicyKind,
    /// Most requests held at once while no replica is ready.
    pub queue: usize,
    /// Longest a request is held before 503.
    pub hold_timeout: Duration,
    /// While replicas are starting, requests let through per ready replica at most (0: no
    /// limit); the autoscaler's target concurrency.
    pub capacity_per_replica: f64,
}

/// The range of [`GatewayConfig::kv_events_idle`]: a third of it is the keep-alive period asked
/// of the workers, which accept 100 ms to 10 min.
pub const KV_EVENTS_IDLE_MIN: Duration = Duration::from_millis(300);
/// See [`KV_EVENTS_IDLE_MIN`].
pub const KV_EVENTS_IDLE_MAX: Duration = Duration::from_secs(1800);

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Base URLs of static workers (`http://host:port`).
    pub workers: Vec<String>,
    /// Workers registered in etcd, followed as they come and go.
    pub etcd: Option<EtcdDiscovery>,
    /// How requests are spread.
    pub policy: PolicyKind,
    /// `kv_aware`: how much a worker's load weighs against the prompt tokens it would not have
    /// to compute (0: cache overlap alone decides).
    pub kv_balance: f64,
    /// How often each worker's `/health` is polled.
    pub health_interval: Duration,
    /// How long a worker may keep a request without a byte of answer (its response head, or
    /// the next chunk of a stream) before the gateway looks at its health: from then on, the
    /// request is taken from it as soon as its health check fails (a hung or stopped process,
    /// a stalled engine): before the head it goes to another worker, mid-stream the client gets
    /// a final error event. A healthy worker that is merely slow (a long answer that is not
    /// streamed) keeps it.
    pub worker_timeout: Duration,
    /// `kv_aware`: how long a worker's KV event feed may stay silent before the gateway gives
    /// it up and subscribes afresh (the worker is asked for a keep-alive every third of it), so
    /// that a link that died without a word does not leave the worker's prefix index stale.
    pub kv_events_idle: Duration,
    /// Consecutive failures that open a worker's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a worker out of rotation.
    pub breaker_cooldown: Duration,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Deployments whose replicas the control plane adds and removes (see [`GatewayHandle`]).
    pub deployments: Vec<DeploymentRoute>,
    /// API keys, quotas and usage metering (`None`: open, unmetered).
    pub tenants: Option<TenantsConfig>,
    /// Serve with no worker at all (a server of other APIs, such as sandboxes, beside the
    /// model API, which then answers 503).
    pub allow_no_workers: bool,
    /// Guards `/metrics` (besides the admin key, which always opens it when keys are on).
    /// Without it and without keys, `/metrics` is open.
    pub metrics_key: Option<String>,
    /// Name the worker that answered in an `x-lastmile-worker` header (it shows the workers'
    /// addresses: for debugging and tests only).
    pub debug_headers: bool,
    /// Disaggregated prefill and decode: when prompts go to prefill workers (`None`: never;
    /// workers with the `prefill` role then get no requests).
    pub disagg: Option<DisaggRouting>,
}

impl GatewayConfig {
    /// Settings for these workers with defaults: round robin, health every 200 ms, breaker
    /// after 3 failures for 5 s, 16 MiB bodies.
    pub fn new(workers: Vec<String>) -> Self {
        Self {
            workers,
            etcd: None,
            policy: PolicyKind::RoundRobin,
            kv_balance: 1.0,
            health_interval: Duration::from_millis(200),
            worker_timeout: Duration::from_secs(10),
            kv_events_idle: Duration::from_secs(15),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
            max_body_bytes: 16 << 20,
            deployments: Vec::new(),
            tenants: None,
            allow_no_workers: false,
            metrics_key: None,
            debug_headers: false,
            disagg: None,
        }
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.workers.is_empty()
            && self.etcd.is_none()
            && self.deployments.is_empty()
            && !self.allow_no_workers
        {
            return Err(GatewayError::InvalidConfig(
                "no workers given (list them, find them through etcd, or declare deployments)"
                    .into(),
            ));
        }
        self.validate_deployments()?;
        if self
            .etcd
            .as_ref()
            .is_some_and(|e| e.client.endpoints.is_empty() || e.prefix.is_empty())
        {
            return Err(GatewayError::InvalidConfig(
                "etcd discovery needs endpoints and a key prefix".into(),
            ));
        }
        if let Some(bad) = self
            .workers
            .iter()
            .find(|w| !(w.starts_with("http://") || w.starts_with("https://")))
        {
            return Err(GatewayError::InvalidConfig(format!(
                "worker URL {bad:?} must start with http:// or https://"
            )));
        }
        if !(self.kv_balance.is_finite() && self.kv_balance >= 0.0) {
            return Err(GatewayError::InvalidConfig(format!(
                "kv_balance must be a non-negative number, got {}",
                self.kv_balance
            )));
        }
        self.validate_keys()?;
        if self
            .disagg
            .as_ref()
            .is_some_and(|d| d.internal_token.is_empty() || d.prefill_timeout.is_zero())
        {
            return Err(GatewayError::InvalidConfig(
                "disaggregation needs the internal token and a positive prefill timeout".into(),
            ));
        }
        if let Some(e) = &self.etcd {
            // Certificate files are read now, so that a wrong path stops the start.
            lastmile_discovery::Etcd::connect(&e.client)
                .map_err(|err| GatewayError::InvalidConfig(err.to_string()))?;
        }
        if self.breaker_failures == 0
            || self.health_interval.is_zero()
            || self.worker_timeout.is_zero()
        {
            return Err(GatewayError::InvalidConfig(
                "breaker_failures, health_interval and worker_timeout must be positive".into(),
            ));
        }
        if !(KV_EVENTS_IDLE_MIN..=KV_EVENTS_IDLE_MAX).contains(&self.kv_events_idle) {
            return Err(GatewayError::InvalidConfig(format!(
                "kv_events_idle must be from {KV_EVENTS_IDLE_MIN:?} to {KV_EVENTS_IDLE_MAX:?}, got {:?}",
                self.kv_events_idle
            )));
        }
        Ok(())
    }

    /// Checks each deployment has a name, a queue and a hold timeout, and no name is declared
    /// twice.
    fn validate_deployments(&self) -> Result<(), GatewayError> {
        for (i, d) in self.deployments.iter().enumerate() {
            if d.name.is_empty() || d.queue == 0 || d.hold_timeout.is_zero() {
                return Err(GatewayError::InvalidConfig(format!(
                    "deployment {:?} needs a name, a queue of at least 1 and a hold timeout",
                    d.name
                )));
            }
            if self.deployments[..i].iter().any(|o| o.name == d.name) {
                return Err(GatewayError::InvalidConfig(format!(
                    "deployment {:?} is declared twice",
                    d.name
                )));
            }
        }
        Ok(())
    }

    /// Checks the admin and metrics keys, when given, are not blank.
    fn validate_keys(&self) -> Result<(), GatewayError> {
        // A blank admin key would guard nothing while turning keys "on".
        if self
            .tenants
            .as_ref()
            .and_then(|t| t.admin_key.as_deref())
            .is_some_and(|k| k.trim().is_empty())
        {
            return Err(GatewayError::InvalidConfig(
                "the admin key is empty: give a long random key, or none".into(),
            ));
        }
        if self
            .metrics_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            return Err(GatewayError::InvalidConfig(
                "the metrics key is empty: give a long random key, or none".into(),
            ));
        }
        Ok(())
    }
}
