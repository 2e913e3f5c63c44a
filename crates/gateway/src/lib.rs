//! The gateway: one public OpenAI / Anthropic endpoint in front of many workers. Each request
//! goes to a worker chosen by the deployment's routing policy (`lastmile_router`) over the
//! workers' health and load, with a retry on another worker when one cannot be reached and a
//! circuit breaker per worker; `/v1/models` lists the models of every worker.
//!
//! `kv_aware` routing follows every worker's KV event stream into a `KvIndex` and asks a worker
//! (`/internal/prompt`) for each request's prompt block hashes, then prefers the worker that
//! already holds the longest prefix, weighed against load. Workers come from a static list,
//! from etcd (`lastmile_discovery`: workers register under a lease, the gateway watches the
//! prefix and adds and drops them as they come and go), or both.
#![warn(missing_docs)]

mod kv;
mod metrics;
mod proxy;
mod workers;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use lastmile_protocol::{ApiError, ModelCard, ModelList};
use lastmile_router::{KvIndex, Policy, PolicyKind};
use thiserror::Error;

use crate::metrics::Metrics;
use crate::workers::Workers;

/// What can stop a gateway from starting.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// The settings are inconsistent.
    #[error("invalid gateway settings: {0}")]
    InvalidConfig(String),
}

impl GatewayError {
    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_) => "invalid_config",
        }
    }
}

