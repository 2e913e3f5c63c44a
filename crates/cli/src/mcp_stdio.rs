//! `lastmile mcp --url http://HOST:PORT`: MCP over stdio for hosts that launch servers as
//! processes, bridged to a lastmile server's `/mcp` (Streamable HTTP). Each JSON-RPC message
//! read from stdin (one per line) is POSTed; the answer — a JSON body, or an event stream of
//! progress notifications ending with the response — is written to stdout, one message per
//! line. Messages are forwarded concurrently, so a cancellation overtakes the long call it
//! cancels. The session id and protocol version the server gives at `initialize` go with every
//! later request; the session is closed when stdin ends.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// `lastmile mcp`.
#[derive(Args)]
pub struct McpArgs {
    /// The lastmile server (its `/mcp` is used), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// API key (or LASTMILE_API_KEY).
    #[arg(long, env = "LASTMILE_API_KEY", hide_env_values = true)]
    key: Option<String>,
}

/// What the server said at `initialize`, sent with every later request.
#[derive(Default)]
struct Session {
    id: Option<String>,
    protocol: Option<String>,
}

/// Runs the bridge until stdin ends.
pub fn run(args: McpArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bridge(args))
}

async fn bridge(args: McpArgs) -> Result<()> {
    let endpoint = format!("{}/mcp", args.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()?;
    let session = Arc::new(Mutex::new(Session::default()));
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = out_rx.recv().await {
            if stdout.write_all(line.as_bytes()).await.is_err()
                || stdout.write_all(b"\n").await.is_err()
                || stdout.flush().await.is_err()
            {
                break;
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if line.trim().is_empty() {
            continue;
        }
        let (client, endpoint, key, session, out) = (
            client.clone(),
            endpoint.clone(),
            args.key.clone(),
            session.clone(),
            out_tx.clone(),
        );
        let is_initialize = line.contains("\"initialize\"");
        let task = async move {
            if let Err(e) = forward(&client, &endpoint, key.as_deref(), &session, &out, line).await
            {
                eprintln!("lastmile mcp: {e:#}");
            }
        };
        if is_initialize {
            // Everything after needs the session it opens.
            task.await;
        } else {
            tasks.spawn(task);
        }
    }
    while tasks.join_next().await.is_some() {}
    let id = session.lock().unwrap_or_else(|e| e.into_inner()).id.clone();
    if let Some(id) = id {
        let mut del = client.delete(&endpoint).header("mcp-session-id", id);
        if let Some(k) = &args.key {
            del = del.bearer_auth(k);
        }
        let _ = del.send().await;
    }
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}

/// POSTs one message and relays what comes back.
async fn forward(
    client: &reqwest::Client,
    endpoint: &str,
    key: Option<&str>,
    session: &Mutex<Session>,
    out: &tokio::sync::mpsc::UnboundedSender<String>,
    line: String,
) -> Result<()> {
    let request_id = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v.get("id").cloned());
    let resp = post_to(client, endpoint, key, session)
        .body(line)
        .send()
        .await
        .context("reaching the server")?;
    if let Some(id) = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
    {
        session.lock().unwrap_or_else(|e| e.into_inner()).id = Some(id.to_string());
    }
    let status = resp.status();
    if status == reqwest::StatusCode::ACCEPTED {
        return Ok(());
    }
    let sse = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !status.is_success() {
        // A JSON-RPC error for the request, so that the host is not left waiting.
        let body = resp.text().await.unwrap_or_default();
        if let Some(id) = request_id {
            let e = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {
                "code": -32000, "message": format!("lastmile answered {status}: {body}")}});
            let _ = out.send(e.to_string());
        }
        return Ok(());
    }
    let send = |data: &str| {
        note_protocol(session, data);
        let _ = out.send(data.to_string());
    };
    if !sse {
        let body = resp.text().await?;
        if !body.trim().is_empty() {
            send(body.trim());
        }
        return Ok(());
    }
    relay_events(resp, send).await
}

/// A POST to the server with the headers of this session (its id and protocol version, once
/// known) and the key.
fn post_to(
    client: &reqwest::Client,
    endpoint: &str,
    key: Option<&str>,
    session: &Mutex<Session>,
) -> reqwest::RequestBuilder {
    let mut post = client
        .post(endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            reqwest::header::ACCEPT,
            "application/json, text/event-stream",
        );
    if let Some(k) = key {
        post = post.bearer_auth(k);
    }
    let s = session.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = &s.id {
        post = post.header("mcp-session-id", id);
    }
    if let Some(p) = &s.protocol {
        post = post.header("mcp-protocol-version", p);
    }
    post
}

/// Passes on the data of every event of an SSE answer, as it arrives.
async fn relay_events(resp: reqwest::Response, send: impl Fn(&str)) -> Result<()> {
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if !data.is_empty() && !data.concat().trim().is_empty() {
                send(&data.join("\n"));
            }
        }
    }
    Ok(())
}

/// Keeps the protocol version an `initialize` result names.
fn note_protocol(session: &Mutex<Session>, message: &str) {
    if !message.contains("protocolVersion") {
        return;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(message) {
        if let Some(p) = v["result"]["protocolVersion"].as_str() {
            session.lock().unwrap_or_else(|e| e.into_inner()).protocol = Some(p.to_string());
        }
    }
}
