//! Tenants: who is calling (API keys), how much they may use (quotas), and what they used
//! (metering).
//!
//! - **Keys** arrive as `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY`
//!   (Anthropic clients). Only their SHA-256 is stored. With an admin key configured every
//!   request needs a valid key (401 otherwise); without one the gateway is open, and a known key
//!   still gets its quotas.
//! - **Quotas** per key, as Bedrock does them: requests per minute and tokens per minute, each a
//!   token bucket. Admission takes one request and reserves what it may cost: its prompt
//!   (estimated) plus its output limit, read as the worker reads it, times `n`
//!   ([`TokenReservation`]); when the answer is done the reservation is settled against the
//!   tokens actually used (input and output), refunding or charging the difference. A request
//!   that does not fit gets 429 with `Retry-After` and a message naming the limit. A key has at
//!   most `max_in_flight_per_key` requests admitted at once (429 naming that limit beyond), so
//!   reservations settled late cannot be outrun by a burst of concurrent requests.
//! - **Usage** per key, deployment and minute (requests, input and output tokens) is counted in
//!   memory and written to SQLite once a second, so a killed process loses at most that second.
//!   Workers report each answer's usage in a header (whole answers) or a final SSE comment
//!   (streams). A stream cut short (the client left) is charged what was computed: its prompt
//!   once a token came, and the output relayed ([`StreamMeter`]); any other answer without a
//!   report is charged its reservation.

mod admin;
mod bucket;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use lastmile_protocol::{ApiError, StreamMeter, TokenReservation, TokenUsage};
use sha2::{Digest, Sha256};

pub(crate) use admin::{require_admin, routes};
use bucket::TokenBucket;
use store::{KeyRecord, Store, UsageRow};

use crate::{lock, GatewayError};

/// Requests one key may have admitted at once, unless configured.
pub const DEFAULT_MAX_IN_FLIGHT_PER_KEY: u64 = 64;

/// Tenant settings.
#[derive(Debug, Clone)]
pub struct TenantsConfig {
    /// The SQLite database of keys and usage.
    pub db: PathBuf,
    /// Guards the admin API; when set, every API request needs a valid key.
    pub admin_key: Option<String>,
    /// Output tokens reserved per choice for a request without a limit when no worker has
    /// reported its context window yet.
    pub default_reserve: u64,
    /// Requests one key may have admitted at once.
    pub max_in_flight_per_key: u64,
}

impl TenantsConfig {
    /// Settings with the database at `db`, open (no admin key), 256 tokens reserved by default.
    pub fn new(db: PathBuf) -> Self {
        Self {
            db,
            admin_key: None,
            default_reserve: 256,
            max_in_flight_per_key: DEFAULT_MAX_IN_FLIGHT_PER_KEY,
        }
    }
}

/// A live key with its buckets.
pub(crate) struct Key {
    record: KeyRecord,
    rpm: Option<Mutex<TokenBucket>>,
    tpm: Option<Mutex<TokenBucket>>,
    throttled_rpm: AtomicU64,
    throttled_tpm: AtomicU64,
    throttled_concurrency: AtomicU64,
    /// Requests admitted and not yet settled.
    in_flight: AtomicU64,
}

/// Who is calling.
#[derive(Clone)]
pub(crate) enum Caller {
    /// No key, on an open gateway.
    Open,
    /// The admin key.
    Admin,
    /// An API key.
    Key(Arc<Key>),
}

impl Caller {
    /// The id usage is recorded under.
    fn id(&self) -> &str {
        match self {
            Self::Open => "-",
            Self::Admin => "admin",
            Self::Key(k) => &k.record.id,
        }
    }
}

/// A refusal: the error and, for 429, the seconds to wait.
pub(crate) struct Refusal {
    pub(crate) error: ApiError,
    pub(crate) retry_after: Option<u64>,
}