/// Where the gateway finds workers in etcd.
#[derive(Debug, Clone)]
pub struct EtcdDiscovery {
    /// etcd client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix the workers register under.
    pub prefix: String,
}

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
    /// Consecutive failures that open a worker's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a worker out of rotation.
    pub breaker_cooldown: Duration,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
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
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
            max_body_bytes: 16 << 20,
        }
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<(), GatewayError> {
        if self.workers.is_empty() && self.etcd.is_none() {
            return Err(GatewayError::InvalidConfig(
                "no workers given (list them, or find them through etcd)".into(),
            ));
        }
        if self
            .etcd
            .as_ref()
            .is_some_and(|e| e.endpoints.is_empty() || e.prefix.is_empty())
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
        if self.breaker_failures == 0 || self.health_interval.is_zero() {
            return Err(GatewayError::InvalidConfig(
                "breaker_failures and health_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Shared state of the gateway's handlers.
pub(crate) struct Gateway {
    pub(crate) config: GatewayConfig,
    pub(crate) workers: Arc<Workers>,
    pub(crate) policy: Policy,
    pub(crate) index: Mutex<KvIndex>,
    pub(crate) metrics: Metrics,
    /// Rotates which worker computes prompt hashes.
    hasher: AtomicUsize,
    /// `kv_aware`: the task following each listed worker's KV events.
    followers: Mutex<std::collections::HashMap<usize, tokio::task::JoinHandle<()>>>,
}

impl Gateway {
    pub(crate) fn index(&self) -> MutexGuard<'_, KvIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn next_hasher(&self) -> usize {
        self.hasher.fetch_add(1, Ordering::Relaxed)
    }

    fn followers(
        &self,
    ) -> MutexGuard<'_, std::collections::HashMap<usize, tokio::task::JoinHandle<()>>> {
        self.followers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts worker `url` in rotation (checking its health at once) and, for `kv_aware`, starts
    /// following its KV events.
    fn worker_up(self: &Arc<Self>, url: &str) {
        let (id, new) = self.workers.add(url);
        if !new {
            return;
        }
        tracing::info!(worker = %url, "worker joined");
        let gw = self.clone();
        tokio::spawn(async move { gw.workers.check(id).await });
        if self.config.policy == PolicyKind::KvAware {
            let task = tokio::spawn(kv::follow(self.clone(), id));
            if let Some(old) = self.followers().insert(id, task) {
                old.abort();
            }
        }
    }

    /// Takes worker `url` out of rotation and forgets what it held.
    fn worker_down(&self, url: &str) {
        let Some(id) = self.workers.unlist(url) else {
            return;
        };
        tracing::info!(worker = %url, "worker left");
        if let Some(task) = self.followers().remove(&id) {
            task.abort();
        }
        self.index().drop_worker(id);
    }

    /// Applies what etcd says about the registered workers.
    fn apply_discovery(
        self: &Arc<Self>,
        keys: &mut std::collections::HashMap<String, String>,
        update: lastmile_discovery::WorkersUpdate,
    ) {
        use lastmile_discovery::WorkersUpdate;
        match update {
            WorkersUpdate::Snapshot(list) => {
                let now: std::collections::HashMap<String, String> =
                    list.into_iter().map(|(k, w)| (k, w.url)).collect();
                for url in keys.values() {
                    if !now.values().any(|u| u == url) && !self.config.workers.contains(url) {
                        self.worker_down(url);
                    }
                }
                for url in now.values() {
                    self.worker_up(url);
                }
                *keys = now;
            }
            WorkersUpdate::Up(key, info) => {
                self.worker_up(&info.url);
                keys.insert(key, info.url);
            }
            WorkersUpdate::Down(key) => {
                if let Some(url) = keys.remove(&key) {
                    // Another live key may name the same address (a re-registration).
                    if !keys.values().any(|u| *u == url) && !self.config.workers.contains(&url) {
                        self.worker_down(&url);
                    }
                }
            }
        }
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish. Checks every worker once before accepting traffic.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), std::io::Error> {
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let workers = Arc::new(Workers::new(&config));
    workers.check_all().await;
    let poller = tokio::spawn(workers.clone().poll(config.health_interval));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let gw = Arc::new(Gateway {
        policy: Policy::new(config.policy, seed).with_balance(config.kv_balance),
        metrics: Metrics::new(),
        index: Mutex::new(KvIndex::new()),
        hasher: AtomicUsize::new(0),
        followers: Mutex::new(std::collections::HashMap::new()),
        workers,
        config,
    });
    if gw.config.policy == PolicyKind::KvAware {
        for id in 0..gw.workers.all().len() {
            gw.followers()
                .insert(id, tokio::spawn(kv::follow(gw.clone(), id)));
        }
    }
    let discovery = gw.config.etcd.clone().map(|e| {
        let gw = gw.clone();
        tokio::spawn(async move {
            let mut keys = std::collections::HashMap::new();
            let etcd = lastmile_discovery::Etcd::new(e.endpoints);
            lastmile_discovery::follow_workers(etcd, e.prefix, move |u| {
                gw.apply_discovery(&mut keys, u)
            })
            .await;
        })
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/completions", post(proxy::forward))
        .route("/v1/messages", post(proxy::forward))
        .route("/v1/messages/count_tokens", post(proxy::forward))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(gw.clone());
    // Small writes (stream chunks, response heads) leave at once instead of waiting on Nagle.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    poller.abort();
    if let Some(d) = discovery {
        d.abort();
    }
    gw.followers().drain().for_each(|(_, f)| f.abort());
    result
}

/// Every model any available worker serves, once each.
async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    axum::Json(ModelList::new(model_cards(&gw).await)).into_response()
}

/// One model by id (ids may contain `/`), if any available worker serves it.
async fn model(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match model_cards(&gw).await.into_iter().find(|c| c.id == id) {
        Some(card) => axum::Json(card).into_response(),
        None => proxy::error_response("/v1/models", &ApiError::model_not_found(&id)),
    }
}

/// The model cards of every available worker, each model once.
async fn model_cards(gw: &Gateway) -> Vec<ModelCard> {
    let fetches = gw
        .workers
        .all()
        .into_iter()
        .filter(|w| w.available())
        .map(|w| {
            let url = format!("{}/v1/models", w.url);
            let client = gw.workers.client.clone();
            async move {
                let r = client
                    .get(url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .ok()?;
                r.json::<ModelList>().await.ok()
            }
        });
    let mut cards: Vec<ModelCard> = Vec::new();
    for list in futures::future::join_all(fetches)
        .await
        .into_iter()
        .flatten()
    {
        for card in list.data {
            if !cards.iter().any(|c| c.id == card.id) {
                cards.push(card);
            }
        }
    }
    cards
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let all = gw.workers.all();
    let up = all.iter().filter(|w| w.available()).count();
    let listed = all.iter().filter(|w| w.listed()).count();
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if up > 0 { "ok" } else { "unavailable" },
        "workers": listed,
        "available": up,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let body = gw
        .metrics
        .render(&gw.workers, gw.policy.kind(), &gw.index());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    proxy::error_response(uri.path(), &ApiError::not_found(uri.path()))
}
