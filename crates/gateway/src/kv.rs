//! Keeping the gateway's KV index true: one task per worker follows its `/v1/kv/events` stream
//! and applies each stored / removed block to the index; a worker whose stream breaks or lags
//! is dropped from the index (it holds nothing as far as routing knows) until events flow again.
//! And asking a worker for a request's prompt hashes, which the index is matched against.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lastmile_protocol::KvEvent;
use serde_json::{json, Value};

use crate::Gateway;

/// The public API a proxied path belongs to, as `/internal/prompt` names it.
pub(crate) fn api_of(path: &str) -> Option<&'static str> {
    match path {
        "/v1/chat/completions" => Some("chat"),
        "/v1/completions" => Some("completions"),
        "/v1/messages" => Some("messages"),
        _ => None,
    }
}

/// A request's prompt as block hashes: (hashes, prompt tokens, block size).
pub(crate) struct PromptBlocks {
    pub(crate) hashes: Vec<u64>,
    pub(crate) tokens: usize,
    pub(crate) block_size: usize,
}

/// Asks an available worker for the prompt hashes of `body` (a request to `api`). `None` when
/// no worker can say (the request is then routed on load alone, and its own worker reports any
/// error in it).
pub(crate) async fn prompt_blocks(gw: &Gateway, api: &str, body: &[u8]) -> Option<PromptBlocks> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let n = gw.workers.all().len();
    let start = gw.next_hasher();
    let id = (0..n)
        .map(|k| (start + k) % n)
        .find(|&id| gw.workers.available(id))?;
    let reply = gw
        .workers
        .client
        .post(format!("{}/internal/prompt", gw.workers.get(id).url))
        .json(&json!({"api": api, "body": body}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !reply.status().is_success() {
        return None;
    }
    let v: Value = reply.json().await.ok()?;
    Some(PromptBlocks {
        hashes: v["block_hashes"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect(),
        tokens: v["prompt_tokens"].as_u64()? as usize,
        block_size: v["block_size"].as_u64()? as usize,
    })
}

/// Follows worker `id`'s KV events forever, reconnecting after failures.
pub(crate) async fn follow(gw: Arc<Gateway>, id: usize) {
    let url = format!("{}/v1/kv/events", gw.workers.get(id).url);
    loop {
        if let Ok(resp) = gw.workers.client.get(&url).send().await {
            if resp.status().is_success() {
                let mut body = resp.bytes_stream();
                let mut buf: Vec<u8> = Vec::new();
                while let Some(Ok(chunk)) = body.next().await {
                    buf.extend_from_slice(&chunk);
                    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                        let frame: Vec<u8> = buf.drain(..end + 2).collect();
                        apply_frame(&gw, id, &String::from_utf8_lossy(&frame));
                    }
                }
            }
        }
        // The stream ended or never started: what the worker holds is unknown from here on.
        gw.index().drop_worker(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies one SSE frame (`data: {event}`, or `event: lagged`).
fn apply_frame(gw: &Gateway, id: usize, frame: &str) {
    if frame.lines().any(|l| l.trim() == "event: lagged") {
        // Events were lost: forget the worker's blocks and rebuild from the events that follow.
        gw.index().drop_worker(id);
        return;
    }
    for line in frame.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if let Ok(event) = serde_json::from_str::<KvEvent>(data) {
                gw.index().apply(id, &event);
            }
        }
    }
}
