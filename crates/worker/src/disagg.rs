//! Disaggregated prefill and decode, the worker's side (see `lastmile_protocol::disagg` for the
//! flow).
//!
//! As a **prefill** worker it serves `POST /internal/prefill` (compute a prompt, hold its blocks
//! under a lease that expires on its own), `GET /internal/kv/{lease}?from=K` (stream the held
//! blocks from the `K`th in the `lastmile_engine::kv_transfer` format, from the copy taken when the
//! prompt was done: a busy prefill engine's long steps never delay a pull) and
//! `DELETE /internal/kv/{lease}`.
//! As a **decode** worker, a request carrying a KV source is preceded by a pull: blocks are
//! imported into the prefix cache as their frames arrive and check out, so that the generation
//! finds them cached; whatever the pull did not bring (a dead or slow peer, a cut or corrupt
//! stream) the engine computes itself. A pull never fails a request.
//!
//! Guards: every internal call must carry the deployment's internal token (compared in constant
//! time); without a token configured, disaggregation is off on this worker (its internal KV
//! endpoints answer 403 and KV sources are ignored), since received keys and values cannot be
//! verified and would otherwise let anyone who reaches the worker poison its prefix cache.
//! Received blocks must be the request's own prompt (tokens and routing hashes checked by the
//! engine), of this model's layout, and pass their checksums.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use lastmile_engine::kv_transfer::{
    encode_block, encode_end, encode_header, KvBlock, KvStreamReader, KvWireError,
};
use lastmile_engine::{GenerateRequest, GenerationEvent, SamplingParams};
use lastmile_http::metrics::{Exposition, Histogram};
use lastmile_protocol::disagg::{INTERNAL_TOKEN_HEADER, KV_SOURCE_HEADER};
use lastmile_protocol::{ApiError, PrefillReply, PrefillRequest, WorkerRole};

use crate::error::{api_response, engine_api_error};
use crate::kv_transport::{HttpTransport, KvTransport, TransportError};
use crate::AppState;

/// Blocks encoded per chunk of a streamed lease.
const EXPORT_BATCH: usize = 16;
/// Received blocks queued per import command (12 MB of the default model). Batches queue while
/// the engine steps and are all taken between two steps, so a small batch costs no extra wait and
/// lets the copying of early blocks overlap the arrival of later ones.
const IMPORT_BATCH: usize = 32;
/// Bounds of the pull duration histogram, seconds.
const PULL_BOUNDS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// This worker's part in disaggregated serving.
#[derive(Debug, Clone)]
pub struct DisaggConfig {
    /// What it does: whole requests (`both`), prompts for others (`prefill`), or generation
    /// (`decode`). Reported by `/health` and in etcd, for gateways to route by.
    pub role: WorkerRole,
    /// The secret gateways and workers share for KV transfer (`None`: disaggregation is off here).
    pub internal_token: Option<String>,
    /// How long a prefill's blocks stay held when no decode worker releases them.
    pub lease: Duration,
    /// How long a decode worker waits for a whole pull before computing the rest itself.
    pub pull_timeout: Duration,
    /// Test hook: corrupt one byte of every block frame sent (its checksum then fails on the
    /// receiving side). Never set in service.
    pub corrupt_sent_blocks: bool,
    /// How pulls fetch held blocks (`None`: HTTP, with the internal token).
    pub transport: Option<Arc<dyn KvTransport>>,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        Self {
            role: WorkerRole::Both,
            internal_token: None,
            lease: Duration::from_secs(30),
            pull_timeout: Duration::from_secs(10),
            corrupt_sent_blocks: false,
            transport: None,
        }
    }
}

/// Why a pull brought less than it was asked for (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullFailure {
    /// The peer could not be reached or did not answer in time.
    Unreachable,
    /// It answered with an error status (the lease expired, a bad token).
    Refused,
    /// The stream was malformed, of another layout, corrupt or cut short.
    Stream(&'static str),
    /// This engine refused the blocks or had no room for them.
    Import,
}

impl PullFailure {
    fn label(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Refused => "refused",
            Self::Stream(kind) => kind,
            Self::Import => "import",
        }
    }

    const LABELS: [&'static str; 7] = [
        "unreachable",
        "refused",
        "malformed",
        "layout",
        "checksum",
        "truncated",
        "import",
    ];
}