/// An admitted request; dropping it settles its reservation and records its usage.
pub(crate) struct Admission {
    tenants: Arc<Tenants>,
    caller: Caller,
    deployment: String,
    reserved: u64,
    /// What the worker reported.
    pub(crate) usage: Option<TokenUsage>,
    /// The answer was a success (a failed one uses no tokens).
    pub(crate) succeeded: bool,
    /// The relayed stream, read as it went (`None`: a whole answer).
    pub(crate) stream: Option<StreamMeter>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Caller::Key(k) = &self.caller {
            k.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let used = match (self.usage, self.succeeded, &self.stream) {
            (Some(u), _, _) => u,
            (None, true, Some(meter)) => meter.used(),
            (None, true, None) => TokenUsage {
                input_tokens: 0,
                output_tokens: self.reserved,
            },
            (None, false, _) => TokenUsage::default(),
        };
        self.tenants.settle(&self.caller, self.reserved, used);
        self.tenants
            .record(self.caller.id(), &self.deployment, used);
    }
}

/// Keys, quotas and the usage ledger.
pub(crate) struct Tenants {
    store: Mutex<Store>,
    /// Live keys by the hash of their secret.
    keys: RwLock<HashMap<String, Arc<Key>>>,
    admin_hash: Option<String>,
    /// Usage not yet written: (minute, key, deployment) -> counts.
    pending: Mutex<HashMap<(i64, String, String), UsageRow>>,
    default_reserve: u64,
    max_in_flight_per_key: u64,
    /// The buckets' clock.
    epoch: Instant,
}

