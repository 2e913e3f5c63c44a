//! `filesystem.Filesystem` (stat, list, make dir, move, remove) and the daemon's HTTP file
//! API: `GET /files?path=` streams a file out, `POST /files?path=` streams one in (raw
//! `application/octet-stream`, or `multipart/form-data` with one `file` part per file, named
//! by its path). Nothing is buffered whole: bytes move in 64 KiB frames to and from the
//! agent, which does the work inside the sandbox. Relative paths are relative to
//! `/home/user`.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::connect::{self, RpcError};
use super::{Api, ApiFailure, Current};
use crate::wire::{Entry, Failure, Request as AgentRequest};

/// The routes: RPCs under `/filesystem.Filesystem/`, plus `/files` and `/health`.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
        .route(
            "/files",
            get(download)
                .post(upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
}

/// An entry in proto3 JSON (`filesystem.EntryInfo`).
pub fn entry_json(e: &Entry) -> Value {
    let kind = match e.kind.as_str() {
        "dir" => "FILE_TYPE_DIRECTORY",
        "symlink" => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_FILE",
    };
    let secs =
        std::time::UNIX_EPOCH + std::time::Duration::new(e.mtime_s.max(0) as u64, e.mtime_ns);
    let mut v = json!({
        "name": e.name,
        "type": kind,
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode & 0o7777,
        "permissions": permissions(e),
        "owner": e.owner,
        "group": e.group,
        "modifiedTime": super::rfc3339(secs),
    });
    if let Some(t) = &e.symlink_target {
        v["symlinkTarget"] = json!(t);
    }
    v
}

/// `ls -l` style permissions (`drwxr-xr-x`).
fn permissions(e: &Entry) -> String {
    let mut s = String::with_capacity(10);
    s.push(match e.kind.as_str() {
        "dir" => 'd',
        "symlink" => 'l',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (e.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PathRequest {
    path: String,
    depth: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

fn need_path(p: &str) -> Result<(), RpcError> {
    if p.is_empty() || p.contains('\0') {
        Err(RpcError::new(
            "invalid_argument",
            "path is empty or holds a NUL",
        ))
    } else {
        Ok(())
    }
}

async fn agent_entry(sb: &crate::service::Sandbox, req: AgentRequest) -> Result<Value, RpcError> {
    let v = sb.conn.call(&req).await?;
    let e: Entry =
        serde_json::from_value(v).map_err(|e| RpcError::new("internal", e.to_string()))?;
    Ok(json!({ "entry": entry_json(&e) }))
}

async fn stat(axum::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: PathRequest = connect::unary_request(&body)?;
            need_path(&r.path)?;
            agent_entry(&sb, AgentRequest::Stat { path: r.path }).await
        }
        .await,
    )
}

async fn list_dir(axum::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: PathRequest = connect::unary_request(&body)?;
            need_path(&r.path)?;
            let depth = r.depth.unwrap_or(1).clamp(1, 64);
            let v = sb
                .conn
                .call(&AgentRequest::ListDir {
                    path: r.path,
                    depth,
                })
                .await?;
            let entries: Vec<Entry> =
                serde_json::from_value(v).map_err(|e| RpcError::new("internal", e.to_string()))?;
            Ok(json!({ "entries": entries.iter().map(entry_json).collect::<Vec<_>>() }))
        }
        .await,
    )
}

async fn make_dir(axum::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: PathRequest = connect::unary_request(&body)?;
            need_path(&r.path)?;
            agent_entry(&sb, AgentRequest::MakeDir { path: r.path }).await
        }
        .await,
    )
}

async fn move_entry(axum::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: MoveRequest = connect::unary_request(&body)?;
            need_path(&r.source)?;
            need_path(&r.destination)?;
            agent_entry(
                &sb,
                AgentRequest::Move {
                    source: r.source,
                    destination: r.destination,
                },
            )
            .await
        }
        .await,
    )
}

async fn remove(axum::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: PathRequest = connect::unary_request(&body)?;
            need_path(&r.path)?;
            sb.conn.call(&AgentRequest::Remove { path: r.path }).await?;
            Ok(json!({}))
        }
        .await,
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WatchRequest {
    path: String,
    recursive: bool,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WatcherRequest {
    watcher_id: String,
}

/// A watch event in proto3 JSON (`filesystem.FilesystemEvent`).
fn event_json(e: &crate::wire::WatchEvent) -> Value {
    let t = match e.op.as_str() {
        "create" => "EVENT_TYPE_CREATE",
        "write" => "EVENT_TYPE_WRITE",
        "remove" => "EVENT_TYPE_REMOVE",
        "rename" => "EVENT_TYPE_RENAME",
        _ => "EVENT_TYPE_CHMOD",
    };
    json!({ "name": e.name, "type": t })
}

/// Streams a folder's changes until the client leaves.
async fn watch_dir(
    axum::extract::Extension(sb): Current,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r: WatchRequest = match connect::stream_request(&body) {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e).await,
    };
    if let Err(e) = need_path(&r.path) {
        return connect::stream_error(e).await;
    }
    let (watch, mut events) = match sb.conn.watch(&r.path, r.recursive).await {
        Ok(w) => w,
        Err(f) => return connect::stream_error(f.into()).await,
    };
    let (tx, resp) = connect::server_stream();
    let keepalive = connect::keepalive(&headers);
    tokio::spawn(async move {
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        if tx.send(&json!({ "start": {} })).await {
            loop {
                let msg = tokio::select! {
                    e = events.recv() => match e {
                        Some(e) => json!({ "filesystem": event_json(&e) }),
                        None => break,
                    },
                    _ = ticks.tick() => json!({ "keepalive": {} }),
                    () = tx.closed() => break,
                };
                if !tx.send(&msg).await {
                    break;
                }
            }
        }
        let _ = sb.conn.unwatch(watch).await;
        tx.finish(None).await;
    });
    resp
}

