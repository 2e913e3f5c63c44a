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
//! every etcd since 3.3), over the HTTP client the rest of lastmile uses.
#![warn(missing_docs)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
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

/// A client of one etcd cluster (any of its endpoints).
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    client: reqwest::Client,
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
    /// A client for these endpoints (`http://host:2379`, ...).
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    /// One unary call, trying each endpoint in turn.
    async fn call(&self, call: &'static str, path: &str, body: Value) -> Result<Value> {
        let mut last = String::from("no endpoints given");
        for e in &self.endpoints {
            let reply = self
                .client
                .post(format!("{e}{path}"))
                .json(&body)
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

    /// Follows changes under `prefix` from `revision` on; each item is one batch of changes.
    /// The stream ends when the watch breaks.
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
        let mut last = String::from("no endpoints given");
        for e in &self.endpoints {
            match self
                .client
                .post(format!("{e}/v3/watch"))
                .json(&body)
                .send()
                .await
            {
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
                    return Ok(lines.filter_map(|line| async move {
                        let v: Value = serde_json::from_slice(&line).ok()?;
                        let events = v["result"]["events"].as_array()?;
                        let changes: Vec<Change> =
                            events.iter().filter_map(Change::parse).collect();
                        (!changes.is_empty()).then_some(changes)
                    }));
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
                while let Some(changes) = stream.next().await {
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
                tracing::warn!("etcd watch ended; listing workers again");
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
