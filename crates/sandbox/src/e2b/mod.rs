//! E2B's API, so the official `e2b` and `e2b-code-interpreter` SDKs work against lastmile
//! unchanged (`E2B_API_URL` and `E2B_SANDBOX_URL` both pointing at it, `E2B_API_KEY` a
//! lastmile API key).
//!
//! - **Control plane** ([`control`]): `/sandboxes`, `/v2/sandboxes`, keyed by `X-API-KEY`.
//! - **Data plane**: one URL for every sandbox; a request carrying `E2b-Sandbox-Id` is one
//!   sandbox's, whatever its path (so `/health` and `/files` of a sandbox never collide with
//!   the server's own), authorized by that sandbox's `X-Access-Token`, and routed by
//!   `E2b-Sandbox-Port`: 49983 is the in-sandbox daemon ([`process`], [`filesystem`], `/files`,
//!   `/health`), 49999 the code interpreter ([`interpreter`]).
//!
//! Errors take each plane's shape: `{"code": 404, "message"}` on the control plane and the
//! `/files` API, Connect's `{"code": "not_found", "message"}` on RPCs.

pub mod connect;
pub mod control;
pub mod filesystem;
pub mod interpreter;
pub mod process;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;

use crate::service::{Sandbox, SandboxService};
use crate::SandboxError;

/// The in-sandbox daemon's port (envd).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port.
pub const INTERPRETER_PORT: u16 = 49999;
/// The daemon version lastmile reports: 0.5.7 turns on the SDK's modern paths (octet-stream
/// uploads, no default user).
pub const ENVD_VERSION: &str = "0.5.7";

/// Who is calling, from the request's headers: the owner name ([`crate::service::ADMIN`] for
/// the admin), or why not (HTTP status and message).
pub type Authenticate =
    Arc<dyn Fn(&HeaderMap) -> Result<String, (StatusCode, String)> + Send + Sync>;

/// An open server's authenticator: everyone is the same owner, `-`.
pub fn open_access() -> Authenticate {
    Arc::new(|_| Ok("-".to_string()))
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    /// The service.
    pub svc: Arc<SandboxService>,
    /// The control plane's authenticator.
    pub auth: Authenticate,
}

/// An error in the control plane's shape (`{"code": 404, "message"}`).
#[derive(Debug)]
pub struct ApiFailure(pub StatusCode, pub String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.0.as_u16(), "message": self.1 });
        (self.0, axum::Json(body)).into_response()
    }
}

impl From<SandboxError> for ApiFailure {
    fn from(e: SandboxError) -> Self {
        Self(e.status(), e.to_string())
    }
}

/// Adds the sandbox API to `app`: the control plane's routes, and a layer that sends every
/// request carrying `E2b-Sandbox-Id` to that sandbox's data plane before `app` sees it.
pub fn wrap(app: Router, svc: Arc<SandboxService>, auth: Authenticate) -> Router {
    let api = Api { svc, auth };
    let data = DataPlane {
        envd: process::routes()
            .merge(filesystem::routes())
            .with_state(api.clone()),
        interpreter: interpreter::routes().with_state(api.clone()),
        api: api.clone(),
    };
    control::routes()
        .with_state(api)
        .merge(app)
        .layer(axum::middleware::from_fn_with_state(data, dispatch))
}

/// `/admin/sandboxes` (every owner's sandboxes, with their use) and
/// `DELETE /admin/sandboxes/{id}`, for the server's admin routes (which check the admin key).
pub fn admin_router(svc: Arc<SandboxService>) -> Router {
    use axum::extract::Path;
    use axum::routing::get;
    let list = |State(svc): State<Arc<SandboxService>>| async move {
        let v: Vec<serde_json::Value> = svc
            .all()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "sandboxID": s.id,
                    "owner": s.owner,
                    "templateID": s.template.name,
                    "startedAt": rfc3339(s.started_at),
                    "endAt": rfc3339(s.end_at()),
                    "cpuCount": s.template.cpus,
                    "memoryMB": s.template.memory_mb,
                    "memoryUsedBytes": s.memory_bytes(),
                    "cpuUsedSeconds": s.cpu_ns().map(|ns| ns as f64 / 1e9),
                    "oomEvents": s.oom_events(),
                    "processes": s.conn.processes().len(),
                    "metadata": s.metadata,
                })
            })
            .collect();
        axum::Json(serde_json::json!({ "backend": svc.backend(), "sandboxes": v }))
    };
    let kill = |State(svc): State<Arc<SandboxService>>, Path(id): Path<String>| async move {
        match svc.kill(crate::service::ADMIN, &id).await {
            Ok(()) => no_content(),
            Err(e) => ApiFailure::from(e).into_response(),
        }
    };
    Router::new()
        .route("/admin/sandboxes", get(list))
        .route("/admin/sandboxes/{id}", axum::routing::delete(kill))
        .with_state(svc)
}

/// The routers behind the data-plane headers.
#[derive(Clone)]
struct DataPlane {
    envd: Router,
    interpreter: Router,
    api: Api,
}

async fn dispatch(State(dp): State<DataPlane>, mut req: Request, next: Next) -> Response {
    let Some(id) = header(req.headers(), "e2b-sandbox-id") else {
        return next.run(req).await;
    };
    let port: u16 = header(req.headers(), "e2b-sandbox-port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(ENVD_PORT);
    let Some(sandbox) = dp.api.svc.by_id(&id) else {
        return sandbox_gone(&id);
    };
    let presented = header(req.headers(), "x-access-token")
        .or_else(|| header(req.headers(), "e2b-traffic-access-token"));
    if !presented.is_some_and(|t| constant_time_eq(t.as_bytes(), sandbox.access_token.as_bytes())) {
        // The same answer as for a sandbox that does not exist: ids cannot be probed.
        return sandbox_gone(&id);
    }
    if sandbox.is_paused() {
        return ApiFailure(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id} is paused: connect to it to resume it"),
        )
        .into_response();
    }
    req.extensions_mut().insert(sandbox.clone());
    let router = match port {
        ENVD_PORT => dp.envd,
        INTERPRETER_PORT if sandbox.template.code_interpreter => dp.interpreter,
        _ => {
            return ApiFailure(
                StatusCode::BAD_GATEWAY,
                format!("The sandbox {id} is running but port {port} is not open"),
            )
            .into_response()
        }
    };
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// What the SDK reads as "sandbox not found / not running" on the data plane.
fn sandbox_gone(id: &str) -> Response {
    ApiFailure(
        StatusCode::BAD_GATEWAY,
        format!("The sandbox {id} was not found: it is not running or never existed"),
    )
    .into_response()
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The sandbox a data-plane request was routed to.
pub type Current = axum::Extension<Arc<Sandbox>>;

/// RFC 3339 in UTC with milliseconds, as E2B's API writes times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// An empty body for 204s.
pub fn no_content() -> Response {
    (StatusCode::NO_CONTENT, Body::empty()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_139_274_123);
        assert_eq!(rfc3339(t), "2026-12-01T15:34:34.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