async fn create_watcher(axum::extract::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: WatchRequest = connect::unary_request(&body)?;
            need_path(&r.path)?;
            let (watch, events) = sb.conn.watch(&r.path, r.recursive).await?;
            Ok(json!({ "watcherId": sb.watchers.add(watch, events) }))
        }
        .await,
    )
}

async fn watcher_events(axum::extract::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: WatcherRequest = connect::unary_request(&body)?;
            let (_, events) = sb.watchers.get(&r.watcher_id).ok_or_else(|| {
                RpcError::new("not_found", format!("watcher {} not found", r.watcher_id))
            })?;
            let mut events = events.lock().await;
            let mut out = Vec::new();
            while let Ok(e) = events.try_recv() {
                out.push(event_json(&e));
            }
            Ok(json!({ "events": out }))
        }
        .await,
    )
}

async fn remove_watcher(axum::extract::Extension(sb): Current, body: Bytes) -> Response {
    connect::reply(
        async {
            let r: WatcherRequest = connect::unary_request(&body)?;
            let (watch, _) = sb.watchers.remove(&r.watcher_id).ok_or_else(|| {
                RpcError::new("not_found", format!("watcher {} not found", r.watcher_id))
            })?;
            sb.conn.unwatch(watch).await?;
            Ok(json!({}))
        }
        .await,
    )
}

/// `/files` errors in the daemon's shape, with the statuses the SDK maps to its exceptions.
fn file_failure(f: Failure) -> Response {
    let status = match f.code.as_str() {
        "not_found" => StatusCode::NOT_FOUND,
        "invalid_argument" | "already_exists" => StatusCode::BAD_REQUEST,
        "permission_denied" => StatusCode::FORBIDDEN,
        "resource_exhausted" => StatusCode::INSUFFICIENT_STORAGE,
        "unavailable" => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiFailure(status, f.message).into_response()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FileQuery {
    path: Option<String>,
}

async fn download(axum::Extension(sb): Current, Query(q): Query<FileQuery>) -> Response {
    let Some(path) = q.path.filter(|p| !p.is_empty() && !p.contains('\0')) else {
        return ApiFailure(
            StatusCode::BAD_REQUEST,
            "the `path` query parameter is required".into(),
        )
        .into_response();
    };
    match sb.conn.read_file(&path).await {
        Ok((_, rx)) => {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let body = Body::from_stream(futures::StreamExt::map(stream, |r| {
                r.map_err(|f| std::io::Error::other(f.message))
            }));
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(body)
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Err(f) => file_failure(f),
    }
}

fn write_info(e: &Entry) -> Value {
    json!({
        "name": e.name,
        "type": if e.kind == "dir" { "dir" } else { "file" },
        "path": e.path,
    })
}

async fn upload(
    axum::Extension(sb): Current,
    Query(q): Query<FileQuery>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    if headers.contains_key(header::CONTENT_ENCODING) {
        return ApiFailure(
            StatusCode::BAD_REQUEST,
            "compressed uploads are not supported; send the file uncompressed".into(),
        )
        .into_response();
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &()).await {
            Ok(m) => m,
            Err(e) => return ApiFailure(StatusCode::BAD_REQUEST, e.body_text()).into_response(),
        };
        let mut written = Vec::new();
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return ApiFailure(StatusCode::BAD_REQUEST, e.body_text()).into_response()
                }
            };
            let name = field.file_name().map(str::to_string);
            let path = match (&q.path, name) {
                (Some(p), _) if !p.is_empty() => p.clone(),
                (_, Some(n)) if !n.is_empty() => n,
                _ => {
                    return ApiFailure(StatusCode::BAD_REQUEST, "a file part has no path".into())
                        .into_response()
                }
            };
            match sb.conn.write_file(&path, field).await {
                Ok(e) => written.push(write_info(&e)),
                Err(f) => return file_failure(f),
            }
        }
        if written.is_empty() {
            return ApiFailure(StatusCode::BAD_REQUEST, "no file in the upload".into())
                .into_response();
        }
        return axum::Json(written).into_response();
    }
    let Some(path) = q.path.filter(|p| !p.is_empty() && !p.contains('\0')) else {
        return ApiFailure(
            StatusCode::BAD_REQUEST,
            "the `path` query parameter is required".into(),
        )
        .into_response();
    };
    let body = req.into_body().into_data_stream();
    match sb.conn.write_file(&path, body).await {
        Ok(e) => axum::Json(vec![write_info(&e)]).into_response(),
        Err(f) => file_failure(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_as_envd_writes_them() {
        let e = Entry {
            name: "a.txt".into(),
            kind: "file".into(),
            path: "/home/user/a.txt".into(),
            size: 5_000_000_000,
            mode: 0o100644,
            owner: "user".into(),
            group: "user".into(),
            mtime_s: 0,
            mtime_ns: 0,
            symlink_target: None,
        };
        let v = entry_json(&e);
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "5000000000");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["mode"], 0o644);
        assert_eq!(v["modifiedTime"], "1970-01-01T00:00:00.000Z");
    }
}
