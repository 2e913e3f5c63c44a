//! `process.Process`: start commands (streamed output, exit code), reattach to them, list
//! them, feed their stdin, signal them.
//!
//! A `Start` stream sends `start {pid}` at once, then output, then `end`. A client that goes
//! away leaves its process running (that is what a background command is: reattach with
//! `Connect`); a client deadline (`connect-timeout-ms`) that passes kills it, as E2B's
//! daemon does.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::connect::{self, RpcError, StreamTx};
use super::{Api, Current};
use crate::conn::{Proc, ProcConfig, ProcEvent};
use crate::service::Sandbox;
use crate::wire::Request;

/// The routes, under `/process.Process/`.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect_to))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/Update", post(update))
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ProcessConfigJson {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StartRequest {
    process: Option<ProcessConfigJson>,
    pty: Option<Value>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SelectRequest {
    process: Option<Selector>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InputJson {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<InputJson>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SignalRequest {
    process: Option<Selector>,
    signal: Option<Value>,
}

/// A process by selector, or `not_found`.
fn select(sb: &Sandbox, sel: Option<Selector>) -> Result<std::sync::Arc<Proc>, RpcError> {
    let sel = sel.unwrap_or_default();
    let found = match (sel.pid, sel.tag.as_deref()) {
        (Some(pid), _) => sb.conn.process(pid),
        (None, Some(tag)) => sb.conn.process_by_tag(tag),
        (None, None) => return Err(RpcError::new("invalid_argument", "no process selected")),
    };
    found.ok_or_else(|| {
        let what = sel
            .pid
            .map(|p| p.to_string())
            .or(sel.tag)
            .unwrap_or_default();
        RpcError::new("not_found", format!("process {what} not found"))
    })
}

fn event(ev: Value) -> Value {
    json!({ "event": ev })
}

async fn start(
    State(api): State<Api>,
    axum::Extension(sb): Current,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: StartRequest = match connect::stream_request(&body) {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e).await,
    };
    let pty = req.pty.as_ref().map(pty_size);
    let p = req.process.unwrap_or_default();
    if p.cmd.is_empty() {
        return connect::stream_error(RpcError::new("invalid_argument", "process.cmd is empty"))
            .await;
    }
    if let Some(bad) = p.envs.keys().find(|k| !crate::backend::valid_env_name(k)) {
        return connect::stream_error(RpcError::new(
            "invalid_argument",
            format!(
                "environment variable name `{}` is not allowed",
                bad.chars().take(64).collect::<String>()
            ),
        ))
        .await;
    }
    let config = ProcConfig {
        cmd: p.cmd,
        args: p.args,
        envs: p.envs,
        cwd: p.cwd,
        pty,
    };
    let (proc, rx) = match sb
        .conn
        .spawn(config, req.stdin.unwrap_or(false), req.tag)
        .await
    {
        Ok(x) => x,
        Err(f) => return connect::stream_error(f.into()).await,
    };
    api.svc.metrics.commands.fetch_add(1, Ordering::Relaxed);
    let (tx, resp) = connect::server_stream();
    let deadline = connect::timeout(&headers);
    let keepalive = connect::keepalive(&headers);
    let terminal = proc.config.pty.is_some();
    tokio::spawn(follow(sb, proc.pid, terminal, rx, tx, deadline, keepalive));
    resp
}

/// `{"size": {"cols", "rows"}}` as `[cols, rows]` (80x24 when absent, at least 1x1).
fn pty_size(v: &Value) -> [u16; 2] {
    let dim = |k: &str, d: u64| {
        v.pointer(&format!("/size/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(d)
            .clamp(1, 10_000) as u16
    };
    [dim("cols", 80), dim("rows", 24)]
}

async fn connect_to(axum::Extension(sb): Current, headers: HeaderMap, body: Bytes) -> Response {
    let req: SelectRequest = match connect::stream_request(&body) {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e).await,
    };
    let proc = match select(&sb, req.process) {
        Ok(p) => p,
        Err(e) => return connect::stream_error(e).await,
    };
    let rx = proc.follow();
    let (tx, resp) = connect::server_stream();
    // A reattached client's deadline ends its stream, not the process.
    let deadline = connect::timeout(&headers).map(|d| (d, false));
    let terminal = proc.config.pty.is_some();
    tokio::spawn(follow_inner(
        sb,
        proc.pid,
        terminal,
        rx,
        tx,
        deadline,
        connect::keepalive(&headers),
    ));
    resp
}

async fn follow(
    sb: std::sync::Arc<Sandbox>,
    pid: u32,
    terminal: bool,
    rx: mpsc::Receiver<ProcEvent>,
    tx: StreamTx,
    deadline: Option<std::time::Duration>,
    keepalive: std::time::Duration,
) {
    follow_inner(
        sb,
        pid,
        terminal,
        rx,
        tx,
        deadline.map(|d| (d, true)),
        keepalive,
    )
    .await
}

/// Relays one process's events into a stream until it ends, the client leaves, or the
/// deadline passes (killing the process when `kill` says so).
async fn follow_inner(
    sb: std::sync::Arc<Sandbox>,
    pid: u32,
    terminal: bool,
    mut rx: mpsc::Receiver<ProcEvent>,
    tx: StreamTx,
    deadline: Option<(std::time::Duration, bool)>,
    keepalive: std::time::Duration,
) {
    if !tx.send(&event(json!({ "start": { "pid": pid } }))).await {
        return;
    }
    let sleep = tokio::time::sleep(
        deadline
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(86_400 * 365)),
    );
    tokio::pin!(sleep);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let msg = match ev {
                    Some(ProcEvent::Stdout(b)) if terminal => json!({ "data": { "pty": connect::b64(&b) } }),
                    Some(ProcEvent::Stdout(b)) => json!({ "data": { "stdout": connect::b64(&b) } }),
                    Some(ProcEvent::Stderr(b)) => json!({ "data": { "stderr": connect::b64(&b) } }),
                    Some(ProcEvent::End(exit)) => {
                        let end = json!({ "end": {
                            "exitCode": exit.exit_code,
                            "exited": exit.signal.is_none(),
                            "status": exit.status(),
                        }});
                        if tx.send(&event(end)).await {
                            tx.finish(None).await;
                        }
                        return;
                    }
                    None => {
                        tx.finish(Some(RpcError::new("unavailable", "the sandbox ended"))).await;
                        return;
                    }
                };
                if !tx.send(&event(msg)).await {
                    return;
                }
            }
            _ = ticks.tick() => {
                if !tx.send(&event(json!({ "keepalive": {} }))).await {
                    return;
                }
            }
            () = &mut sleep => {
                if deadline.is_some_and(|d| d.1) {
                    kill_if_running(&sb, pid).await;
                }
                tx.finish(Some(RpcError::new("deadline_exceeded", "the command's timeout passed"))).await;
                return;
            }
            () = tx.closed() => {
                // A client that gave up at its own deadline still has the process stopped then.
                if deadline.is_some_and(|d| d.1) {
                    sleep.await;
                    kill_if_running(&sb, pid).await;
                }
                return;
            }
        }
    }
}

