//! Keeping the gateway's KV index true: one task per worker subscribes to its `/v1/kv/events`
//! stream, loads its `/v1/kv/blocks` snapshot, then applies each stored / removed block to the
//! index; a worker whose stream breaks or lags is dropped from the index (it holds nothing as far
//! as routing knows) until it is resynchronised the same way.
//! And building each request's prompt as its workers would (from their prompt card), whose
//! block hashes the index is matched against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures::StreamExt;
use lastmile_protocol::{prefix_hashes, KvEvent};
use lastmile_worker::{Api, PromptCard, Prompter};
use serde_json::Value;

use crate::workers::json_capped;
use crate::{lock, Gateway};

/// A request's prompt as its model's workers build it: the hashes of its full blocks, its
/// length, and the header that hands its tokens to the chosen worker.
pub(crate) struct PromptBlocks {
    /// The prompt's token ids.
    pub(crate) ids: Vec<u32>,
    pub(crate) hashes: Vec<u64>,
    pub(crate) tokens: usize,
    pub(crate) block_size: usize,
    /// The [`PROMPT_HEADER`] value (`None` for a prompt too long for a header).
    pub(crate) header: Option<String>,
}

/// Bodies up to this size are tokenized on the async thread (a few hundred microseconds at
/// most); larger ones on the blocking pool.
const INLINE_BODY_BYTES: usize = 16 * 1024;

/// How long after a failed prompt-card fetch the gateway waits before asking again (requests
/// meanwhile are routed on load alone).
const CARD_RETRY: Duration = Duration::from_secs(5);
/// The most bytes of a worker's prompt card (its tokenizer, chat template and special tokens:
/// the largest tokenizers are tens of MB).
const CARD_REPLY: usize = 256 << 20;
/// The most bytes of a worker's prefix cache snapshot (millions of block hashes).
const SNAPSHOT_REPLY: usize = 64 << 20;
/// The longest KV event frame the gateway buffers (one event is under 100 bytes).
const MAX_FRAME: usize = 64 << 10;

/// Each model's [`Prompter`], loaded from one of its workers' prompt cards, and when a load last
/// failed.
#[derive(Default)]
pub(crate) struct Prompters {
    loaded: Mutex<HashMap<String, Arc<Prompter>>>,
    failed: Mutex<HashMap<String, Instant>>,
}

impl Prompters {
    fn get(&self, key: &str) -> Option<Arc<Prompter>> {
        lock(&self.loaded).get(key).cloned()
    }

    /// The prompter of `model`'s workers, loading their card first if need be; `None` when no
    /// worker can say (the request is then routed on load alone).
    async fn load(&self, gw: &Gateway, model: Option<&str>) -> Option<Arc<Prompter>> {
        let key = model.unwrap_or_default();
        if let Some(p) = self.get(key) {
            return Some(p);
        }
        if lock(&self.failed)
            .get(key)
            .is_some_and(|at| at.elapsed() < CARD_RETRY)
        {
            return None;
        }
        match fetch_card(gw, model).await {
            Some(p) => {
                lock(&self.loaded).insert(key.to_string(), p.clone());
                Some(p)
            }
            None => {
                lock(&self.failed).insert(key.to_string(), Instant::now());
                None
            }
        }
    }
}

/// Loads the prompt card of an available worker serving `model`.
async fn fetch_card(gw: &Gateway, model: Option<&str>) -> Option<Arc<Prompter>> {
    let all = gw.workers.all();
    let n = all.len();
    let start = gw.next_hasher();
    let id = (0..n)
        .map(|k| (start + k) % n)
        .find(|&id| all[id].available() && all[id].serves(model))?;
    let url = format!("{}/internal/prompt-card", gw.workers.get(id).url);
    let reply = gw
        .workers
        .client
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !reply.status().is_success() {
        tracing::warn!(%url, status = %reply.status(), "no prompt card: routing on load alone");
        return None;
    }
    let card: PromptCard = json_capped(reply, CARD_REPLY).await?;
    let built = tokio::task::spawn_blocking(move || Prompter::from_card(card)).await;
    match built {
        Ok(Ok(p)) => Some(Arc::new(p)),
        Ok(Err(e)) => {
            tracing::warn!(%url, "unusable prompt card: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Loads the prompt card of worker `id`'s model in the background, if none is loaded yet, so
/// that the model's first request does not wait for it.
fn prefetch_card(gw: &Arc<Gateway>, id: usize) {
    let model = gw.workers.get(id).model();
    if gw
        .prompters
        .get(model.as_deref().unwrap_or_default())
        .is_some()
    {
        return;
    }
    let gw = gw.clone();
    tokio::spawn(async move {
        gw.prompters.load(&gw, model.as_deref()).await;
    });
}

/// Builds the prompt of `body` (a request to `api` for `model`) as its workers would and names
/// its blocks. `None` when the request's model has no usable prompt card or the request is
/// malformed (its worker reports the error).
pub(crate) async fn prompt_blocks(
    gw: &Gateway,
    api: Api,
    body: &Bytes,
    model: Option<&str>,
) -> Option<PromptBlocks> {
    let prompter = gw.prompters.load(gw, model).await?;
    let build = move |prompter: &Prompter, body: &[u8]| {
        let tokens = prompter.tokens(api, body).ok()?;
        let block_size = prompter.block_size();
        Some(PromptBlocks {
            hashes: prefix_hashes(&tokens, block_size),
            tokens: tokens.len(),
            block_size,
            header: prompter.header(&tokens),
            ids: tokens,
        })
    };
    if body.len() <= INLINE_BODY_BYTES {
        return build(&prompter, body);
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || build(&prompter, &body))
        .await
        .ok()?
}

/// Follows worker `id`'s KV events forever, reconnecting after failures.
pub(crate) async fn follow(gw: Arc<Gateway>, id: usize) {
    let base = gw.workers.get(id).url.clone();
    let idle = gw.config.kv_events_idle;
    let url = format!(
        "{base}/v1/kv/events?keepalive_ms={}",
        (idle / 3).as_millis()
    );
    loop {
        // Neither the subscription's answer nor the next bytes of the feed may take longer than
        // `idle` (the worker sends a keep-alive every third of it): a link that died without a
        // word is given up, like a feed that ended.
        let subscribed = tokio::time::timeout(idle, gw.workers.client.get(&url).send()).await;
        if let Ok(Ok(resp)) = subscribed {
            // Subscribed (the worker subscribes before it answers): now the snapshot, then the
            // events that follow it.
            if resp.status().is_success() && resync(&gw, id, &base).await {
                prefetch_card(&gw, id);
                let mut body = resp.bytes_stream();
                let mut buf: Vec<u8> = Vec::new();
                'stream: while let Ok(Some(Ok(chunk))) =
                    tokio::time::timeout(idle, body.next()).await
                {
                    buf.extend_from_slice(&chunk);
                    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                        let frame: Vec<u8> = buf.drain(..end + 2).collect();
                        if !apply_frame(&gw, id, &String::from_utf8_lossy(&frame)) {
                            // Events were lost: start over from a fresh snapshot.
                            break 'stream;
                        }
                    }
                    if buf.len() > MAX_FRAME {
                        // No event is this long: a broken or hostile feed, not buffered.
                        tracing::warn!(worker = %base, "KV event feed sent an endless frame");
                        break 'stream;
                    }
                }
            }
        }
        // The stream ended, went silent or never started: what the worker holds is unknown from
        // here on.
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
    let Some(v) = json_capped::<Value>(reply, SNAPSHOT_REPLY).await else {
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