/// A prompt's blocks held for a decode worker: pinned in the engine (so they stay in its prefix
/// cache) and copied out when the prompt was done (so a pull never waits for the engine).
struct Lease {
    engine: u64,
    blocks: Arc<Vec<KvBlock>>,
}

/// Leases, the HTTP client for pulls, and their metrics.
pub(crate) struct Transfers {
    config: DisaggConfig,
    /// Public lease names, the engine leases they stand for, and the held blocks' copy.
    leases: Mutex<HashMap<String, Lease>>,
    /// Keys that make lease names unguessable.
    namer: (RandomState, RandomState),
    next: AtomicU64,
    transport: Arc<dyn KvTransport>,
    prefills: AtomicU64,
    pulls: AtomicU64,
    pull_failures: [AtomicU64; PullFailure::LABELS.len()],
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    pull_seconds: Histogram,
    ignored_sources: AtomicU64,
}

impl Transfers {
    pub(crate) fn new(config: DisaggConfig) -> Self {
        let transport = config.transport.clone().unwrap_or_else(|| {
            Arc::new(HttpTransport::new(config.internal_token.clone())) as Arc<dyn KvTransport>
        });
        Self {
            config,
            leases: Mutex::new(HashMap::new()),
            namer: (RandomState::new(), RandomState::new()),
            next: AtomicU64::new(0),
            transport,
            prefills: AtomicU64::new(0),
            pulls: AtomicU64::new(0),
            pull_failures: Default::default(),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            pull_seconds: Histogram::new(&PULL_BOUNDS),
            ignored_sources: AtomicU64::new(0),
        }
    }

