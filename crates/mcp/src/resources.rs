//! What lastmile runs, as MCP resources: `lastmile://sandboxes` (the caller's sandboxes),
//! `lastmile://sandboxes/{id}` (one: state, template, end, memory and CPU used),
//! `lastmile://sandboxes/{id}/files/{path}` (a file in it: text, or base64 for bytes that are
//! not UTF-8), and where the server serves models `lastmile://models` and
//! `lastmile://deployments`. A sandbox's resource can be subscribed to (`resources/subscribe`,
//! or `subscriptions/listen` from 2026-07-28): its state changes are sent as
//! `notifications/resources/updated`, and the list's as `notifications/resources/list_changed`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use lastmile_sandbox::service::{Change, Sandbox};
use lastmile_sandbox::wire::{Entry, Request as AgentRequest};
use lastmile_sandbox::SandboxService;
use rmcp::model::{
    ReadResourceResult, Resource, ResourceTemplate, ResourceUpdatedNotificationParam,
};
use rmcp::service::Peer;
use rmcp::{ErrorData, RoleServer};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::{ModelApi, MAX_OUTPUT};

/// The scheme of every real resource.
pub(crate) const SANDBOXES: &str = "lastmile://sandboxes";

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ErrorData> {
    serde_json::from_value(v).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

fn not_found(uri: &str, why: impl std::fmt::Display) -> ErrorData {
    ErrorData::resource_not_found(format!("{uri}: {why}"), Some(json!({ "uri": uri })))
}

/// `owner`'s resources: the lists, then each of its sandboxes.
pub(crate) fn list(svc: &SandboxService, owner: &str, models: bool) -> Vec<Resource> {
    let mut v = vec![
        json!({"uri": SANDBOXES, "name": "sandboxes", "mimeType": "application/json",
        "description": "Your live sandboxes: ids, templates, states and when each ends."}),
    ];
    if models {
        v.push(json!({"uri": "lastmile://models", "name": "models",
            "mimeType": "application/json",
            "description": "The models this server serves (ids for the chat tool)."}));
        v.push(
            json!({"uri": "lastmile://deployments", "name": "deployments",
            "mimeType": "application/json",
            "description": "The server's deployments and their replicas (needs the admin key \
                            where keys are on)."}),
        );
    }
    for s in svc.list(owner) {
        v.push(
            json!({"uri": format!("{SANDBOXES}/{}", s.id), "name": format!("sandbox {}", s.id),
            "mimeType": "application/json",
            "description": format!("Sandbox {} ({}): its state; subscribe for changes.",
                                   s.id, s.template.name)}),
        );
    }
    v.into_iter().filter_map(|r| typed(r).ok()).collect()
}

/// The resource templates: a sandbox, a file in one.
pub(crate) fn templates() -> Vec<ResourceTemplate> {
    typed(json!([
        {"uriTemplate": format!("{SANDBOXES}/{{id}}"), "name": "sandbox",
         "mimeType": "application/json",
         "description": "A sandbox's state, template, metadata, end and resources used."},
        {"uriTemplate": format!("{SANDBOXES}/{{id}}/files/{{+path}}"), "name": "sandbox file",
         "description": "A file in a sandbox, by absolute path (`.../files/home/user/a.py`): \
                         text, or base64 for other bytes (1 MiB at most)."},
    ]))
    .unwrap_or_default()
}

fn describe(s: &Sandbox) -> Value {
    let end = s
        .end_at()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "sandbox_id": s.id,
        "template": s.template.name,
        "state": s.state(),
        "metadata": s.metadata,
        "end_at_unix_s": end,
        "cpus": s.template.cpus,
        "memory_mb": s.template.memory_mb,
        "memory_used_bytes": s.memory_bytes(),
        "cpu_used_ns": s.cpu_ns(),
        "internet": s.internet,
    })
}

fn json_contents(uri: &str, v: &Value) -> Result<ReadResourceResult, ErrorData> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    crate::done(json!({"contents": [{"uri": uri, "mimeType": "application/json", "text": text}]}))
}