/// SIGKILLs `pid`'s group if that process is still the one we started.
async fn kill_if_running(sb: &Sandbox, pid: u32) {
    if sb.conn.process(pid).is_some() {
        let _ = sb
            .conn
            .call(&Request::Signal {
                pid,
                signal: libc::SIGKILL,
            })
            .await;
    }
}

async fn list(axum::Extension(sb): Current, body: Bytes) -> Response {
    if let Err(e) = connect::unary_request::<Value>(&body) {
        return axum::response::IntoResponse::into_response(e);
    }
    let processes: Vec<Value> = sb
        .conn
        .processes()
        .iter()
        .map(|p| {
            let mut v = json!({
                "config": {
                    "cmd": p.config.cmd,
                    "args": p.config.args,
                    "envs": p.config.envs,
                },
                "pid": p.pid,
            });
            if let Some(cwd) = &p.config.cwd {
                v["config"]["cwd"] = json!(cwd);
            }
            if let Some(tag) = &p.tag {
                v["tag"] = json!(tag);
            }
            v
        })
        .collect();
    connect::unary_response(json!({ "processes": processes }))
}

async fn send_input(axum::Extension(sb): Current, body: Bytes) -> Response {
    let r = async {
        let req: SendInputRequest = connect::unary_request(&body)?;
        let proc = select(&sb, req.process)?;
        let input = req.input.unwrap_or_default();
        // Typed into the terminal or written to stdin: the agent holds one input per process.
        let data = connect::from_b64(input.pty.or(input.stdin).as_deref().unwrap_or(""))?;
        sb.conn.stdin(proc.pid, data.into()).await?;
        Ok(json!({}))
    }
    .await;
    connect::reply(r)
}

