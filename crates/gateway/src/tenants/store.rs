//! The tenants' durable state in SQLite (WAL): API keys (only their SHA-256 is stored) and
//! usage per key, deployment and minute. Usage is added in batches (one transaction a second);
//! with WAL and `synchronous=NORMAL` a committed batch survives the process being killed.

use std::path::Path;

use rusqlite::{params, Connection};
use serde::Serialize;

use crate::GatewayError;

/// An API key as stored (never the secret itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct KeyRecord {
    pub(crate) id: String,
    pub(crate) name: String,
    #[serde(skip)]
    pub(crate) hash: String,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) created: i64,
}

/// Usage of one key on one deployment in one minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct UsageRow {
    /// Unix time of the minute's start.
    pub(crate) minute: i64,
    pub(crate) key: String,
    pub(crate) deployment: String,
    pub(crate) requests: u64,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
}

/// Which usage rows to read.
#[derive(Debug, Clone, Default)]
pub(crate) struct UsageQuery {
    pub(crate) key: Option<String>,
    pub(crate) deployment: Option<String>,
    /// Unix seconds, inclusive.
    pub(crate) from: Option<i64>,
    /// Unix seconds, exclusive.
    pub(crate) to: Option<i64>,
}

/// The database.
pub(crate) struct Store {
    conn: Connection,
}

fn db_error(e: rusqlite::Error) -> GatewayError {
    GatewayError::Store(e.to_string())
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self, GatewayError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| GatewayError::Store(format!("creating {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(db_error)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS api_keys (
                 id TEXT PRIMARY KEY,
                 name TEXT NOT NULL,
                 hash TEXT NOT NULL UNIQUE,
                 rpm INTEGER,
                 tpm INTEGER,
                 created INTEGER NOT NULL,
                 revoked INTEGER
             );
             CREATE TABLE IF NOT EXISTS usage (
                 minute INTEGER NOT NULL,
                 key TEXT NOT NULL,
                 deployment TEXT NOT NULL,
                 requests INTEGER NOT NULL,
                 input_tokens INTEGER NOT NULL,
                 output_tokens INTEGER NOT NULL,
                 PRIMARY KEY (minute, key, deployment)
             );",
        )
        .map_err(db_error)?;
        Ok(Self { conn })
    }

    /// Every key not revoked.
    pub(crate) fn keys(&self) -> Result<Vec<KeyRecord>, GatewayError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, name, hash, rpm, tpm, created FROM api_keys WHERE revoked IS NULL \
                 ORDER BY created, id",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(KeyRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    hash: r.get(2)?,
                    rpm: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    tpm: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    created: r.get(5)?,
                })
            })
            .map_err(db_error)?;
        rows.collect::<Result<_, _>>().map_err(db_error)
    }

    pub(crate) fn insert_key(&self, k: &KeyRecord) -> Result<(), GatewayError> {
        self.conn
            .execute(
                "INSERT INTO api_keys (id, name, hash, rpm, tpm, created) VALUES (?1, ?2, ?3, ?4, \
                 ?5, ?6)",
                params![
                    k.id,
                    k.name,
                    k.hash,
                    k.rpm.map(|v| v as i64),
                    k.tpm.map(|v| v as i64),
                    k.created
                ],
            )
            .map_err(db_error)?;
        Ok(())
    }

    /// Revokes key `id`; whether it existed (and was live).
    pub(crate) fn revoke_key(&self, id: &str, now: i64) -> Result<bool, GatewayError> {
        let n = self
            .conn
            .execute(
                "UPDATE api_keys SET revoked = ?2 WHERE id = ?1 AND revoked IS NULL",
                params![id, now],
            )
            .map_err(db_error)?;
        Ok(n > 0)
    }

    /// Adds `rows` to the stored counts, in one transaction.
    pub(crate) fn add_usage(&mut self, rows: &[UsageRow]) -> Result<(), GatewayError> {
        let tx = self.conn.transaction().map_err(db_error)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO usage (minute, key, deployment, requests, input_tokens, \
                     output_tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (minute, key, deployment) DO UPDATE SET
                       requests = requests + excluded.requests,
                       input_tokens = input_tokens + excluded.input_tokens,
                       output_tokens = output_tokens + excluded.output_tokens",
                )
                .map_err(db_error)?;
            for r in rows {
                stmt.execute(params![
                    r.minute,
                    r.key,
                    r.deployment,
                    r.requests as i64,
                    r.input_tokens as i64,
                    r.output_tokens as i64
                ])
                .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }

    /// Usage rows matching `q`, by minute.
    pub(crate) fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, GatewayError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT minute, key, deployment, requests, input_tokens, output_tokens FROM usage
                 WHERE (?1 IS NULL OR key = ?1) AND (?2 IS NULL OR deployment = ?2)
                   AND (?3 IS NULL OR minute >= ?3) AND (?4 IS NULL OR minute < ?4)
                 ORDER BY minute, key, deployment",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![q.key, q.deployment, q.from, q.to], |r| {
                Ok(UsageRow {
                    minute: r.get(0)?,
                    key: r.get(1)?,
                    deployment: r.get(2)?,
                    requests: r.get::<_, i64>(3)? as u64,
                    input_tokens: r.get::<_, i64>(4)? as u64,
                    output_tokens: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(db_error)?;
        rows.collect::<Result<_, _>>().map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_usage_persist_and_add_up() {
        let dir = std::env::temp_dir().join(format!("lastmile-store-{}", std::process::id()));
        let path = dir.join("t.db");
        let _ = std::fs::remove_file(&path);
        {
            let mut s = Store::open(&path).expect("open");
            let k = KeyRecord {
                id: "key_1".into(),
                name: "team a".into(),
                hash: "abc".into(),
                rpm: Some(10),
                tpm: None,
                created: 5,
            };
            s.insert_key(&k).expect("insert");
            let row = |minute, requests| UsageRow {
                minute,
                key: "key_1".into(),
                deployment: "smol".into(),
                requests,
                input_tokens: 30 * requests,
                output_tokens: 16 * requests,
            };
            s.add_usage(&[row(60, 1), row(120, 2)]).expect("add");
            s.add_usage(&[row(60, 3)]).expect("add");
        }
        let s = Store::open(&path).expect("reopen");
        let keys = s.keys().expect("keys");
        assert_eq!(keys.len(), 1);
        assert_eq!((keys[0].rpm, keys[0].tpm), (Some(10), None));
        let rows = s.usage(&UsageQuery::default()).expect("usage");
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].requests, rows[0].input_tokens), (4, 120));
        let later = s
            .usage(&UsageQuery {
                from: Some(100),
                ..UsageQuery::default()
            })
            .expect("usage");
        assert_eq!(later.len(), 1);
        assert!(s.revoke_key("key_1", 9).expect("revoke"));
        assert!(!s.revoke_key("key_1", 9).expect("revoke twice"));
        assert!(s.keys().expect("keys").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
