//! The gateway: one public OpenAI / Anthropic endpoint in front of many workers. Each request
//! goes to a worker chosen by the deployment's routing policy (`lastmile_router`) over the
//! workers' health and load, with a retry on another worker when one cannot be reached and a
//! circuit breaker per worker; `/v1/models` lists the models of every worker.
//!
//! `kv_aware` routing follows every worker's KV event stream into a `KvIndex`, builds each
//! request's prompt itself with its model's tokenizer and chat template (loaded once from a
//! worker's `/internal/prompt-card`, no weights), hashes its blocks, then prefers the worker that
//! already holds the longest prefix, weighed against load; the tokens travel with the request so
//! the worker does not tokenize again. Workers come from a static list,
//! from etcd (`lastmile_discovery`: workers register under a lease, the gateway watches the
//! prefix and adds and drops them as they come and go), or both.
//!
//! Deployments (`GatewayConfig::deployments`) add the serverless path: requests are routed
//! only to workers serving the `model` they name, a deployment with no ready replica holds its
//! requests in the activator while the control plane starts one (`GatewayHandle::on_demand`,
//! `add_replica`), and `/v1/models` lists every deployment, also those at zero replicas.
#![warn(missing_docs)]

mod activator;
mod allow;
mod config;
mod disagg;
mod kv;
mod metrics;
mod proxy;
mod tenants;
mod workers;

pub use allow::WorkerAllow;
pub use config::{DeploymentRoute, EtcdDiscovery, GatewayConfig, GatewayError};
pub use disagg::DisaggRouting;
pub use tenants::{TenantsConfig, DEFAULT_MAX_IN_FLIGHT_PER_KEY};

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
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::workers::Workers;

/// Turns the gateway's app into the one served.
type RouterWrap = Box<dyn FnOnce(Router) -> Router + Send>;

/// Who called, as APIs beside the gateway's own see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerId {
    /// Anyone: the gateway has no keys.
    Open,
    /// The admin key.
    Admin,
    /// An API key, by id.
    Key(String),
}

/// Shared state of the gateway's handlers.
pub(crate) struct Gateway {
    pub(crate) config: GatewayConfig,
    pub(crate) workers: Arc<Workers>,
    /// The policy of requests that name no deployment.
    pub(crate) policy: Policy,
    /// Each deployment's policy.
    policies: std::collections::HashMap<String, Policy>,
    pub(crate) activator: activator::Activator,
    /// Keys, quotas, usage.
    pub(crate) tenants: Option<Arc<tenants::Tenants>>,
    /// More metrics text appended to `/metrics` (the control plane's).
    extra_metrics: std::sync::RwLock<Vec<MetricsHook>>,
    /// What wraps the app before it serves (more routes, layers: the sandbox API).
    wrap: Mutex<Option<RouterWrap>>,
    pub(crate) index: Mutex<KvIndex>,
    pub(crate) metrics: Metrics,
    /// When the gateway started (Unix seconds): the `created` of deployments' model cards.
    created: u64,
    /// Rotates which worker a prompt card is loaded from.
    hasher: AtomicUsize,
    /// `kv_aware`: each model's prompt builder (its workers' tokenizer and chat template).
    pub(crate) prompters: kv::Prompters,
    /// `kv_aware`: the task following each listed worker's KV events.
    followers: Mutex<std::collections::HashMap<usize, tokio::task::JoinHandle<()>>>,
}

/// A mutex's guard, also after a thread panicked holding it (the data stays usable: every
/// writer leaves it consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Renders more Prometheus text for `/metrics`.
type MetricsHook = Arc<dyn Fn() -> String + Send + Sync>;

impl Gateway {
    /// The deployment clients call `model`, if one is declared.
    pub(crate) fn deployment(&self, model: &str) -> Option<&DeploymentRoute> {
        self.config.deployments.iter().find(|d| d.name == model)
    }

    /// The largest context window reported by a worker that may serve `model` (what a request
    /// without an output limit may generate up to), if any has reported one.
    pub(crate) fn context_length(&self, model: Option<&str>) -> Option<u64> {
        self.workers
            .all()
            .iter()
            .filter(|w| w.serves(model))
            .filter_map(|w| w.context_length())
            .max()
    }