async fn close_stdin(axum::Extension(sb): Current, body: Bytes) -> Response {
    let r = async {
        let req: SelectRequest = connect::unary_request(&body)?;
        let proc = select(&sb, req.process)?;
        sb.conn.call(&Request::CloseStdin { pid: proc.pid }).await?;
        Ok(json!({}))
    }
    .await;
    connect::reply(r)
}

async fn send_signal(axum::Extension(sb): Current, body: Bytes) -> Response {
    let r = async {
        let req: SignalRequest = connect::unary_request(&body)?;
        let signal = match req.signal {
            Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => libc::SIGKILL,
            Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => libc::SIGTERM,
            Some(Value::Number(n)) if n.as_i64() == Some(9) => libc::SIGKILL,
            Some(Value::Number(n)) if n.as_i64() == Some(15) => libc::SIGTERM,
            other => {
                return Err(RpcError::new(
                    "invalid_argument",
                    format!("signal {other:?}: SIGNAL_SIGKILL or SIGNAL_SIGTERM"),
                ))
            }
        };
        let proc = select(&sb, req.process)?;
        sb.conn
            .call(&Request::Signal {
                pid: proc.pid,
                signal,
            })
            .await?;
        Ok(json!({}))
    }
    .await;
    connect::reply(r)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct UpdateRequest {
    process: Option<Selector>,
    pty: Option<Value>,
}

/// Resizes a process's terminal.
async fn update(axum::Extension(sb): Current, body: Bytes) -> Response {
    let r = async {
        let req: UpdateRequest = connect::unary_request(&body)?;
        let proc = select(&sb, req.process)?;
        let Some(pty) = req.pty else {
            return Ok(json!({}));
        };
        let [cols, rows] = pty_size(&pty);
        sb.conn
            .call(&Request::Resize {
                pid: proc.pid,
                cols,
                rows,
            })
            .await?;
        Ok(json!({}))
    }
    .await;
    connect::reply(r)
}

/// Client streaming: `start {process}`, then `data {input}` messages, as they arrive.
async fn stream_input(axum::Extension(sb): Current, body: axum::body::Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut pid: Option<u32> = None;
    let result: Result<(), RpcError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| RpcError::new("canceled", e.to_string()))?;
            buf.extend_from_slice(&chunk);
            let (msgs, used) = connect::envelopes(&buf)?;
            let msgs: Vec<Value> = msgs
                .iter()
                .map(|m| serde_json::from_slice(m))
                .collect::<Result<_, _>>()
                .map_err(|e| RpcError::new("invalid_argument", e.to_string()))?;
            buf.drain(..used);
            for m in msgs {
                if let Some(start) = m.get("start") {
                    let sel: Selector =
                        serde_json::from_value(start.get("process").cloned().unwrap_or_default())
                            .map_err(|e| RpcError::new("invalid_argument", e.to_string()))?;
                    pid = Some(select(&sb, Some(sel))?.pid);
                } else if let Some(data) = m.get("data") {
                    let p = pid
                        .ok_or_else(|| RpcError::new("failed_precondition", "data before start"))?;
                    let s = data
                        .pointer("/input/stdin")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    sb.conn.stdin(p, connect::from_b64(s)?.into()).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    let (tx, resp) = connect::server_stream();
    tokio::spawn(async move {
        match result {
            Ok(()) => {
                tx.send(&json!({})).await;
                tx.finish(None).await;
            }
            Err(e) => tx.finish(Some(e)).await,
        }
    });
    resp
}
