//! Workers found through etcd.
//!
//! A worker registers itself under a key of a prefix (default `/lastmile/workers/`) with its
//! address, model and role as the value, attached to a lease it keeps alive: when the worker
//! stops it revokes the lease (the key goes at once), and when it dies the lease expires after
//! its TTL (the key goes within seconds). A gateway lists the prefix and then watches it from the
//! listing's revision, so it sees every worker that comes and goes, and lists again whenever its
//! watch breaks.
//!
//! This speaks etcd's v3 API through its JSON gateway (`/v3/...`, served on the client port of
//! every etcd since 3.3), over the HTTP client the rest of lastmile uses: with etcd's
//! user/password authentication (a token fetched with `/v3/auth/authenticate`, fetched again
//! when etcd says it expired) and TLS (`https://` endpoints, a private CA, a client certificate
//! for `--client-cert-auth`), configured by [`EtcdConfig`].
#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use thiserror::Error;

/// The default key prefix workers register under.
pub const DEFAULT_PREFIX: &str = "/lastmile/workers/";

/// Discovery failures.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    /// No etcd endpoint answered.
    #[error("etcd unreachable at {endpoints}: {message}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        message: String,
    },
    /// The client could not be set up (a certificate file, credentials).
    #[error("etcd client: {0}")]
    Config(String),
    /// etcd answered with an error or something unexpected.
    #[error("etcd {call}: {message}")]
    Etcd {
        /// The API called.
        call: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl DiscoveryError {
    /// A short label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Config(_) => "config",
            Self::Etcd { .. } => "etcd",
        }
    }
}

type Result<T> = std::result::Result<T, DiscoveryError>;

/// What a worker publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Base URL the gateway reaches it at (`http://host:port`).
    pub url: String,
    /// The model it serves.
    pub model: String,
    /// `both`, `prefill` or `decode`.
    pub role: String,
}

/// How to reach one etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:2379`, `https://...`), tried in turn.
    pub endpoints: Vec<String>,
    /// A user and password for etcd's authentication (`etcdctl auth enable`).
    pub user: Option<(String, String)>,
    /// PEM file of the CA that signed the servers' certificates (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM files of a client certificate and its key (etcd's `--client-cert-auth`).
    pub cert: Option<(PathBuf, PathBuf)>,
    /// A watch that brings nothing for this long (or whose request gets no reply) is started
    /// again (after a fresh listing): a connection that died without a word (a partition, a
    /// vanished host) is noticed.
    pub watch_idle: Duration,
}

impl EtcdConfig {
    /// Plain HTTP to these endpoints without credentials; watches restarted after 30 s of quiet.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            user: None,
            ca: None,
            cert: None,
            watch_idle: Duration::from_secs(30),
        }
    }
}

/// A client of one etcd cluster (any of its endpoints).
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    client: reqwest::Client,
    user: Option<Arc<(String, String)>>,
    /// The current auth token (with `user`).
    token: Arc<RwLock<Option<String>>>,
    watch_idle: Duration,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Option<String> {
    String::from_utf8(B64.decode(v.as_str()?).ok()?).ok()
}

/// etcd's JSON gateway writes 64-bit integers as strings.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The key right after every key with this prefix (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return B64.encode(&end);
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    B64.encode([0u8])
}

