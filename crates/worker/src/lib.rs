//! The HTTP face of one engine: the OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`), the Anthropic Messages API (`/v1/messages`), prefix-cache
//! events, `/health`, Prometheus `/metrics` and the OpenAPI document (`/openapi.json`).
//!
//! Every public endpoint is one row of [`routes`]; the OpenAPI document's tests check that it
//! describes exactly those rows. [`serve`] refuses what a web page could send to drive the
//! worker (`lastmile_protocol::request_guard`): a foreign `Host` on a loopback listener, a POST
//! that is not JSON.
#![warn(missing_docs)]

mod anthropic;
mod disagg;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod generation;
mod internal;
pub mod kv_transport;
mod metrics;
mod openai;
mod openapi;
mod prompt;
mod tools;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::Router;
use lastmile_engine::EngineHandle;
use lastmile_protocol::{ApiError, ModelCard, ModelList};

pub use disagg::DisaggConfig;
pub use error::{api_response, WorkerError};
pub use kv_transport::{KvBytes, KvTransport, TransportError};
pub use metrics::Metrics;
pub use prompt::{Api, PromptCard, Prompter, MAX_HEADER_TOKENS, PROMPT_HEADER};

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id clients must name.
    pub model_id: String,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// How this process started, stage by stage in milliseconds (reported by `/health`, for
    /// cold-start breakdowns).
    pub startup_ms: Vec<(String, f64)>,
    /// Its part in disaggregated prefill and decode (default: serves whole requests, no KV
    /// transfer).
    pub disagg: DisaggConfig,
}

/// Shared state of every handler.
pub(crate) struct AppState {
    pub(crate) engine: EngineHandle,
    /// Builds prompts (and describes how, for the gateway).
    pub(crate) prompter: Prompter,
    pub(crate) config: ServerConfig,
    pub(crate) metrics: Metrics,
    pub(crate) created: u64,
    /// KV transfer: leases held for decode workers, pulls from prefill workers.
    pub(crate) transfers: disagg::Transfers,
}

impl AppState {
    pub(crate) fn new(engine: EngineHandle, config: ServerConfig) -> Self {
        let (tokenizer, template) = engine.prompt_parts();
        Self {
            prompter: Prompter::new(tokenizer, template, engine.info().block_size),
            transfers: disagg::Transfers::new(config.disagg.clone()),
            engine,
            config,
            metrics: Metrics::default(),
            created: unix_now(),
        }
    }
}

impl AppState {
    /// The tokens a [`PROMPT_HEADER`] value carries, when this worker can use them (counted).
    pub(crate) fn given_tokens(&self, header: Option<&str>) -> Option<Vec<u32>> {
        let tokens = self.prompter.read_header(header?)?;
        self.metrics
            .given_prompts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(tokens)
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One public endpoint: method, path (axum's `{param}` syntax, which is also OpenAPI's) and
/// handler. Built only by [`Route::get`] and [`Route::post`], so the method always matches the
/// handler's method router.
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    handler: MethodRouter<Arc<AppState>>,
}

impl Route {
    fn get<H: Handler<T, Arc<AppState>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self {
            method: Method::GET,
            path,
            handler: get(handler),
        }
    }

    fn post<H: Handler<T, Arc<AppState>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self {
            method: Method::POST,
            path,
            handler: post(handler),
        }
    }

    fn delete<H: Handler<T, Arc<AppState>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self {
            method: Method::DELETE,
            path,
            handler: delete(handler),
        }
    }
}

/// Every public endpoint, in the order `/openapi.json` lists them.
pub(crate) fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/chat/completions", openai::chat_completions),
        Route::post("/v1/completions", openai::completions),
        Route::get("/v1/models", models),
        Route::get("/v1/models/{id}", model),
        Route::post("/v1/messages", anthropic::messages),
        Route::post("/v1/messages/count_tokens", anthropic::count_tokens),
        Route::get("/v1/kv/events", kv_events),
        Route::get("/v1/kv/blocks", kv_blocks),
        Route::get("/health", health),
        Route::get("/metrics", metrics),
        Route::get("/openapi.json", openapi::openapi_json),
        Route::get("/internal/prompt-card", internal::prompt_card),
        Route::post("/internal/prefill", disagg::prefill),
        Route::get("/internal/kv/{lease}", disagg::blocks),
        Route::delete("/internal/kv/{lease}", disagg::release),
    ]
}

/// The router with every endpoint of [`routes`].
pub fn router(engine: EngineHandle, config: ServerConfig) -> Router {
    let state = Arc::new(AppState::new(engine, config));
    routes()
        .into_iter()
        .fold(Router::new(), |r, route| {
            tracing::debug!(method = %route.method, path = route.path, "route");
            r.route(route.path, route.handler)
        })
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: EngineHandle,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let loopback_only = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let app = router(engine, config).route_layer(axum::middleware::from_fn_with_state(
        lastmile_http::Guard {
            loopback_only,
            json_posts: true,
            render: guard_error,
        },
        lastmile_http::guard,
    ));
    // Header and body timeouts and a connection cap (slow clients cannot take every socket);
    // each streamed token leaves at once (no Nagle).
    let limits = lastmile_http::ServeLimits::default();
    lastmile_http::serve(listener, app, limits, shutdown).await
}

/// A refused request's error in its API's shape.
fn guard_error(path: &str, e: &ApiError) -> Response {
    if path.starts_with("/v1/messages") {
        error::error_body_response(
            e.status,
            lastmile_protocol::anthropic::AnthropicError::from(e.clone()).body(),
        )
    } else {
        api_response(e)
    }
}

