//! The admin API's deployment routes (read-only): `GET /admin/deployments` lists every
//! deployment with its settings and live state (replicas desired, ready, starting; cold starts;
//! crashes; requests in flight and held), `GET /admin/deployments/{name}` shows one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use lastmile_protocol::ApiError;
use serde_json::{json, Value};

use crate::controller::{Controller, DeploymentStatus};
use crate::deployments::DeploymentSpec;

/// The admin routes over `controller`, to merge into the gateway's router.
pub fn router(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/admin/deployments", get(list))
        .route("/admin/deployments/{name}", get(one))
        .with_state(controller)
}

async fn list(State(c): State<Arc<Controller>>) -> Response {
    let data: Vec<Value> = c
        .deployments()
        .iter()
        .map(|(spec, status)| describe(spec, status))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

async fn one(State(c): State<Arc<Controller>>, Path(name): Path<String>) -> Response {
    match c.deployments().iter().find(|(spec, _)| spec.name == name) {
        Some((spec, status)) => axum::Json(describe(spec, status)).into_response(),
        None => {
            let e = ApiError::not_found(&format!("/admin/deployments/{name}"));
            (StatusCode::NOT_FOUND, axum::Json(e.body())).into_response()
        }
    }
}

/// A deployment as JSON: its settings and its status.
fn describe(spec: &DeploymentSpec, status: &DeploymentStatus) -> Value {
    let a = &spec.autoscaling;
    json!({
        "name": spec.name,
        "model": spec.model.as_ref().map_or("default".to_string(), |p| p.display().to_string()),
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "target_concurrency": a.target_concurrency,
        "idle_timeout_s": a.idle_timeout.as_secs_f64(),
        "routing": spec.routing.name(),
        "threads": spec.threads,
        "queue": spec.queue,
        "hold_timeout_s": spec.hold_timeout.as_secs_f64(),
        "autoscaling": {
            "stable_window_s": a.stable_window.as_secs_f64(),
            "panic_window_s": a.panic_window.as_secs_f64(),
            "panic_threshold": a.panic_threshold,
            "scale_down_delay_s": a.scale_down_delay.as_secs_f64(),
            "max_scale_up_rate": a.max_scale_up_rate,
            "max_scale_down_rate": a.max_scale_down_rate,
            "ttft_p90_target_ms": a.ttft_p90_target.map(|d| d.as_secs_f64() * 1e3),
            "itl_p90_target_ms": a.itl_p90_target.map(|d| d.as_secs_f64() * 1e3),
        },
        "args": spec.args,
        "status": status,
    })
}