impl Etcd {
    /// A plain-HTTP client for these endpoints (`http://host:2379`, ...), without credentials.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self::connect(&EtcdConfig::new(endpoints)).expect("a plain client needs no files")
    }

    /// A client as `config` says; fails on an unreadable or invalid certificate file.
    pub fn connect(config: &EtcdConfig) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_keepalive(Duration::from_secs(15))
            // No idle connections kept: a call after a watch went silent (a dead proxy, a
            // half-open link) must not land on a pooled connection just as dead and wait out
            // its timeout. Unary calls are rare (listing, lease renewals), watches are streams.
            .pool_max_idle_per_host(0)
            .use_rustls_tls();
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                DiscoveryError::Config(format!("reading the {what} {}: {e}", p.display()))
            })
        };
        if let Some(ca) = &config.ca {
            let pem = read(ca, "CA certificate")?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                DiscoveryError::Config(format!("{}: not a PEM certificate: {e}", ca.display()))
            })?;
            if certs.is_empty() {
                return Err(DiscoveryError::Config(format!(
                    "{}: no certificate in it",
                    ca.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &config.cert {
            let mut pem = read(cert, "client certificate")?;
            pem.push(b'\n');
            pem.extend(read(key, "client key")?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                DiscoveryError::Config(format!(
                    "{} and {}: not a PEM certificate and key: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
            builder = builder.identity(id);
        }
        let client = builder
            .build()
            .map_err(|e| DiscoveryError::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            endpoints: config
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            client,
            user: config.user.clone().map(Arc::new),
            token: Arc::new(RwLock::new(None)),
            watch_idle: config.watch_idle,
        })
    }

    /// A request to `path` on endpoint `e`, with the auth token when there is one.
    fn post(&self, e: &str, path: &str) -> reqwest::RequestBuilder {
        let req = self.client.post(format!("{e}{path}"));
        match self
            .token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
        {
            Some(t) => req.header(reqwest::header::AUTHORIZATION, t),
            None => req,
        }
    }

    /// Fetches a fresh auth token (with credentials configured).
    async fn authenticate(&self) -> Result<()> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = None;
        let v = self
            .call_once(
                "authenticate",
                "/v3/auth/authenticate",
                &json!({"name": user.0, "password": user.1}),
            )
            .await?;
        let token = v["token"].as_str().ok_or(DiscoveryError::Etcd {
            call: "authenticate",
            message: "no token in the reply".into(),
        })?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token.to_string());
        Ok(())
    }

    /// Whether a token should be fetched before calling (credentials, and none yet).
    fn needs_token(&self) -> bool {
        self.user.is_some()
            && self
                .token
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
    }

    /// One unary call, authenticating first when needed and again when etcd says the token is
    /// no longer valid (it expires: `--auth-token-ttl`, or etcd restarted).
    async fn call(&self, call: &'static str, path: &str, body: Value) -> Result<Value> {
        if self.needs_token() {
            self.authenticate().await?;
        }
        match self.call_once(call, path, &body).await {
            Err(DiscoveryError::Etcd { message, .. })
                if self.user.is_some() && message.contains("invalid auth token") =>
            {
                self.authenticate().await?;
                self.call_once(call, path, &body).await
            }
            other => other,
        }
    }

    /// One unary call, trying each endpoint in turn.
    async fn call_once(&self, call: &'static str, path: &str, body: &Value) -> Result<Value> {
        let mut last = String::from("no endpoints given");
        for e in &self.endpoints {
            let reply = self
                .post(e, path)
                .json(body)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(err) => {
                    last = err.to_string();
                    continue;
                }
            };
            let status = reply.status();
            let v: Value = reply.json().await.map_err(|err| DiscoveryError::Etcd {
                call,
                message: format!("unreadable reply: {err}"),
            })?;
            if !status.is_success() || v.get("error").is_some() {
                return Err(DiscoveryError::Etcd {
                    call,
                    message: v["message"]
                        .as_str()
                        .or(v["error"].as_str())
                        .map_or_else(|| format!("HTTP {status}"), str::to_string),
                });
            }
            return Ok(v);
        }
        Err(DiscoveryError::Unreachable {
            endpoints: self.endpoints.join(","),
            message: last,
        })
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant(&self, ttl: u64) -> Result<i64> {
        let v = self
            .call(
                "lease grant",
                "/v3/lease/grant",
                json!({"TTL": ttl.to_string()}),
            )
            .await?;
        int(&v["ID"]).ok_or(DiscoveryError::Etcd {
            call: "lease grant",
            message: format!("no lease id in {v}"),
        })
    }

    /// Refreshes a lease; returns its remaining TTL in seconds (0: the lease is gone).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64> {
        let v = self
            .call(
                "lease keepalive",
                "/v3/lease/keepalive",
                json!({"ID": lease.to_string()}),
            )
            .await?;
        Ok(int(&v["result"]["TTL"]).unwrap_or(0))
    }

    /// Revokes a lease: every key attached to it is deleted.
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        self.call(
            "lease revoke",
            "/v3/lease/revoke",
            json!({"ID": lease.to_string()}),
        )
        .await
        .map(drop)
    }

    /// Writes `key = value`, attached to `lease` if given.
    pub async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<()> {
        let mut body = json!({"key": b64(key), "value": b64(value)});
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        self.call("put", "/v3/kv/put", body).await.map(drop)
    }

    /// Every key under `prefix` with its value, and the store's revision at that moment.
    pub async fn list(&self, prefix: &str) -> Result<(i64, Vec<(String, String)>)> {
        let v = self
            .call(
                "range",
                "/v3/kv/range",
                json!({"key": b64(prefix), "range_end": prefix_end(prefix)}),
            )
            .await?;
        let revision = int(&v["header"]["revision"]).unwrap_or(0);
        let kvs = v["kvs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|kv| {
                        Some((unb64(&kv["key"])?, unb64(&kv["value"]).unwrap_or_default()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((revision, kvs))
    }

    /// Follows changes under `prefix` from `revision` on; each item is one batch of changes
    /// (empty for a message without any). The stream ends when the watch breaks or etcd ends
    /// it.
    pub async fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<impl futures::Stream<Item = Vec<Change>> + use<>> {
        let body = json!({"create_request": {
            "key": b64(prefix),
            "range_end": prefix_end(prefix),
            "start_revision": revision.to_string(),
        }});
        if self.needs_token() {
            self.authenticate().await?;
        }
        let mut last = String::from("no endpoints given");
        for e in &self.endpoints {
            // etcd answers a watch's creation at once; a request that gets no reply within the
            // idle limit went into a dead connection (a partition, a proxy that stopped
            // carrying): give up on it as on a watch gone quiet, or the follower would wait
            // for those headers forever.
            let sent = self.post(e, "/v3/watch").json(&body).send();
            let reply = match tokio::time::timeout(self.watch_idle, sent).await {
                Ok(reply) => reply,
                Err(_) => {
                    last = format!("no reply to the watch within {:?}", self.watch_idle);
                    continue;
                }
            };
            match reply {
                Ok(r) if r.status().is_success() => {
                    let bytes = r.bytes_stream();
                    let lines = futures::stream::unfold(
                        (bytes, Vec::<u8>::new()),
                        |(mut bytes, mut buf)| async move {
                            loop {
                                if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                                    let line: Vec<u8> = buf.drain(..=end).collect();
                                    return Some((line, (bytes, buf)));
                                }
                                match bytes.next().await {
                                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                                    _ if !buf.is_empty() => {
                                        let line = std::mem::take(&mut buf);
                                        return Some((line, (bytes, buf)));
                                    }
                                    _ => return None,
                                }
                            }
                        },
                    );
                    // Every line is an item (an empty batch for a line without events, such as
                    // the watch's creation), so that the follower sees the watch is alive; an
                    // error line (the token expired, the revision was compacted) ends it.
                    let token = self.token.clone();
                    let batches = lines.map(move |line| {
                        let v: Value = serde_json::from_slice(&line).ok()?;
                        if v.get("error").is_some() || v["result"]["canceled"] == true {
                            tracing::warn!("etcd ended the watch: {v}");
                            // A token gone stale is fetched again with the next listing.
                            *token.write().unwrap_or_else(|p| p.into_inner()) = None;
                            return None;
                        }
                        let events = v["result"]["events"].as_array();
                        Some(events.map_or_else(Vec::new, |events| {
                            events.iter().filter_map(Change::parse).collect()
                        }))
                    });
                    return Ok(batches
                        .take_while(|b| futures::future::ready(b.is_some()))
                        .filter_map(futures::future::ready));
                }
                Ok(r) => last = format!("HTTP {}", r.status()),
                Err(err) => last = err.to_string(),
            }
        }
        Err(DiscoveryError::Unreachable {
            endpoints: self.endpoints.join(","),
            message: last,
        })
    }
}

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key was written.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: String,
    },
    /// A key was deleted (or its lease expired or was revoked).
    Delete {
        /// The key.
        key: String,
    },
}

