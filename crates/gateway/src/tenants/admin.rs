//! The tenants' admin routes, and the guard on every `/admin` route:
//! - `POST /admin/keys` `{"name": "team-a", "rpm": 60, "tpm": 100000}` creates a key and returns
//!   its secret once (`"key": "lm-..."`); `GET /admin/keys` lists keys (never secrets);
//!   `DELETE /admin/keys/{id}` revokes one.
//! - `GET /admin/usage?key=ID&deployment=NAME&from=UNIX&to=UNIX` returns usage per key,
//!   deployment and minute, with totals.
//!
//! With an admin key configured, every `/admin` route needs it (`Authorization: Bearer` or
//! `x-api-key`); otherwise 401.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use lastmile_protocol::ApiError;
use serde::Deserialize;
use serde_json::json;

use super::store::UsageQuery;
use crate::Gateway;

fn api_error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

/// Answers 401 unless the request carries the admin key (when one is configured).
pub(crate) async fn require_admin(
    State(gw): State<Arc<Gateway>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(t) = &gw.tenants {
        if !t.is_admin(req.headers()) {
            return api_error(&ApiError::invalid_api_key(
                "The admin API needs the admin key (`Authorization: Bearer ADMIN_KEY`).",
            ));
        }
    }
    next.run(req).await
}

/// The key and usage routes (empty without tenants).
pub(crate) fn routes(gw: Arc<Gateway>) -> Router {
    if gw.tenants.is_none() {
        return Router::new();
    }
    Router::new()
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{id}", delete(revoke_key))
        .route("/admin/usage", get(usage))
        .with_state(gw)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    rpm: Option<u64>,
    #[serde(default)]
    tpm: Option<u64>,
}

async fn create_key(State(gw): State<Arc<Gateway>>, body: axum::body::Bytes) -> Response {
    let Some(t) = &gw.tenants else {
        return api_error(&ApiError::not_found("/admin/keys"));
    };
    let new: NewKey = match lastmile_protocol::parse_json(&body) {
        Ok(n) => n,
        Err(e) => return api_error(&e),
    };
    if new.name.trim().is_empty() {
        return api_error(&ApiError::invalid_request(
            "`name` must not be empty",
            Some("name"),
        ));
    }
    if new.rpm == Some(0) || new.tpm == Some(0) {
        return api_error(&ApiError::invalid_request(
            "limits must be at least 1 (leave one out for no limit)",
            Some(if new.rpm == Some(0) { "rpm" } else { "tpm" }),
        ));
    }
    match t.create_key(new.name.trim(), new.rpm, new.tpm) {
        Ok((record, secret)) => {
            let mut body = serde_json::to_value(&record).unwrap_or_default();
            body["key"] = json!(secret);
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        Err(e) => api_error(&ApiError::internal(e.to_string())),
    }
}

async fn list_keys(State(gw): State<Arc<Gateway>>) -> Response {
    let Some(t) = &gw.tenants else {
        return api_error(&ApiError::not_found("/admin/keys"));
    };
    let keys = super::lock(&t.store).keys();
    match keys {
        Ok(keys) => axum::Json(json!({"object": "list", "data": keys})).into_response(),
        Err(e) => api_error(&ApiError::internal(e.to_string())),
    }
}

async fn revoke_key(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let Some(t) = &gw.tenants else {
        return api_error(&ApiError::not_found("/admin/keys"));
    };
    match t.revoke_key(&id) {
        Ok(true) => axum::Json(json!({"id": id, "revoked": true})).into_response(),
        Ok(false) => api_error(&ApiError::not_found(&format!("/admin/keys/{id}"))),
        Err(e) => api_error(&ApiError::internal(e.to_string())),
    }
}

#[derive(Deserialize)]
struct UsageParams {
    key: Option<String>,
    deployment: Option<String>,
    from: Option<i64>,
    to: Option<i64>,
}

async fn usage(State(gw): State<Arc<Gateway>>, Query(p): Query<UsageParams>) -> Response {
    let Some(t) = &gw.tenants else {
        return api_error(&ApiError::not_found("/admin/usage"));
    };
    // What was counted but not yet written is part of the answer.
    if let Err(e) = t.flush() {
        return api_error(&ApiError::internal(e.to_string()));
    }
    let q = UsageQuery {
        key: p.key,
        deployment: p.deployment,
        from: p.from,
        to: p.to,
    };
    let rows = super::lock(&t.store).usage(&q);
    match rows {
        Ok(rows) => {
            let sum = |f: fn(&super::UsageRow) -> u64| rows.iter().map(f).sum::<u64>();
            let totals = json!({
                "requests": sum(|r| r.requests),
                "input_tokens": sum(|r| r.input_tokens),
                "output_tokens": sum(|r| r.output_tokens),
            });
            axum::Json(json!({"object": "list", "data": rows, "totals": totals})).into_response()
        }
        Err(e) => api_error(&ApiError::internal(e.to_string())),
    }
}