    /// What usage of a request naming `model` is recorded under: a declared deployment or a
    /// model a worker reports serving; `-` for anything else (no model, or a name nothing
    /// serves), so that clients cannot grow the ledger with made-up names.
    pub(crate) fn usage_deployment<'a>(&self, model: Option<&'a str>) -> &'a str {
        match model {
            Some(m)
                if self.deployment(m).is_some()
                    || self
                        .workers
                        .all()
                        .iter()
                        .any(|w| w.model().as_deref() == Some(m)) =>
            {
                m
            }
            _ => "-",
        }
    }

    /// Whether `headers` may read `/metrics` (it names keys and workers): with a metrics key,
    /// or the admin key when keys are on; anyone when neither is set.
    fn may_read_metrics(&self, headers: &axum::http::HeaderMap) -> bool {
        let keyed = self.tenants.as_ref().filter(|t| t.required());
        if self.config.metrics_key.is_none() && keyed.is_none() {
            return true;
        }
        self.config
            .metrics_key
            .as_deref()
            .is_some_and(|k| tenants::carries_key(headers, k))
            || keyed.is_some_and(|t| t.is_admin(headers))
    }

    /// The policy for requests naming `model`.
    pub(crate) fn policy_for(&self, model: Option<&str>) -> &Policy {
        model
            .and_then(|m| self.policies.get(m))
            .unwrap_or(&self.policy)
    }

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
        self.follow_if_kv_aware(id, None);
    }

    /// `kv_aware` routing for `model`: follows worker `id`'s KV events.
    fn follow_if_kv_aware(self: &Arc<Self>, id: usize, model: Option<&str>) {
        if self.policy_for(model).kind() == PolicyKind::KvAware {
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
    /// Whether a worker registered in etcd at `url` may join (logged when not).
    fn allowed(&self, url: &str) -> bool {
        let allow = self
            .config
            .etcd
            .as_ref()
            .map(|e| e.allow.as_slice())
            .unwrap_or(&[]);
        let ok = WorkerAllow::permits(allow, url);
        if !ok {
            tracing::warn!(worker = %url, "etcd: ignoring a worker outside the allow-list");
        }
        ok
    }

    fn apply_discovery(
        self: &Arc<Self>,
        keys: &mut std::collections::HashMap<String, String>,
        update: lastmile_discovery::WorkersUpdate,
    ) {
        use lastmile_discovery::WorkersUpdate;
        match update {
            WorkersUpdate::Snapshot(list) => {
                let now: std::collections::HashMap<String, String> = list
                    .into_iter()
                    .filter(|(_, w)| self.allowed(&w.url))
                    .map(|(k, w)| (k, w.url))
                    .collect();
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
                if self.allowed(&info.url) {
                    self.worker_up(&info.url);
                    keys.insert(key, info.url);
                }
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
    let handle = GatewayHandle::build(config)
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    handle.serve(listener, Router::new(), shutdown).await
}

/// Load of one deployment as the gateway sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeploymentLoad {
    /// Requests in flight on its workers through this gateway.
    pub in_flight: usize,
    /// Requests the activator holds for it.
    pub held: usize,
    /// The worst recent p90 time to first token its replicas report.
    pub ttft_p90: Option<Duration>,
    /// The worst recent p90 inter-token gap its replicas report.
    pub itl_p90: Option<Duration>,
    /// Requests that have arrived for it, ever.
    pub arrivals: u64,
}

/// A gateway, built and ready to serve; the control plane puts the replicas it starts in
/// rotation and takes them out through it, reads each deployment's load, and hears from the
/// activator when a deployment without replicas is asked for.
#[derive(Clone)]
pub struct GatewayHandle(Arc<Gateway>);

impl GatewayHandle {
    /// Checks `config` and every static worker's health once.
    pub async fn build(config: GatewayConfig) -> Result<Self, GatewayError> {
        config.validate()?;
        let workers = Arc::new(Workers::new(&config));
        workers.check_all().await;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let policies = config
            .deployments
            .iter()
            .map(|d| {
                let p = Policy::new(d.policy, seed).with_balance(config.kv_balance);
                (d.name.clone(), p)
            })
            .collect();
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let tenants = match &config.tenants {
            Some(t) => Some(Arc::new(tenants::Tenants::open(t)?)),
            None => None,
        };
        let gw = Arc::new(Gateway {
            created,
            tenants,
            policy: Policy::new(config.policy, seed).with_balance(config.kv_balance),
            policies,
            activator: activator::Activator::default(),
            extra_metrics: std::sync::RwLock::new(Vec::new()),
            wrap: Mutex::new(None),
            metrics: Metrics::new(),
            index: Mutex::new(KvIndex::new()),
            hasher: AtomicUsize::new(0),
            prompters: kv::Prompters::default(),
            followers: Mutex::new(std::collections::HashMap::new()),
            workers,
            config,
        });
        for id in 0..gw.workers.all().len() {
            gw.follow_if_kv_aware(id, None);
        }
        Ok(Self(gw))
    }

    /// Puts a replica of deployment `model` at `url` in rotation now (its supervisor has seen
    /// it healthy); requests held for the deployment flow to it at once.
    pub fn add_replica(&self, url: &str, model: &str) {
        let (id, new) = self.0.workers.add_ready(url, model);
        if new {
            tracing::info!(worker = %url, deployment = %model, "replica in rotation");
            self.0.follow_if_kv_aware(id, Some(model));
        }
    }

    /// Takes the replica at `url` out of rotation (before it is stopped, or after it died).
    pub fn remove_replica(&self, url: &str) {
        self.0.worker_down(url);
    }

    /// Requests in flight on, and held for, deployment `model`, and its replicas' worst
    /// recent p90 time to first token and inter-token gap.
    pub fn load(&self, model: &str) -> DeploymentLoad {
        let all = self.0.workers.all();
        let replicas = all
            .iter()
            .filter(|w| w.listed() && w.model().as_deref() == Some(model));
        let in_flight = replicas.clone().map(|w| w.in_flight()).sum();
        let latencies: Vec<_> = replicas.map(|w| w.latency_p90_ms()).collect();
        let worst = |pick: fn(&workers::LatencyP90) -> Option<f64>| {
            latencies
                .iter()
                .filter_map(pick)
                .max_by(f64::total_cmp)
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
        };
        DeploymentLoad {
            in_flight,
            held: self.0.activator.waiting(model),
            ttft_p90: worst(|l| l.ttft_ms),
            itl_p90: worst(|l| l.itl_ms),
            arrivals: self.0.activator.arrivals(model),
        }
    }

    /// The control plane reports `n` replicas of `deployment` starting: while any are, the
    /// activator lets through only what the ready replicas have room for.
    pub fn replicas_starting(&self, deployment: &str, n: usize) {
        self.0.activator.set_starting(deployment, n);
        if n == 0 {
            self.0.workers.became_available.notify_waiters();
        }
    }

    /// Calls `hook(deployment)` whenever a request waits for a deployment without a ready
    /// replica (often: it should be cheap and idempotent).
    pub fn on_demand(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.0.activator.set_on_demand(Arc::new(hook));
    }

    /// Appends `render()`'s Prometheus text (format 0.0.4, as
    /// `lastmile_http::metrics::Exposition::encode` writes it) to `/metrics`, after any added
    /// before.
    pub fn extra_metrics(&self, render: impl Fn() -> String + Send + Sync + 'static) {
        self.0
            .extra_metrics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(render));
    }

    /// Has `wrap` turn the gateway's app into the one served (adding routes or layers that
    /// must see requests first, as the sandbox API's data plane does).
    pub fn wrap_router(&self, wrap: impl FnOnce(Router) -> Router + Send + 'static) {
        *self.0.wrap.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(wrap));
    }

    /// Who sent `headers`, for APIs beside the gateway's own (sandboxes): the admin, an API
    /// key (by id), or anyone on an open gateway; an error status and message otherwise.
    pub fn caller(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<CallerId, (StatusCode, String)> {
        let Some(t) = &self.0.tenants else {
            return Ok(CallerId::Open);
        };
        t.caller_id(headers)
            .map_err(|e| (StatusCode::UNAUTHORIZED, e.message.clone()))
    }

    /// Serves on `listener`, with more `admin` routes (under `/admin`, guarded by the admin key
    /// like the gateway's own) beside the public API, until `shutdown` resolves; then lets
    /// in-flight requests finish and writes the last usage.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        admin: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), std::io::Error> {
        let gw = self.0;
        let flusher = gw
            .tenants
            .clone()
            .map(|t| tokio::spawn(t.flush_every_second()));
        let mut admin = tenants::routes(gw.clone()).merge(admin);
        if admin.has_routes() {
            admin = admin.route_layer(axum::middleware::from_fn_with_state(
                gw.clone(),
                tenants::require_admin,
            ));
        }
        let poller = tokio::spawn(gw.workers.clone().poll(gw.config.health_interval));
        let discovery = spawn_discovery(&gw)?;
        let loopback_only = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
        let app = app(&gw, admin, loopback_only);
        // Header and body timeouts and a connection cap (slow clients cannot take every
        // socket); small writes leave at once (no Nagle).
        let limits = lastmile_http::ServeLimits::default();
        let result = lastmile_http::serve(listener, app, limits, shutdown).await;
        poller.abort();
        if let Some(d) = discovery {
            d.abort();
        }
        gw.followers().drain().for_each(|(_, f)| f.abort());
        if let Some(f) = flusher {
            f.abort();
        }
        if let Some(t) = &gw.tenants {
            if let Err(e) = t.flush() {
                tracing::error!("writing the last usage: {e}");
            }
        }
        result
    }
}

/// Starts following the workers etcd lists, when the gateway discovers them there.
fn spawn_discovery(gw: &Arc<Gateway>) -> Result<Option<JoinHandle<()>>, std::io::Error> {
    Ok(match gw.config.etcd.clone() {
        Some(e) => {
            let etcd = lastmile_discovery::Etcd::connect(&e.client)
                .map_err(|err| std::io::Error::other(err.to_string()))?;
            let gw = gw.clone();
            Some(tokio::spawn(async move {
                let mut keys = std::collections::HashMap::new();
                lastmile_discovery::follow_workers(etcd, e.prefix, move |u| {
                    gw.apply_discovery(&mut keys, u)
                })
                .await;
            }))
        }
        None => None,
    })
}

/// The gateway's app: the public API, `admin` (already guarded), the request guard, and what
/// a [`GatewayHandle::wrap_router`] hook adds around them.
fn app(gw: &Arc<Gateway>, admin: Router, loopback_only: bool) -> Router {
    let wrap = gw.wrap.lock().unwrap_or_else(|e| e.into_inner()).take();
    let app = Router::new()
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/completions", post(proxy::forward))
        .route("/v1/messages", post(proxy::forward))
        .route("/v1/messages/count_tokens", post(proxy::forward))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(gw.clone())
        .merge(admin)
        .route_layer(axum::middleware::from_fn_with_state(
            lastmile_http::Guard {
                loopback_only,
                json_posts: true,
                render: proxy::error_response,
            },
            lastmile_http::guard,
        ))
        .fallback(not_found);
    match wrap {
        // What the wrap added (the sandbox API, whose uploads are not JSON) gets the `Host`
        // rule: a DNS-rebinding page must not reach it either.
        Some(w) => w(app).layer(axum::middleware::from_fn_with_state(
            lastmile_http::Guard {
                loopback_only,
                json_posts: false,
                render: proxy::error_response,
            },
            lastmile_http::guard,
        )),
        None => app,
    }
}

/// Every model any available worker serves, once each.
async fn models(State(gw): State<Arc<Gateway>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(Err(e)) = gw.tenants.as_ref().map(|t| t.authenticate(&headers)) {
        return proxy::error_response("/v1/models", &e);
    }
    axum::Json(ModelList::new(model_cards(&gw).await)).into_response()
}

/// One model by id (ids may contain `/`), if any available worker serves it.
async fn model(
    State(gw): State<Arc<Gateway>>,
    headers: axum::http::HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Some(Err(e)) = gw.tenants.as_ref().map(|t| t.authenticate(&headers)) {
        return proxy::error_response("/v1/models", &e);
    }
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
                workers::json_capped::<ModelList>(r, workers::LIST_REPLY).await
            }
        });
    let mut cards: Vec<ModelCard> = Vec::new();
    let lists = futures::future::join_all(fetches).await;
    // Deployments first, in their declared order: also those with no replica running.
    for d in &gw.config.deployments {
        let from_replica = lists
            .iter()
            .flatten()
            .flat_map(|l| &l.data)
            .find(|c| c.id == d.name);
        cards.push(
            from_replica
                .cloned()
                .unwrap_or_else(|| ModelCard::new(d.name.clone(), gw.created, "lastmile")),
        );
    }
    for list in lists.into_iter().flatten() {
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
    // Deployments can serve at zero replicas: the activator starts one on demand.
    let serving = up > 0 || !gw.config.deployments.is_empty();
    let status = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if serving { "ok" } else { "unavailable" },
        "workers": listed,
        "available": up,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>, headers: axum::http::HeaderMap) -> Response {
    if !gw.may_read_metrics(&headers) {
        return proxy::error_response(
            "/metrics",
            &ApiError::invalid_api_key(
                "/metrics needs the metrics key or the admin key (`Authorization: Bearer KEY`).",
            ),
        );
    }
    let mut page = lastmile_http::metrics::Exposition::new();
    gw.metrics
        .render(&mut page, &gw.workers, gw.policy.kind(), &gw.index());
    gw.metrics
        .render_activator(&mut page, &gw.config.deployments, &gw.activator);
    if gw.config.disagg.is_some() {
        gw.metrics.disagg.write(&mut page);
    }
    if let Some(t) = &gw.tenants {
        t.metrics(&mut page);
    }
    let mut body = page.encode();
    // Other parts' pages (the control plane's, the sandboxes'): the text format has no end
    // marker, so pages concatenate.
    let extra = gw
        .extra_metrics
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for render in extra {
        body.push_str(&render());
    }
    (
        [(header::CONTENT_TYPE, lastmile_http::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    proxy::error_response(uri.path(), &ApiError::not_found(uri.path()))
}