impl Change {
    fn parse(event: &Value) -> Option<Self> {
        let key = unb64(&event["kv"]["key"])?;
        Some(match event["type"].as_str() {
            Some("DELETE") => Self::Delete { key },
            _ => Self::Put {
                key,
                value: unb64(&event["kv"]["value"]).unwrap_or_default(),
            },
        })
    }
}

/// A worker's entry in etcd, kept alive in the background. Dropping it stops the keep-alive
/// (the entry then expires with its lease, as when the worker dies); [`Registration::deregister`]
/// removes it at once.
pub struct Registration {
    etcd: Etcd,
    lease: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Registers `info` under `prefix` with a lease of `ttl` seconds, and keeps it registered —
    /// refreshing the lease every third of its TTL, and registering again if etcd forgot it
    /// (after a partition longer than the TTL, or an etcd restart). Fails if etcd cannot be
    /// reached for the first registration.
    pub async fn start(etcd: Etcd, prefix: &str, info: WorkerInfo, ttl: u64) -> Result<Self> {
        let ttl = ttl.max(1);
        let value = serde_json::to_string(&info).unwrap_or_default();
        let first = register(&etcd, prefix, &value, ttl).await?;
        let lease = Arc::new(AtomicI64::new(first));
        let (client, current, prefix) = (etcd.clone(), lease.clone(), prefix.to_string());
        let task = tokio::spawn(async move {
            let every = Duration::from_millis(ttl * 1000 / 3);
            loop {
                tokio::time::sleep(every).await;
                let id = current.load(Ordering::Relaxed);
                match client.keep_alive(id).await {
                    Ok(left) if left > 0 => continue,
                    Ok(_) => tracing::warn!("etcd forgot this worker's lease; registering again"),
                    Err(e) => {
                        tracing::warn!("etcd keep-alive failed: {e}");
                        continue;
                    }
                }
                match register(&client, &prefix, &value, ttl).await {
                    Ok(id) => current.store(id, Ordering::Relaxed),
                    Err(e) => tracing::warn!("registering with etcd again failed: {e}"),
                }
            }
        });
        Ok(Self { etcd, lease, task })
    }