fn card(s: &AppState) -> ModelCard {
    ModelCard::new(s.config.model_id.clone(), s.created, "lastmile")
        .with_max_model_len(s.engine.info().context_length as u32)
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(ModelList::new(vec![card(&s)])).into_response()
}

async fn model(
    State(s): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == s.config.model_id {
        axum::Json(card(&s)).into_response()
    } else {
        api_response(&ApiError::model_not_found(&id))
    }
}

/// An engine with work whose loop has not gone round for this long is reported stalled (a
/// step takes well under a second on the models served; a CPU 70B prefill chunk a few).
const STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// `200` with load and latency figures while the engine goes round; `503` with status
/// `stalled` once it has had work and not gone round for [`STALL_AFTER`] (a gateway then takes
/// the requests it is holding elsewhere).
async fn health(State(s): State<Arc<AppState>>) -> Response {
    let st = s.engine.stats();
    let stalled = st.stalled_for().filter(|d| *d >= STALL_AFTER);
    let load = |v: &std::sync::atomic::AtomicUsize| v.load(std::sync::atomic::Ordering::Relaxed);
    let mut body = serde_json::json!({
        "status": if stalled.is_some() { "stalled" } else { "ok" },
        "model": s.config.model_id,
        "role": s.transfers.role(),
        "context_length": s.engine.info().context_length,
        "device": s.engine.info().device,
        "draft_model": s.engine.info().draft.as_ref().map(|d| serde_json::json!({
            "arch": d.arch,
            "layers": d.layers,
            "weight_bytes_per_token": d.weight_bytes_per_token,
        })),
        "kernels": lastmile_engine::kernels::simd_name(),
        "running": load(&st.running),
        "waiting": load(&st.waiting),
        "queued_prefill_tokens": load(&st.queued_prefill_tokens),
        "kv_blocks_used": load(&st.kv_blocks_used),
        "kv_blocks_total": load(&st.kv_blocks_total),
        "ttft_p90_ms": s.metrics.recent_ttft_p90().map(|t| t * 1e3),
        "itl_p90_ms": s.metrics.recent_itl_p90().map(|t| t * 1e3),
        "startup_ms": s
            .config
            .startup_ms
            .iter()
            .map(|(stage, ms)| (stage.clone(), serde_json::json!(ms)))
            .collect::<serde_json::Map<_, _>>(),
    });
    match stalled {
        Some(d) => {
            body["stalled_ms"] = serde_json::json!(d.as_millis() as u64);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                axum::Json(body),
            )
                .into_response()
        }
        None => (StatusCode::OK, axum::Json(body)).into_response(),
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let body = s.metrics.render(s.engine.stats(), |page| {
        s.transfers.write_metrics(page);
        metrics::write_device(page, &s.engine.info().device);
    });
    (
        [(header::CONTENT_TYPE, lastmile_http::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// Server-sent events of the prefix cache: `data: {"type":"stored","hash":..,"parent":..}` and
/// `data: {"type":"removed","hash":..}`, from the moment of subscription. A subscriber that falls
/// behind gets `event: lagged` with the number of events it missed and should resynchronise.
///
/// A comment line (`: keep-alive`) goes out whenever the feed has been quiet for
/// `?keepalive_ms=` (100 ms to 10 min; default 10 s), so that a subscriber can tell a quiet
/// worker from a dead link and give the feed up after a few missed beats.
///
/// The feed ends when the worker starts shutting down, so that a subscribed gateway never holds
/// a graceful shutdown open.
async fn kv_events(
    State(s): State<Arc<AppState>>,
    draining: Option<axum::Extension<lastmile_http::Draining>>,
    uri: axum::http::Uri,
) -> Response {
    let beat = match keepalive_of(uri.query()) {
        Ok(beat) => beat,
        Err(e) => return api_response(&e),
    };
    let rx = s.engine.subscribe_kv_events();
    let stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match draining {
        Some(axum::Extension(d)) => Box::pin(d.started()),
        None => Box::pin(std::future::pending()),
    };
    let stream = futures::stream::unfold((rx, stop), move |(mut rx, mut stop)| async move {
        use tokio::sync::broadcast::error::RecvError;
        let frame = tokio::select! {
            r = rx.recv() => match r {
                Ok(e) => lastmile_protocol::sse_event(&e),
                Err(RecvError::Lagged(n)) => format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"),
                Err(RecvError::Closed) => return None,
            },
            () = tokio::time::sleep(beat) => ": keep-alive\n\n".to_string(),
            () = &mut stop => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(frame), (rx, stop)))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// The keep-alive period of a `/v1/kv/events` query (`keepalive_ms=`, 100 ms to 10 min).
fn keepalive_of(query: Option<&str>) -> Result<std::time::Duration, ApiError> {
    const RANGE: std::ops::RangeInclusive<u64> = 100..=600_000;
    let given = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("keepalive_ms="));
    let Some(given) = given else {
        return Ok(std::time::Duration::from_secs(10));
    };
    match given.parse::<u64>() {
        Ok(ms) if RANGE.contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
        _ => Err(ApiError::invalid_request(
            format!(
                "keepalive_ms must be a whole number of milliseconds from {} to {}, got {given:?}",
                RANGE.start(),
                RANGE.end()
            ),
            Some("keepalive_ms"),
        )),
    }
}

/// The hashes of every block in the prefix cache now (see `/v1/kv/events` for how a follower
/// combines the two).
async fn kv_blocks(State(s): State<Arc<AppState>>) -> Response {
    let body = serde_json::json!({
        "block_size": s.engine.info().block_size,
        "hashes": s.engine.cached_blocks(),
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    api_response(&ApiError::not_found(uri.path()))
}

async fn method_not_allowed() -> Response {
    api_response(&ApiError::method_not_allowed())
}
