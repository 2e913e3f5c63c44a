//! The control plane: create, list, describe, extend, connect to and kill sandboxes, keyed by
//! the caller's API key (`X-API-KEY`). A sandbox of another key answers 404, as one that does
//! not exist does.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{rfc3339, Api, ApiFailure, ENVD_VERSION};
use crate::backend::egress::EgressRules;
use crate::service::{CreateRequest, Sandbox};

/// The routes.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
}

fn owner(api: &Api, headers: &HeaderMap) -> Result<String, ApiFailure> {
    (api.auth)(headers).map_err(|(s, m)| ApiFailure(s, m))
}

/// A JSON request body (empty = defaults). A body must come as `application/json`: a page on
/// another site cannot send that without a CORS preflight, which is never granted.
fn json_body<T: for<'de> Deserialize<'de> + Default>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiFailure> {
    if body.is_empty() {
        return Ok(T::default());
    }
    let ctype = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !lastmile_protocol::request_guard::is_json(ctype) {
        return Err(ApiFailure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be sent as Content-Type: application/json".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiFailure(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    allow_internet_access: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access_snake: Option<bool>,
    network: Option<NetworkBody>,
}

/// The `Sandbox` answer to a create or connect.
fn created_json(s: &Sandbox) -> Value {
    json!({
        "templateID": s.template.name,
        "sandboxID": s.id,
        "clientID": "lastmile",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": s.access_token,
        "trafficAccessToken": s.access_token,
    })
}

/// `SandboxDetail` / `ListedSandbox`.
fn detail_json(s: &Sandbox, with_token: bool) -> Value {
    let mut v = json!({
        "templateID": s.template.name,
        "sandboxID": s.id,
        "clientID": "lastmile",
        "startedAt": rfc3339(s.started_at),
        "endAt": rfc3339(s.end_at()),
        "envdVersion": ENVD_VERSION,
        "cpuCount": s.template.cpus.ceil() as u64,
        "memoryMB": s.template.memory_mb,
        "diskSizeMB": s.template.disk_mb,
        "state": s.state(),
        "metadata": s.metadata,
    });
    if with_token {
        v["envdAccessToken"] = json!(s.access_token);
    }
    v
}

/// E2B's `network` option: where egress may go.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct NetworkBody {
    allow_out: Vec<String>,
    deny_out: Vec<String>,
}

async fn create(State(api): State<Api>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let r = async {
        let owner = owner(&api, &headers)?;
        let req: NewSandbox = json_body(&headers, &body)?;
        if req.template_id.is_empty() {
            return Err(ApiFailure(
                StatusCode::BAD_REQUEST,
                "templateID is required".into(),
            ));
        }
        let sandbox = api
            .svc
            .create(
                &owner,
                CreateRequest {
                    template: req.template_id,
                    timeout: req.timeout.map(Duration::from_secs),
                    metadata: req.metadata.unwrap_or_default(),
                    envs: req.env_vars.unwrap_or_default(),
                    network: match req
                        .allow_internet_access
                        .or(req.allow_internet_access_snake)
                    {
                        Some(true) => {
                            let n = req.network.unwrap_or_default();
                            Some(EgressRules::parse(&n.allow_out, &n.deny_out)?)
                        }
                        _ => None,
                    },
                },
            )
            .await?;
        Ok((StatusCode::CREATED, axum::Json(created_json(&sandbox))).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// `metadata=k1%3Dv1%26k2%3Dv2` (already percent-decoded once by the query parser).
fn metadata_filter(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(x) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matching(api: &Api, owner: &str, q: &ListQuery) -> Vec<std::sync::Arc<Sandbox>> {
    let want = q
        .metadata
        .as_deref()
        .map(metadata_filter)
        .unwrap_or_default();
    let states: Option<Vec<&str>> = q
        .state
        .as_deref()
        .map(|s| s.split(',').map(str::trim).collect());
    api.svc
        .list(owner)
        .into_iter()
        .filter(|s| {
            states.as_ref().is_none_or(|w| w.contains(&s.state()))
                && want.iter().all(|(k, v)| s.metadata.get(k) == Some(v))
        })
        .collect()
}

async fn list_v1(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    match owner(&api, &headers) {
        Ok(o) => {
            let v: Vec<Value> = matching(&api, &o, &q)
                .iter()
                .map(|s| detail_json(s, false))
                .collect();
            axum::Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn list_v2(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let owner = match owner(&api, &headers) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let all = matching(&api, &owner, &q);
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // The token is the id of the first sandbox of the next page (ids order the pages).
    let start = q
        .next_token
        .as_deref()
        .map(|t| all.iter().position(|s| s.id == t).unwrap_or(all.len()))
        .unwrap_or(0);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|s| detail_json(s, false))
        .collect();
    let mut resp = axum::Json(page).into_response();
    if let Some(next) = all.get(start + limit) {
        if let Ok(v) = HeaderValue::from_str(&next.id) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    resp
}

async fn detail(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = owner(&api, &headers).and_then(|o| Ok(api.svc.get(&o, &id)?));
    match r {
        Ok(s) => axum::Json(detail_json(&s, true)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn kill(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        let o = owner(&api, &headers)?;
        api.svc.kill(&o, &id).await?;
        Ok::<_, ApiFailure>(super::no_content())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TimeoutBody {
    timeout: Option<u64>,
}

/// The caller and the `timeout` (seconds) of a timeout or connect request.
fn timeout_request(
    api: &Api,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Option<u64>), ApiFailure> {
    let o = owner(api, headers)?;
    let b: TimeoutBody = json_body(headers, body)?;
    Ok((o, b.timeout))
}

async fn set_timeout(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r = (|| {
        let (o, t) = timeout_request(&api, &headers, &body)?;
        let t =
            t.ok_or_else(|| ApiFailure(StatusCode::BAD_REQUEST, "timeout is required".into()))?;
        api.svc.set_timeout(&o, &id, Duration::from_secs(t))?;
        Ok::<_, ApiFailure>(super::no_content())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Connecting resumes a paused sandbox (201) or keeps a running one alive at least `timeout`
/// more seconds (200).
async fn connect(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    resumed(&api, &headers, &id, &body, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Resumes `id` (running on if it was not paused: 200, or 409 with `strict`); 201 with the
/// sandbox when it was paused.
async fn resumed(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
    body: &[u8],
    strict: bool,
) -> Result<Response, ApiFailure> {
    let (o, t) = timeout_request(api, headers, body)?;
    let resumed = api.svc.resume(&o, id, t.map(Duration::from_secs)).await?;
    if strict && !resumed {
        return Err(ApiFailure(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    let s = api.svc.get(&o, id)?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(created_json(&s))).into_response())
}

/// Pauses a sandbox: 204, 409 when it already is.
async fn pause(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = async {
        let o = owner(&api, &headers)?;
        api.svc.pause(&o, &id).await?;
        Ok::<_, ApiFailure>(super::no_content())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Resumes a paused sandbox: 201 with the sandbox, 409 when it is running.
async fn resume(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    resumed(&api, &headers, &id, &body, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// One sample of the sandbox's use now, in E2B's metrics shape.
async fn metrics(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = owner(&api, &headers).and_then(|o| Ok(api.svc.get(&o, &id)?));
    match r {
        Ok(s) => {
            let mem = s.memory_bytes().unwrap_or(0);
            let elapsed = s
                .started_at
                .elapsed()
                .unwrap_or_default()
                .as_secs_f64()
                .max(1e-3);
            let cpu_pct = s
                .cpu_ns()
                .map(|ns| ns as f64 / 1e9 / elapsed * 100.0)
                .unwrap_or(0.0);
            axum::Json(json!([{
                "timestamp": rfc3339(std::time::SystemTime::now()),
                "timestampUnix": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs(),
                "cpuCount": s.template.cpus.ceil() as u64,
                "cpuUsedPct": cpu_pct,
                "memUsed": mem,
                "memTotal": s.template.memory_mb << 20,
                "memCache": 0,
                "diskUsed": 0,
                "diskTotal": s.template.disk_mb << 20,
            }]))
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode() {
        assert_eq!(
            metadata_filter("user=a&k=v%20w+x"),
            vec![
                ("user".to_string(), "a".to_string()),
                ("k".to_string(), "v w x".to_string())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
