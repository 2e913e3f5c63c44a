//! The code interpreter's HTTP API (port 49999): `POST /execute` runs a cell and answers
//! newline-delimited JSON as it runs (`number_of_executions`, `stdout`, `stderr`, `result`,
//! `error`); `/contexts` creates, lists, restarts and removes contexts.
//!
//! A client that leaves mid-cell interrupts it (SIGINT, then the cell's end is drained), so
//! the context is ready for the next one.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Api, ApiFailure, Current};
use crate::conn::ProcEvent;
use crate::interpreter::Context;
use crate::service::Sandbox;
use crate::wire::{Failure, Request as AgentRequest};

/// The routes.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/execute", post(execute))
        .route("/contexts", get(list).post(create))
        .route("/contexts/{id}", delete(remove))
        .route("/contexts/{id}/restart", post(restart))
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
}

fn failure(f: Failure) -> Response {
    let status = match f.code.as_str() {
        "not_found" => StatusCode::NOT_FOUND,
        "invalid_argument" => StatusCode::BAD_REQUEST,
        "unavailable" => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiFailure(status, f.message).into_response()
}

fn context_json(c: &Context) -> Value {
    json!({ "id": c.id, "language": c.language, "cwd": c.cwd })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ExecuteRequest {
    code: String,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CreateContext {
    language: Option<String>,
    cwd: Option<String>,
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

async fn execute(State(api): State<Api>, axum::Extension(sb): Current, body: Bytes) -> Response {
    let req: ExecuteRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiFailure(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let ctx = match (&req.context_id, &req.language) {
        (Some(_), Some(_)) => {
            return ApiFailure(
                StatusCode::BAD_REQUEST,
                "give a context or a language, not both".into(),
            )
            .into_response()
        }
        (Some(id), None) => match sb.contexts.get(id) {
            Some(c) => c,
            None => {
                return ApiFailure(StatusCode::NOT_FOUND, format!("context `{id}` not found"))
                    .into_response()
            }
        },
        (None, lang) => match sb
            .contexts
            .default_for(&sb.conn, lang.as_deref().unwrap_or("python"))
            .await
        {
            Ok(c) => c,
            Err(f) => return failure(f),
        },
    };
    if let Some(bad) = req
        .env_vars
        .as_ref()
        .and_then(|m| m.keys().find(|k| !crate::backend::valid_env_name(k)))
    {
        return ApiFailure(
            StatusCode::BAD_REQUEST,
            format!("environment variable name `{bad}`"),
        )
        .into_response();
    }
    api.svc.metrics.executions.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    tokio::spawn(run_cell(
        sb,
        ctx,
        req.code,
        req.env_vars.unwrap_or_default(),
        tx,
    ));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Runs one cell: holds the context, sends the code, relays its lines until its end.
async fn run_cell(
    sb: Arc<Sandbox>,
    ctx: Arc<Context>,
    code: String,
    env: std::collections::BTreeMap<String, String>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let _cell = ctx.cell.lock().await;
    let Some(mut events) = ctx.attach() else {
        let _ = tx
            .send(Ok(error_line("ContextDied", "the context's process ended")))
            .await;
        sb.contexts.remove(&ctx.id);
        return;
    };
    let line = json!({ "code": code, "env": env }).to_string() + "\n";
    if let Err(f) = sb.conn.stdin(ctx.pid, line.into_bytes().into()).await {
        ctx.detach();
        let _ = tx.send(Ok(error_line("ContextError", &f.message))).await;
        return;
    }
    let mut pending = Vec::new();
    let mut client = true;
    loop {
        // The process ended (its stream closed, or its end came): the context is gone.
        let ev = match events.recv().await {
            Some(ProcEvent::End(_)) | None => {
                if client {
                    let _ = tx
                        .send(Ok(error_line("ContextDied", "the context's process ended")))
                        .await;
                }
                sb.contexts.remove(&ctx.id);
                return;
            }
            Some(ev) => ev,
        };
        let mut out: Vec<Bytes> = Vec::new();
        let ended = cell_lines(ev, &mut pending, &mut out);
        for b in out {
            if client && tx.send(Ok(b)).await.is_err() {
                // The client left mid-cell: interrupt it and drain to its end.
                client = false;
                let _ = sb
                    .conn
                    .call(&AgentRequest::Signal {
                        pid: ctx.pid,
                        signal: libc::SIGINT,
                    })
                    .await;
            }
        }
        if ended {
            ctx.detach();
            return;
        }
    }
}

/// Adds to `out` the lines to relay for one event of a cell's process (`pending` holds a partial
/// stdout line between events; stdout and stderr lines get a timestamp); true once the cell's
/// end line came.
fn cell_lines(ev: ProcEvent, pending: &mut Vec<u8>, out: &mut Vec<Bytes>) -> bool {
    match ev {
        ProcEvent::Stdout(b) => {
            pending.extend_from_slice(&b);
            while let Some(nl) = pending.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let Ok(mut v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if v["type"] == "end" {
                    return true;
                }
                if matches!(v["type"].as_str(), Some("stdout" | "stderr")) {
                    v["timestamp"] = json!(now_ns() as u64);
                }
                out.push(Bytes::from(v.to_string() + "\n"));
            }
        }
        ProcEvent::Stderr(b) => {
            let v = json!({
                "type": "stderr",
                "text": String::from_utf8_lossy(&b),
                "timestamp": now_ns() as u64,
            });
            out.push(Bytes::from(v.to_string() + "\n"));
        }
        ProcEvent::End(_) => {} // handled by the caller
    }
    false
}

fn error_line(name: &str, value: &str) -> Bytes {
    let v = json!({ "type": "error", "name": name, "value": value, "traceback": "" });
    Bytes::from(v.to_string() + "\n")
}

async fn create(axum::Extension(sb): Current, body: Bytes) -> Response {
    let req: CreateContext = if body.is_empty() {
        CreateContext::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return ApiFailure(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    };
    match sb
        .contexts
        .create(
            &sb.conn,
            req.language.as_deref().unwrap_or("python"),
            req.cwd.as_deref(),
            None,
        )
        .await
    {
        Ok(c) => axum::Json(context_json(&c)).into_response(),
        Err(f) => failure(f),
    }
}

async fn list(axum::Extension(sb): Current) -> Response {
    let v: Vec<Value> = sb.contexts.list().iter().map(|c| context_json(c)).collect();
    axum::Json(v).into_response()
}

async fn remove(axum::Extension(sb): Current, Path(id): Path<String>) -> Response {
    match sb.contexts.remove(&id) {
        Some(c) => {
            let _ = sb
                .conn
                .call(&AgentRequest::Signal {
                    pid: c.pid,
                    signal: libc::SIGKILL,
                })
                .await;
            StatusCode::NO_CONTENT.into_response()
        }
        None => {
            ApiFailure(StatusCode::NOT_FOUND, format!("context `{id}` not found")).into_response()
        }
    }
}

async fn restart(axum::Extension(sb): Current, Path(id): Path<String>) -> Response {
    let Some(old) = sb.contexts.remove(&id) else {
        return ApiFailure(StatusCode::NOT_FOUND, format!("context `{id}` not found"))
            .into_response();
    };
    let _ = sb
        .conn
        .call(&AgentRequest::Signal {
            pid: old.pid,
            signal: libc::SIGKILL,
        })
        .await;
    match sb
        .contexts
        .create(
            &sb.conn,
            &old.language,
            Some(&old.cwd),
            Some(old.id.clone()),
        )
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(f) => failure(f),
    }
}
