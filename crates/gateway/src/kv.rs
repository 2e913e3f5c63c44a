//! Keeping the gateway's KV index true: one task per worker subscribes to its `/v1/kv/events`
//! stream, loads its `/v1/kv/blocks` snapshot, then applies each stored / removed block to the
//! index; a worker whose stream breaks or lags is dropped from the index (it holds nothing as far
//! as routing knows) until it is resynchronised the same way.
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

/// Asks an available worker serving `model` for the prompt hashes of `body` (a request to
/// `api`). `None` when no worker can say (the request is then routed on load alone, and its own
/// worker reports any error in it).
pub(crate) async fn prompt_blocks(
    gw: &Gateway,
    api: &str,
    body: &[u8],
    model: Option<&str>,
) -> Option<PromptBlocks> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let all = gw.workers.all();
    let n = all.len();
    let start = gw.next_hasher();
    let id = (0..n)
        .map(|k| (start + k) % n)
        .find(|&id| all[id].available() && all[id].serves(model))?;
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
    let base = gw.workers.get(id).url.clone();
    let url = format!("{base}/v1/kv/events");
    loop {
        if let Ok(resp) = gw.workers.client.get(&url).send().await {
            // Subscribed (the worker subscribes before it answers): now the snapshot, then the
            // events that follow it.
            if resp.status().is_success() && resync(&gw, id, &base).await {
                let mut body = resp.bytes_stream();
                let mut buf: Vec<u8> = Vec::new();
                'stream: while let Some(Ok(chunk)) = body.next().await {
                    buf.extend_from_slice(&chunk);
                    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                        let frame: Vec<u8> = buf.drain(..end + 2).collect();
                        if !apply_frame(&gw, id, &String::from_utf8_lossy(&frame)) {
                            // Events were lost: start over from a fresh snapshot.
                            break 'stream;
                        }
                    }
                }
            }
        }
        // The stream ended or never started: what the worker holds is unknown from here on.
        gw.index().drop_worker(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Replaces what the index says `id` holds with the worker's snapshot of its prefix cache.
async fn resync(gw: &Gateway, id: usize, base: &str) -> bool {
    let reply = gw
        .workers
        .client
        .get(format!("{base}/v1/kv/blocks"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let Ok(reply) = reply else { return false };
    let Ok(v) = reply.json::<Value>().await else {
        return false;
    };
    let Some(hashes) = v["hashes"].as_array() else {
        return false;
    };
    let mut index = gw.index();
    index.drop_worker(id);
    for hash in hashes.iter().filter_map(Value::as_u64) {
        index.apply(id, &KvEvent::Stored { hash, parent: None });
    }
    true
}

/// Applies one SSE frame (`data: {event}`); `false` on `event: lagged` (events were lost).
fn apply_frame(gw: &Gateway, id: usize, frame: &str) -> bool {
    if frame.lines().any(|l| l.trim() == "event: lagged") {
        gw.index().drop_worker(id);
        return false;
    }
    for line in frame.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if let Ok(event) = serde_json::from_str::<KvEvent>(data) {
                gw.index().apply(id, &event);
            }
        }
    }
    true
}