/// `%XX` escapes in a URI path undone (invalid ones kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mime_of(path: &str) -> &'static str {
    match path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("json") => "application/json",
        Some("py") => "text/x-python",
        Some("md") => "text/markdown",
        Some("html") => "text/html",
        Some("csv") => "text/csv",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("svg") => "image/svg+xml",
        Some("pdf") => "application/pdf",
        _ => "text/plain",
    }
}

/// Reads `uri` as `owner` (with `parts`' credentials for the model API).
pub(crate) async fn read(
    svc: &SandboxService,
    models: Option<&ModelApi>,
    owner: &str,
    parts: &http::request::Parts,
    uri: &str,
) -> Result<ReadResourceResult, ErrorData> {
    match uri {
        SANDBOXES => {
            let all: Vec<Value> = svc.list(owner).iter().map(|s| describe(s)).collect();
            return json_contents(uri, &json!({ "sandboxes": all }));
        }
        "lastmile://models" | "lastmile://deployments" => {
            let api = models.ok_or_else(|| not_found(uri, "this server serves no models"))?;
            let path = if uri.ends_with("models") {
                "/v1/models"
            } else {
                "/admin/deployments"
            };
            let v = api
                .get_json(path, parts)
                .await
                .map_err(|e| not_found(uri, e))?;
            return json_contents(uri, &v);
        }
        _ => {}
    }
    let rest = uri
        .strip_prefix(SANDBOXES)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| not_found(uri, "no such resource"))?;
    let (id, file) = match rest.split_once('/') {
        None => (rest, None),
        Some((id, f)) => {
            let path = f
                .strip_prefix("files/")
                .ok_or_else(|| not_found(uri, "no such resource"))?;
            (
                id,
                Some(format!("/{}", percent_decode(path.trim_start_matches('/')))),
            )
        }
    };
    let s = svc.get(owner, id).map_err(|e| not_found(uri, e))?;
    let Some(path) = file else {
        return json_contents(uri, &describe(&s));
    };
    if s.is_paused() {
        return Err(not_found(uri, "the sandbox is paused: resume it first"));
    }
    let (_, mut chunks) = s
        .conn
        .read_file(&path)
        .await
        .map_err(|f| not_found(uri, f.message))?;
    let mut bytes = Vec::new();
    while let Some(c) = chunks.recv().await {
        let c = c.map_err(|f| not_found(uri, f.message))?;
        if bytes.len() + c.len() > MAX_OUTPUT {
            return Err(ErrorData::invalid_params(
                format!("{path} is larger than 1 MiB"),
                None,
            ));
        }
        bytes.extend_from_slice(&c);
    }
    let mime = mime_of(&path);
    let contents = match String::from_utf8(bytes) {
        Ok(text) if !mime.starts_with("image/") && mime != "application/pdf" => {
            json!({"uri": uri, "mimeType": mime, "text": text})
        }
        Ok(text) => json!({"uri": uri, "mimeType": mime,
            "blob": base64::engine::general_purpose::STANDARD.encode(text)}),
        Err(e) => json!({"uri": uri, "mimeType": if mime.starts_with("text/") {
                "application/octet-stream" } else { mime },
            "blob": base64::engine::general_purpose::STANDARD.encode(e.into_bytes())}),
    };
    crate::done(json!({ "contents": [contents] }))
}

/// Completions for the templates' arguments: `owner`'s sandbox ids, and paths in one.
pub(crate) async fn complete(
    svc: &SandboxService,
    owner: &str,
    template: &str,
    argument: &str,
    value: &str,
    id: Option<&str>,
) -> Vec<String> {
    if !template.starts_with(SANDBOXES) {
        return Vec::new();
    }
    match argument {
        "id" => svc
            .list(owner)
            .into_iter()
            .map(|s| s.id.clone())
            .filter(|i| i.starts_with(value))
            .collect(),
        "path" => {
            let Some(s) = id.and_then(|id| svc.get(owner, id).ok()) else {
                return Vec::new();
            };
            let dir = match value.rsplit_once('/') {
                Some((d, _)) => format!("/{}", d.trim_start_matches('/')),
                None => "/".to_string(),
            };
            let Ok(v) = s
                .conn
                .call(&AgentRequest::ListDir {
                    path: dir,
                    depth: 1,
                })
                .await
            else {
                return Vec::new();
            };
            let entries: Vec<Entry> = serde_json::from_value(v).unwrap_or_default();
            let mut out: Vec<String> = entries
                .into_iter()
                .map(|e| {
                    let p = e.path.trim_start_matches('/').to_string();
                    if e.kind == "dir" {
                        format!("{p}/")
                    } else {
                        p
                    }
                })
                .filter(|p| p.starts_with(value.trim_start_matches('/')))
                .collect();
            out.sort();
            out
        }
        _ => Vec::new(),
    }
}