/// SHA-256 of a secret, as hex.
fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `n` random bytes as hex, from the kernel's generator.
fn random_hex(n: usize) -> Result<String, GatewayError> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| GatewayError::Store(format!("no randomness for a key: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The secret a request presents: `Authorization: Bearer KEY`, else `x-api-key: KEY`.
/// Whether `headers` carry `key` (compared by hash, as every key is).
pub(crate) fn carries_key(headers: &HeaderMap, key: &str) -> bool {
    presented_key(headers).is_some_and(|k| hash(k) == hash(key))
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .filter(|k| !k.is_empty())
}

impl Tenants {
    /// Opens the ledger and loads the live keys.
    pub(crate) fn open(config: &TenantsConfig) -> Result<Self, GatewayError> {
        let store = Store::open(&config.db)?;
        let epoch = Instant::now();
        let keys = store
            .keys()?
            .into_iter()
            .map(|r| (r.hash.clone(), Arc::new(Key::new(r, 0.0))))
            .collect();
        Ok(Self {
            store: Mutex::new(store),
            keys: RwLock::new(keys),
            admin_hash: config.admin_key.as_deref().map(hash),
            pending: Mutex::new(HashMap::new()),
            default_reserve: config.default_reserve.max(1),
            max_in_flight_per_key: config.max_in_flight_per_key.max(1),
            epoch,
        })
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Whether requests must carry a key.
    pub(crate) fn required(&self) -> bool {
        self.admin_hash.is_some()
    }

    /// Whether `headers` carry the admin key (always true on an open gateway).
    pub(crate) fn is_admin(&self, headers: &HeaderMap) -> bool {
        match &self.admin_hash {
            None => true,
            Some(admin) => presented_key(headers).is_some_and(|k| hash(k) == *admin),
        }
    }

    /// Who sent `headers`; 401 when a key is needed and missing or unknown.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(secret) = presented_key(headers) else {
            return if self.required() {
                Err(ApiError::invalid_api_key(
                    "Missing API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`.",
                ))
            } else {
                Ok(Caller::Open)
            };
        };
        let h = hash(secret);
        if self.admin_hash.as_deref() == Some(h.as_str()) {
            return Ok(Caller::Admin);
        }
        if let Some(k) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&h) {
            return Ok(Caller::Key(k.clone()));
        }
        if self.required() {
            Err(ApiError::invalid_api_key("Incorrect API key provided."))
        } else {
            Ok(Caller::Open)
        }
    }

    /// Who sent `headers`, as APIs beside the gateway's own see it.
    pub(crate) fn caller_id(&self, headers: &HeaderMap) -> Result<crate::CallerId, ApiError> {
        Ok(match self.authenticate(headers)? {
            Caller::Open => crate::CallerId::Open,
            Caller::Admin => crate::CallerId::Admin,
            Caller::Key(k) => crate::CallerId::Key(k.record.id.clone()),
        })
    }

    /// Takes one request and reserves what it may cost (an unlimited output bounded by
    /// `context_length`, or the default reserve when that is unknown) from `caller`'s quotas,
    /// or says which limit refuses it and for how long.
    pub(crate) fn admit(
        self: &Arc<Self>,
        caller: Caller,
        deployment: &str,
        cost: TokenReservation,
        context_length: Option<u64>,
    ) -> Result<Admission, Refusal> {
        let reserved = cost.total(context_length, self.default_reserve);
        if let Caller::Key(k) = &caller {
            let now = self.now();
            let name = format!("`{}` ({})", k.record.name, k.record.id);
            if k.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight_per_key {
                k.in_flight.fetch_sub(1, Ordering::Relaxed);
                k.throttled_concurrency.fetch_add(1, Ordering::Relaxed);
                return Err(refusal(
                    "concurrent_requests",
                    format!(
                        "Rate limit reached for key {name} on concurrent requests: limit {} in \
                         flight. Please wait for one to finish.",
                        self.max_in_flight_per_key
                    ),
                    1.0,
                ));
            }
            // Every refusal below gives the in-flight slot back.
            let admitted = InFlightSlot(k);
            if let Some(rpm) = &k.rpm {
                let mut b = lock(rpm);
                if let Err(wait) = b.take(1.0, now) {
                    k.throttled_rpm.fetch_add(1, Ordering::Relaxed);
                    return Err(refusal(
                        "requests",
                        format!(
                            "Rate limit reached for key {name} on requests per minute (RPM): \
                             limit {}. Please try again in {:.1} s.",
                            b.capacity(),
                            wait
                        ),
                        wait,
                    ));
                }
            }
            if let Some(tpm) = &k.tpm {
                let mut b = lock(tpm);
                if let Err(wait) = b.take(reserved as f64, now) {
                    if let Some(rpm) = &k.rpm {
                        lock(rpm).give_back(1.0, now);
                    }
                    k.throttled_tpm.fetch_add(1, Ordering::Relaxed);
                    let message = if wait.is_finite() {
                        format!(
                            "Rate limit reached for key {name} on tokens per minute (TPM): limit \
                             {}, this request reserves {reserved} (its prompt, estimated, and \
                             its max_tokens, times n). Please try again in {wait:.1} s.",
                            b.capacity()
                        )
                    } else {
                        format!(
                            "Request too large for key {name}: it reserves {reserved} tokens (its \
                             prompt, estimated, and its max_tokens, times n), more than the \
                             tokens per minute (TPM) limit of {}. Lower max_tokens (without one, a \
                             chat request may fill the context window).",
                            b.capacity()
                        )
                    };
                    return Err(refusal("tokens", message, wait));
                }
            }
            std::mem::forget(admitted);
        }
        Ok(Admission {
            tenants: self.clone(),
            caller,
            deployment: deployment.to_string(),
            reserved,
            usage: None,
            succeeded: false,
            stream: None,
        })
    }

    /// Settles a reservation against what was used.
    fn settle(&self, caller: &Caller, reserved: u64, used: TokenUsage) {
        if let Caller::Key(k) = caller {
            if let Some(tpm) = &k.tpm {
                let spent = (used.input_tokens + used.output_tokens) as f64;
                lock(tpm).give_back(reserved as f64 - spent, self.now());
            }
        }
    }

    /// Counts one request's usage in the current minute.
    fn record(&self, key: &str, deployment: &str, used: TokenUsage) {
        let minute = unix_now() / 60 * 60;
        let mut pending = lock(&self.pending);
        let row = pending
            .entry((minute, key.to_string(), deployment.to_string()))
            .or_insert_with(|| UsageRow {
                minute,
                key: key.to_string(),
                deployment: deployment.to_string(),
                ..UsageRow::default()
            });
        row.requests += 1;
        row.input_tokens += used.input_tokens;
        row.output_tokens += used.output_tokens;
    }

    /// Writes the usage counted so far.
    pub(crate) fn flush(&self) -> Result<(), GatewayError> {
        let rows: Vec<UsageRow> = lock(&self.pending).drain().map(|(_, r)| r).collect();
        if rows.is_empty() {
            return Ok(());
        }
        let result = lock(&self.store).add_usage(&rows);
        if result.is_err() {
            // Keep them for the next try.
            let mut pending = lock(&self.pending);
            for r in rows {
                let e = pending
                    .entry((r.minute, r.key.clone(), r.deployment.clone()))
                    .or_default();
                e.minute = r.minute;
                e.key = r.key;
                e.deployment = r.deployment;
                e.requests += r.requests;
                e.input_tokens += r.input_tokens;
                e.output_tokens += r.output_tokens;
            }
        }
        result
    }

    /// Writes usage every second, forever.
    pub(crate) async fn flush_every_second(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = self.flush() {
                tracing::error!("writing usage: {e}");
            }
        }
    }

    /// Creates a key; returns its record and its secret (shown once, never stored).
    fn create_key(
        &self,
        name: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
    ) -> Result<(KeyRecord, String), GatewayError> {
        let secret = format!("lm-{}", random_hex(24)?);
        let record = KeyRecord {
            id: format!("key_{}", random_hex(6)?),
            name: name.to_string(),
            hash: hash(&secret),
            rpm,
            tpm,
            created: unix_now(),
        };
        lock(&self.store).insert_key(&record)?;
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(
            record.hash.clone(),
            Arc::new(Key::new(record.clone(), self.now())),
        );
        Ok((record, secret))
    }

    /// Revokes key `id`; whether it was live.
    fn revoke_key(&self, id: &str) -> Result<bool, GatewayError> {
        let found = lock(&self.store).revoke_key(id, unix_now())?;
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, k| k.record.id != id);
        Ok(found)
    }

    /// Requests refused with 429, per key and limit (key ids are label values).
    pub(crate) fn metrics(&self, page: &mut lastmile_http::metrics::Exposition) {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<&Arc<Key>> = keys.values().collect();
        keys.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        page.counters(
            "lastmile_throttled_total",
            "Requests refused with 429, per key and limit.",
            keys.iter().flat_map(|k| {
                [
                    ("rpm", &k.throttled_rpm),
                    ("tpm", &k.throttled_tpm),
                    ("concurrency", &k.throttled_concurrency),
                ]
                .map(|(limit, n)| {
                    (
                        vec![("key", k.record.id.clone()), ("limit", limit.to_string())],
                        n.load(Ordering::Relaxed),
                    )
                })
            }),
        );
    }
}

impl Key {
    fn new(record: KeyRecord, now: f64) -> Self {
        Self {
            rpm: record
                .rpm
                .map(|n| Mutex::new(TokenBucket::per_minute(n, now))),
            tpm: record
                .tpm
                .map(|n| Mutex::new(TokenBucket::per_minute(n, now))),
            record,
            throttled_rpm: AtomicU64::new(0),
            throttled_tpm: AtomicU64::new(0),
            throttled_concurrency: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }
}

/// A key's in-flight slot while admission may still refuse (dropped: given back; kept: owned by
/// the [`Admission`], which gives it back when it settles).
struct InFlightSlot<'a>(&'a Key);

impl Drop for InFlightSlot<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn refusal(kind: &str, message: String, wait: f64) -> Refusal {
    Refusal {
        error: ApiError::rate_limited(kind, message),
        retry_after: Some(if wait.is_finite() {
            wait.ceil().max(1.0) as u64
        } else {
            60
        }),
    }
}