    /// Removes the entry now (revokes its lease) and stops the keep-alive.
    pub async fn deregister(self) -> Result<()> {
        self.task.abort();
        self.etcd.revoke(self.lease.load(Ordering::Relaxed)).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register(etcd: &Etcd, prefix: &str, value: &str, ttl: u64) -> Result<i64> {
    let lease = etcd.grant(ttl).await?;
    etcd.put(&format!("{prefix}{lease:016x}"), value, Some(lease))
        .await?;
    Ok(lease)
}

/// What a follower of the worker prefix reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkersUpdate {
    /// Every registered worker now (after a (re)listing): forget any other.
    Snapshot(Vec<(String, WorkerInfo)>),
    /// A worker registered (or re-registered) under this key.
    Up(String, WorkerInfo),
    /// The worker under this key is gone.
    Down(String),
}

/// Follows the workers under `prefix` forever: a snapshot first (and again whenever the watch
/// breaks and is re-established), then every change. Entries that are not a [`WorkerInfo`] are
/// ignored.
pub async fn follow_workers(etcd: Etcd, prefix: String, mut update: impl FnMut(WorkersUpdate)) {
    let parse = |v: &str| serde_json::from_str::<WorkerInfo>(v).ok();
    loop {
        let listed = etcd.list(&prefix).await;
        let (revision, kvs) = match listed {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("listing workers in etcd failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        update(WorkersUpdate::Snapshot(
            kvs.iter()
                .filter_map(|(k, v)| Some((k.clone(), parse(v)?)))
                .collect(),
        ));
        match etcd.watch(&prefix, revision + 1).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    let changes = match tokio::time::timeout(etcd.watch_idle, stream.next()).await {
                        Ok(Some(changes)) => changes,
                        Ok(None) => break,
                        Err(_) => {
                            tracing::debug!(
                                "etcd watch quiet for {:?}; listing workers again",
                                etcd.watch_idle
                            );
                            break;
                        }
                    };
                    for c in changes {
                        match c {
                            Change::Put { key, value } => {
                                if let Some(info) = parse(&value) {
                                    update(WorkersUpdate::Up(key, info));
                                }
                            }
                            Change::Delete { key } => update(WorkersUpdate::Down(key)),
                        }
                    }
                }
                tracing::info!("etcd watch ended; listing workers again");
            }
            Err(e) => tracing::warn!("watching workers in etcd failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges_and_encodings() {
        assert_eq!(prefix_end("/a/"), b64("/a0"));
        assert_eq!(unb64(&json!(b64("/x/y"))).as_deref(), Some("/x/y"));
        assert_eq!(
            int(&json!("7587852342465428739")),
            Some(7_587_852_342_465_428_739)
        );
        assert_eq!(int(&json!(5)), Some(5));
        let put = json!({"kv": {"key": b64("/w/1"), "value": b64("{}")}});
        assert_eq!(
            Change::parse(&put),
            Some(Change::Put {
                key: "/w/1".into(),
                value: "{}".into()
            })
        );
        let del = json!({"type": "DELETE", "kv": {"key": b64("/w/1")}});
        assert_eq!(
            Change::parse(&del),
            Some(Change::Delete { key: "/w/1".into() })
        );
    }
}