/// One session's resource subscriptions, and the task that sends their updates.
#[derive(Default)]
pub(crate) struct Subscriptions {
    inner: Mutex<SubState>,
}

#[derive(Default)]
struct SubState {
    uris: HashSet<String>,
    /// Dropped with the session: ends its watcher.
    stop: Option<tokio::sync::watch::Sender<()>>,
}

impl Subscriptions {
    fn state(&self) -> std::sync::MutexGuard<'_, SubState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes the session to `uri` (which `owner` may read), starting its watcher.
    pub(crate) fn add(
        self: &Arc<Self>,
        svc: &Arc<SandboxService>,
        owner: &str,
        peer: Peer<RoleServer>,
        uri: String,
    ) {
        let mut st = self.state();
        st.uris.insert(uri);
        if st.stop.is_some() {
            return;
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(());
        st.stop = Some(stop);
        let mut changes = OwnChanges::new(svc, owner);
        let subs = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = changes.next() => match c {
                        Some(c) => c,
                        None => return,
                    },
                    _ = stopped.changed() => return,
                };
                let Some(subs) = subs.upgrade() else { return };
                let uris = touched(subs.state().uris.iter(), &change);
                for uri in uris {
                    let note = ResourceUpdatedNotificationParam::new(uri);
                    if peer.notify_resource_updated(note).await.is_err() {
                        return;
                    }
                }
                if peer.notify_resource_list_changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Unsubscribes the session from `uri`.
    pub(crate) fn remove(&self, uri: &str) {
        self.state().uris.remove(uri);
    }
}

/// The changes to one owner's sandboxes.
pub(crate) struct OwnChanges {
    rx: tokio::sync::broadcast::Receiver<Change>,
    owner: String,
}

impl OwnChanges {
    /// `owner`'s sandbox changes from now on.
    pub(crate) fn new(svc: &SandboxService, owner: &str) -> Self {
        Self {
            rx: svc.changes(),
            owner: owner.to_string(),
        }
    }

    /// The next change to one of the owner's sandboxes (`None` once the service is gone; a
    /// receiver that lagged goes on from the oldest change still held).
    pub(crate) async fn next(&mut self) -> Option<Change> {
        loop {
            match self.rx.recv().await {
                Ok(c) if lastmile_sandbox::service::owner_matches(&self.owner, &c.owner) => {
                    return Some(c)
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return None,
            }
        }
    }
}

/// The subscribed `uris` that `change` updates.
pub(crate) fn touched<'a>(uris: impl Iterator<Item = &'a String>, change: &Change) -> Vec<String> {
    uris.filter(|u| touches(u, &change.id)).cloned().collect()
}

/// Whether a change to sandbox `id` updates resource `uri` (the list, the sandbox, its files).
pub(crate) fn touches(uri: &str, id: &str) -> bool {
    let Some(rest) = uri.strip_prefix(SANDBOXES) else {
        return false;
    };
    rest.is_empty()
        || rest
            .strip_prefix('/')
            .and_then(|r| r.strip_prefix(id))
            .is_some_and(|r| r.is_empty() || r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_touches_its_sandbox_its_files_and_the_list() {
        assert!(touches("lastmile://sandboxes", "abc"));
        assert!(touches("lastmile://sandboxes/abc", "abc"));
        assert!(touches("lastmile://sandboxes/abc/files/home/user/a", "abc"));
        assert!(!touches("lastmile://sandboxes/abcd", "abc"));
        assert!(!touches("lastmile://models", "abc"));
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(percent_decode("home/user/a%20b.txt"), "home/user/a b.txt");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