    /// This worker's role.
    pub(crate) fn role(&self) -> WorkerRole {
        self.config.role
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh lease name: 128 bits no other caller can predict.
    fn lease_name(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (self.namer.0.hash_one(n), self.namer.1.hash_one(n));
        format!("{a:016x}{b:016x}")
    }

    /// Whether `headers` carry this worker's internal token (never, without one).
    fn trusted(&self, headers: &HeaderMap) -> bool {
        let Some(want) = self.config.internal_token.as_deref() else {
            return false;
        };
        let got = headers
            .get(INTERNAL_TOKEN_HEADER)
            .map_or(&[][..], |v| v.as_bytes());
        got.len() == want.len()
            && got
                .iter()
                .zip(want.as_bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
    }

    fn refuse(&self) -> Response {
        let why = if self.config.internal_token.is_none() {
            "KV transfer is off on this worker: it has no internal token"
        } else {
            "the internal token is missing or wrong"
        };
        api_response(&ApiError::forbidden(why))
    }

    /// The KV source a request names, when a trusted caller (the gateway) named it; a source
    /// without the token is ignored (and counted), and the request computes its prompt here.
    pub(crate) fn source(&self, headers: &HeaderMap) -> Option<String> {
        let source = headers.get(KV_SOURCE_HEADER)?.to_str().ok()?;
        if !self.trusted(headers) {
            self.ignored_sources.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("a KV source without the internal token: ignored");
            return None;
        }
        Some(source.to_string())
    }

    /// Writes the transfer metrics.
    pub(crate) fn write_metrics(&self, page: &mut Exposition) {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        page.counter(
            "lastmile_kv_prefills_total",
            "Prompts computed and held for decode workers (prefill role).",
            ld(&self.prefills),
        )
        .counter(
            "lastmile_kv_pulls_total",
            "KV pulls from prefill workers (decode role), failed or not.",
            ld(&self.pulls),
        )
        .counters(
            "lastmile_kv_pull_failures_total",
            "KV pulls that brought less than asked, by reason; the engine computed the rest.",
            PullFailure::LABELS
                .iter()
                .zip(&self.pull_failures)
                .map(|(l, n)| (vec![("reason", (*l).to_string())], ld(n))),
        )
        .counter(
            "lastmile_kv_transfer_sent_bytes_total",
            "Bytes of KV blocks streamed to decode workers.",
            ld(&self.bytes_sent),
        )
        .counter(
            "lastmile_kv_transfer_received_bytes_total",
            "Bytes of KV blocks pulled from prefill workers.",
            ld(&self.bytes_received),
        )
        .counter(
            "lastmile_kv_sources_ignored_total",
            "KV sources named without the internal token (ignored).",
            ld(&self.ignored_sources),
        )
        .gauge(
            "lastmile_kv_leases",
            "Leases of held blocks not yet released or expired.",
            self.leases().len() as u64,
        )
        .histogram(
            "lastmile_kv_pull_duration_seconds",
            "Time to pull and import a prompt's blocks.",
            &self.pull_seconds,
        );
    }

    fn failed(&self, why: PullFailure) {
        let at = PullFailure::LABELS
            .iter()
            .position(|l| *l == why.label())
            .unwrap_or(0);
        self.pull_failures[at].fetch_add(1, Ordering::Relaxed);
    }
}

/// `POST /internal/prefill`: computes the prompt (one token generated and dropped), holds its
/// blocks under a lease that expires after `DisaggConfig::lease`, and names it.
pub(crate) async fn prefill(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let t = &state.transfers;
    if !t.trusted(req.headers()) {
        return t.refuse();
    }
    let body = lastmile_http::read_body(req.into_body(), state.config.max_body_bytes).await;
    let req: PrefillRequest = match body.and_then(|b| lastmile_protocol::parse_json(&b)) {
        Ok(r) => r,
        Err(e) => return api_response(&e),
    };
    let engine = &state.engine;
    let mut stream = match engine.submit(GenerateRequest::new(
        req.tokens.clone(),
        SamplingParams::greedy(),
        1,
    )) {
        Ok(s) => s,
        Err(e) => return api_response(&engine_api_error(&e)),
    };
    loop {
        match stream.next().await {
            Some(GenerationEvent::Finished { .. }) => break,
            Some(GenerationEvent::Failed(e)) => return api_response(&engine_api_error(&e)),
            Some(_) => {}
            None => return api_response(&engine_api_error(&lastmile_engine::EngineError::Stopped)),
        }
    }
    let (held, blocks) = match engine.hold_prefix(req.tokens).await {
        Ok(h) => h,
        Err(e) => return api_response(&engine_api_error(&e)),
    };
    let name = t.lease_name();
    let lease = Lease {
        engine: held.lease,
        blocks: Arc::new(blocks),
    };
    t.leases().insert(name.clone(), lease);
    t.prefills.fetch_add(1, Ordering::Relaxed);
    let expire = state.clone();
    let expire_name = name.clone();
    let ttl = t.config.lease;
    tokio::spawn(async move {
        tokio::time::sleep(ttl).await;
        let expired = expire.transfers.leases().remove(&expire_name);
        if let Some(lease) = expired {
            tracing::info!(lease = %expire_name, "KV lease expired unread");
            let _ = expire.engine.release_prefix(lease.engine);
        }
    });
    axum::Json(PrefillReply {
        lease: name,
        blocks: held.blocks,
        block_size: engine.info().block_size,
        expires_in_ms: ttl.as_millis() as u64,
    })
    .into_response()
}

/// Where a pull starts.
#[derive(serde::Deserialize)]
pub(crate) struct PullFrom {
    #[serde(default)]
    from: usize,
}

/// `GET /internal/kv/{lease}?from=K`: the held blocks from the `K`th, as a KV stream.
pub(crate) async fn blocks(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(PullFrom { from }): Query<PullFrom>,
    headers: HeaderMap,
) -> Response {
    let t = &state.transfers;
    if !t.trusted(&headers) {
        return t.refuse();
    }
    let Some(held) = t.leases().get(&name).map(|l| l.blocks.clone()) else {
        return api_response(&ApiError::missing(format!("no KV lease `{name}`")));
    };
    let layout = state.engine.kv_layout(&state.config.model_id);
    let mut head = Vec::new();
    encode_header(&layout, from as u32, &mut head);
    let corrupt = t.config.corrupt_sent_blocks;
    let total = held.len();
    // Frames are encoded a batch at a time as the connection takes them.
    let body = futures::stream::unfold((state.clone(), from.min(total)), move |(state, next)| {
        let held = held.clone();
        async move {
            if next > total {
                return None;
            }
            let end = (next + EXPORT_BATCH).min(total);
            let mut out = Vec::new();
            for b in &held[next..end] {
                let at = out.len();
                encode_block(b, &mut out);
                if corrupt {
                    let middle = at + (out.len() - at) / 2;
                    out[middle] ^= 0x01;
                }
            }
            if end == total {
                encode_end((total - from.min(total)) as u32, &mut out);
            }
            state
                .transfers
                .bytes_sent
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            // Past the end once the end frame is out.
            let next = if end == total { total + 1 } else { end };
            Some((Ok::<_, std::io::Error>(Bytes::from(out)), (state, next)))
        }
    });
    let stream = futures::stream::once(async move { Ok(Bytes::from(head)) }).chain(body);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/vnd.lastmile.kv-blocks",
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `DELETE /internal/kv/{lease}`: releases the held blocks (204; 404 if no such lease).
pub(crate) async fn release(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let t = &state.transfers;
    if !t.trusted(&headers) {
        return t.refuse();
    }
    let removed = t.leases().remove(&name);
    match removed {
        Some(lease) => {
            let _ = state.engine.release_prefix(lease.engine);
            StatusCode::NO_CONTENT.into_response()
        }
        None => api_response(&ApiError::missing(format!("no KV lease `{name}`"))),
    }
}

/// Pulls the blocks of `prompt` that `source` holds into this engine's prefix cache, then
/// releases the lease there. Whatever does not arrive intact is left for the engine to
/// compute: this never fails the request.
pub(crate) async fn pull(state: &AppState, source: &str, prompt: &[u32]) {
    let t = &state.transfers;
    t.pulls.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let outcome = tokio::time::timeout(t.config.pull_timeout, pull_into(state, source, prompt))
        .await
        .unwrap_or(Err(PullFailure::Unreachable));
    t.pull_seconds.observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(stored) => tracing::debug!(%source, stored, "pulled KV blocks"),
        Err(why) => {
            tracing::warn!(%source, reason = why.label(), "KV pull fell short; computing the rest here");
            t.failed(why);
        }
    }
    // Release the lease either way (it would expire on its own).
    t.transport.release(source);
}

/// The pull itself: each batch of blocks is queued for import as soon as it has arrived and
/// checked out, and reading goes on meanwhile (the engine takes every queued batch between two of
/// its steps, so a pull waits out about one step however many batches it has); returns the
/// blocks stored.
async fn pull_into(state: &AppState, source: &str, prompt: &[u32]) -> Result<usize, PullFailure> {
    let t = &state.transfers;
    let mut body = t.transport.open(source).await.map_err(|e| match e {
        TransportError::Unreachable => PullFailure::Unreachable,
        TransportError::Refused => PullFailure::Refused,
    })?;
    let mut reader = KvStreamReader::new(state.engine.kv_layout(&state.config.model_id));
    let mut pending: Vec<KvBlock> = Vec::new();
    let mut queued = 0usize;
    let mut imports = Vec::new();
    let mut import = |blocks: Vec<KvBlock>, first: usize| {
        let n = blocks.len();
        let answer = state
            .engine
            .queue_import(prompt.to_vec(), first, blocks)
            .map_err(|_| PullFailure::Import)?;
        imports.push(async move {
            match answer.await {
                Ok(o) if o.refused == 0 && o.no_room == 0 => Ok(o.stored),
                _ => Err(PullFailure::Import),
            }
        });
        Ok::<usize, PullFailure>(n)
    };
    let wire = |e: KvWireError| PullFailure::Stream(e.error_type());
    let mut failed = None;
    loop {
        // A cut connection ends the loop; `finish` then reports the stream truncated.
        let Some(Ok(chunk)) = body.next().await else {
            break;
        };
        t.bytes_received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let got = reader.push(&chunk);
        failed = got.as_ref().err().cloned();
        pending.extend(got.unwrap_or_default());
        if pending.len() >= IMPORT_BATCH || failed.is_some() {
            let first = reader.first().unwrap_or(0) as usize + queued;
            queued += import(std::mem::take(&mut pending), first)?;
        }
        if failed.is_some() {
            break;
        }
    }
    if !pending.is_empty() {
        let first = reader.first().unwrap_or(0) as usize + queued;
        import(pending, first)?;
    }
    // Every queued batch is answered, in order, before the pull ends.
    let mut stored = 0;
    for answer in imports {
        stored += answer.await?;
    }
    match failed {
        Some(e) => Err(wire(e)),
        None => reader.finish().map_err(wire).map(|_| stored),
    }
}
