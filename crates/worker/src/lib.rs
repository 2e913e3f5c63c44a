//! The HTTP face of one engine: the OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`), `/health` and Prometheus `/metrics`.
#![warn(missing_docs)]

mod anthropic;
mod error;
mod generation;
mod metrics;
mod openai;
mod tools;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use lastmile_engine::EngineHandle;
use lastmile_protocol::{ApiError, ModelCard, ModelList};

pub use error::{api_response, WorkerError};
pub use metrics::Metrics;

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id clients must name.
    pub model_id: String,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
}

/// Shared state of every handler.
pub(crate) struct AppState {
    pub(crate) engine: EngineHandle,
    pub(crate) config: ServerConfig,
    pub(crate) metrics: Metrics,
    pub(crate) created: u64,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The router with every endpoint.
pub fn router(engine: EngineHandle, config: ServerConfig) -> Router {
    let state = Arc::new(AppState {
        engine,
        config,
        metrics: Metrics::default(),
        created: unix_now(),
    });
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/kv/events", get(kv_events))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
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
    axum::serve(listener, router(engine, config))
        .with_graceful_shutdown(shutdown)
        .await
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

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let st = s.engine.stats();
    let body = serde_json::json!({
        "status": "ok",
        "model": s.config.model_id,
        "running": st.running.load(std::sync::atomic::Ordering::Relaxed),
        "waiting": st.waiting.load(std::sync::atomic::Ordering::Relaxed),
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let body = s.metrics.render(s.engine.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Server-sent events of the prefix cache: `data: {"type":"stored","hash":..,"parent":..}` and
/// `data: {"type":"removed","hash":..}`, from the moment of subscription. A subscriber that falls
/// behind gets `event: lagged` with the number of events it missed and should resynchronise.
async fn kv_events(State(s): State<Arc<AppState>>) -> Response {
    let rx = s.engine.subscribe_kv_events();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        use tokio::sync::broadcast::error::RecvError;
        let frame = match rx.recv().await {
            Ok(e) => lastmile_protocol::sse_event(&e),
            Err(RecvError::Lagged(n)) => format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(frame), rx))
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

async fn not_found(uri: axum::http::Uri) -> Response {
    api_response(&ApiError::not_found(uri.path()))
}

async fn method_not_allowed() -> Response {
    api_response(&ApiError::method_not_allowed())
}
