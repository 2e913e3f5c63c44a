//! lastmile's MCP server: its sandboxes as tools any MCP client can call, over Streamable HTTP
//! at `/mcp` on the server's own port, behind the same API keys (built on the official Rust SDK,
//! `rmcp`).
//!
//! Every tool acts as the caller's key: a sandbox made through MCP belongs to that key exactly
//! as one made through the E2B API (another key gets "not found"), and counts against its
//! limits. A tool that fails answers a tool result with `isError: true` and a message a model
//! can act on (unknown sandbox, timeout, limit), never a protocol error.
//!
//! Tools: `sandbox_create`, `sandbox_kill`, `sandbox_set_timeout`, `run_command` (to its end,
//! or in the background), `run_code` (makes a sandbox when none is given, and says which),
//! `read_file`, `write_file`, `list_files`, `kill_process`; and where the server also serves
//! models, `list_models` and `chat` (through the server's own API with the caller's key, so
//! quotas hold and usage is charged). A command past its `timeout_s`, or whose call the client
//! cancels, is killed; one that runs long reports progress each second to a caller that sent a
//! progress token.
//!
//! Resources (see [`resources`]): the caller's sandboxes, each sandbox and its files, the served
//! models and the deployments, with subscriptions to sandbox changes. Protocol revisions
//! 2024-11-05 to 2026-07-28 are negotiated by `rmcp` (sessions up to 2025-11-25; stateless with
//! `server/discover` from 2026-07-28).
#![warn(missing_docs)]

mod fixtures;
mod handler;
pub mod resources;
mod schema;

pub use schema::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use lastmile_sandbox::conn::{ProcConfig, ProcEvent};
use lastmile_sandbox::e2b::Authenticate;
use lastmile_sandbox::service::{CreateRequest, Sandbox};
use lastmile_sandbox::wire::{Entry, Request as AgentRequest};
use lastmile_sandbox::SandboxService;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::ProgressNotificationParam;
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool, tool_router, ErrorData, Json, RoleServer};

/// The caller's sandbox owner name, set by the `/mcp` authentication layer.
#[derive(Clone, Debug)]
struct Owner(String);

/// Most output a tool returns per stream; the rest is cut (and said so).
pub(crate) const MAX_OUTPUT: usize = 1 << 20;
/// Longest a command may run through MCP.
const MAX_TIMEOUT_S: u64 = 3600;
/// How often a running command reports progress (when the caller asked for it).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The MCP server over one sandbox service (and the server's model API, when it has one).
#[derive(Clone)]
pub struct LastmileMcp {
    svc: Arc<SandboxService>,
    models: Option<ModelApi>,
    /// Whether the conformance suite's fixtures are served too.
    fixtures: bool,
    tool_router: ToolRouter<Self>,
    /// This session's resource subscriptions (each session gets its own).
    subs: Arc<resources::Subscriptions>,
}

/// The server's own model API, reached over loopback with the caller's key.
#[derive(Clone)]
pub(crate) struct ModelApi {
    base: String,
    client: reqwest::Client,
}

impl ModelApi {
    /// A request to the server's own API with the caller's credentials.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        parts: &http::request::Parts,
    ) -> reqwest::RequestBuilder {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        for h in [header::AUTHORIZATION.as_str(), "x-api-key"] {
            if let Some(v) = parts.headers.get(h) {
                r = r.header(h, v.as_bytes());
            }
        }
        r
    }

    /// `GET path` on the server's own API as the caller; an error answer is an error.
    pub(crate) async fn get_json(
        &self,
        path: &str,
        parts: &http::request::Parts,
    ) -> Result<serde_json::Value, String> {
        let r = self
            .request(reqwest::Method::GET, path, parts)
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.map_err(|e| format!("{path}: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{path} answered {status}: {}",
                v["error"]["message"]
                    .as_str()
                    .or(v["error"].as_str())
                    .unwrap_or("no message")
            ));
        }
        Ok(v)
    }

    async fn models(&self, parts: &http::request::Parts) -> Result<Vec<String>, String> {
        let v = self.get_json("/v1/models", parts).await?;
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A result's JSON as its protocol type, marked complete (2026-07-28 requires `resultType`;
/// `rmcp` removes it for older peers).
pub(crate) fn done<T: serde::de::DeserializeOwned>(
    mut v: serde_json::Value,
) -> Result<T, ErrorData> {
    v["resultType"] = serde_json::json!("complete");
    serde_json::from_value(v).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

/// What a path means inside: relative paths are under the sandbox user's home.
fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/home/user/{path}")
    }
}

fn owner(parts: &http::request::Parts) -> Result<String, String> {
    parts
        .extensions
        .get::<Owner>()
        .map(|o| o.0.clone())
        .ok_or_else(|| "not authenticated".to_string())
}

fn clip(mut bytes: Vec<u8>) -> String {
    let cut = bytes.len() > MAX_OUTPUT;
    bytes.truncate(MAX_OUTPUT);
    let mut s = String::from_utf8_lossy(&bytes).into_owned();
    if cut {
        s.push_str("\n[output cut at 1 MiB]");
    }
    s
}

#[tool_router]
impl LastmileMcp {
    /// A server over `svc`; with `models` (the server's base URL) its model API too; with
    /// `fixtures`, the conformance suite's fixtures beside the real tools.
    pub fn new(svc: Arc<SandboxService>, models: Option<String>, fixtures: bool) -> Self {
        let mut tool_router = Self::tool_router();
        if fixtures {
            tool_router += fixtures::tools();
        }
        Self {
            svc,
            models: models.map(|base| ModelApi {
                base: base.trim_end_matches('/').to_string(),
                client: reqwest::Client::new(),
            }),
            fixtures,
            tool_router,
            subs: Arc::default(),
        }
    }

    /// The server for a new session: the same tools, its own subscriptions.
    fn session(&self) -> Self {
        Self {
            subs: Arc::default(),
            ..self.clone()
        }
    }

    fn model_api(&self) -> Result<&ModelApi, String> {
        self.models
            .as_ref()
            .ok_or_else(|| "this server serves no models (sandboxes only)".to_string())
    }

    #[tool(description = "List the language models this server serves (for the chat tool).")]
    async fn list_models(
        &self,
        Extension(parts): Extension<http::request::Parts>,
    ) -> Result<Json<ModelIds>, String> {
        let models = self.model_api()?.models(&parts).await?;
        Ok(Json(ModelIds { models }))
    }

    #[tool(
        description = "Ask a language model served here: send a conversation, get its answer \
                       and the tokens charged to your key."
    )]
    async fn chat(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<ChatArgs>,
    ) -> Result<Json<ChatAnswer>, String> {
        let api = self.model_api()?;
        let model = match a.model {
            Some(m) => m,
            None => api
                .models(&parts)
                .await?
                .into_iter()
                .next()
                .ok_or("no model is served")?,
        };
        let mut body = serde_json::json!({
            "model": model,
            "messages": a.messages,
            "max_tokens": a.max_tokens.unwrap_or(256),
        });
        if let Some(t) = a.temperature {
            body["temperature"] = serde_json::json!(t);
        }
        let resp = api
            .request(reqwest::Method::POST, "/v1/chat/completions", &parts)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("asking {model}: {e}"))?;
        let status = resp.status();
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("asking {model}: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{model} answered {status}: {}",
                v["error"]["message"].as_str().unwrap_or("no message")
            ));
        }
        let choice = &v["choices"][0];
        Ok(Json(ChatAnswer {
            model: v["model"].as_str().unwrap_or(&model).to_string(),
            content: choice["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            finish_reason: choice["finish_reason"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        }))
    }

    fn sandbox(&self, parts: &http::request::Parts, id: &str) -> Result<Arc<Sandbox>, String> {
        let o = owner(parts)?;
        let s = self.svc.get(&o, id).map_err(|e| e.to_string())?;
        if s.is_paused() {
            return Err(format!("sandbox {id} is paused: resume it before using it"));
        }
        Ok(s)
    }

    async fn create(
        &self,
        parts: &http::request::Parts,
        template: String,
        timeout_s: Option<u64>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Arc<Sandbox>, String> {
        let o = owner(parts)?;
        self.svc
            .create(
                &o,
                CreateRequest {
                    template,
                    timeout: timeout_s.map(Duration::from_secs),
                    metadata,
                    envs: BTreeMap::new(),
                    network: None,
                },
            )
            .await
            .map_err(|e| format!("creating a sandbox: {e}"))
    }

    #[tool(
        description = "Create an isolated Linux sandbox (Python 3, bash; no network) to run \
                       commands and code in. Returns its sandbox_id for the other tools."
    )]
    async fn sandbox_create(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<CreateArgs>,
    ) -> Result<Json<Created>, String> {
        let s = self
            .create(
                &parts,
                a.template.unwrap_or_else(|| "base".into()),
                a.timeout_s,
                a.metadata.unwrap_or_default(),
            )
            .await?;
        Ok(Json(created(&s)))
    }

    #[tool(description = "Kill a sandbox: every process in it ends and its files are gone.")]
    async fn sandbox_kill(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<SandboxArgs>,
    ) -> Result<String, String> {
        let o = owner(&parts)?;
        self.svc
            .kill(&o, &a.sandbox_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("sandbox {} killed", a.sandbox_id))
    }

    #[tool(description = "Set how many more seconds a sandbox lives.")]
    async fn sandbox_set_timeout(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<TimeoutArgs>,
    ) -> Result<String, String> {
        let o = owner(&parts)?;
        self.svc
            .set_timeout(&o, &a.sandbox_id, Duration::from_secs(a.timeout_s))
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "sandbox {} now ends in {} s",
            a.sandbox_id, a.timeout_s
        ))
    }

    #[tool(
        description = "Run a bash command in a sandbox and return its stdout, stderr and exit \
                       code. Killed after timeout_s (default 60) or when the call is cancelled. \
                       With background: true it is left running and its pid returned."
    )]
    async fn run_command(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<CommandArgs>,
    ) -> Result<Json<CommandResult>, String> {
        let s = self.sandbox(&parts, &a.sandbox_id)?;
        let cfg = ProcConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), a.command],
            envs: a.env.unwrap_or_default(),
            cwd: a.cwd.map(|c| absolute(&c)),
            pty: None,
        };
        if a.background {
            let (proc, _) = s
                .conn
                .spawn(cfg, false, None)
                .await
                .map_err(|f| format!("starting it: {}", f.message))?;
            return Ok(Json(CommandResult {
                stdout: String::new(),
                stderr: String::new(),
                exit_code: 0,
                timed_out: false,
                pid: Some(proc.pid),
            }));
        }
        let out = run(&s, cfg, a.timeout_s, &ctx).await?;
        Ok(Json(out))
    }

    #[tool(
        description = "Run code (Python by default; bash or javascript with language) in a \
                       sandbox (a new one when sandbox_id is not given; its id is in the result) \
                       and return what it printed and its exit code."
    )]
    async fn run_code(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<CodeArgs>,
    ) -> Result<Json<CodeResult>, String> {
        let (cmd, flag) = match a.language.as_deref().unwrap_or("python") {
            "python" | "python3" | "py" => ("python3", "-c"),
            "bash" | "sh" | "shell" => ("bash", "-c"),
            "javascript" | "js" | "node" => ("node", "-e"),
            other => {
                return Err(format!(
                    "language `{other}` is not offered: use python, bash or javascript"
                ))
            }
        };
        let s = match &a.sandbox_id {
            Some(id) => self.sandbox(&parts, id)?,
            None => {
                self.create(&parts, "code-interpreter".into(), None, BTreeMap::new())
                    .await?
            }
        };
        let cfg = ProcConfig {
            cmd: "/usr/bin/env".into(),
            args: vec![cmd.into(), flag.into(), a.code],
            envs: BTreeMap::new(),
            cwd: None,
            pty: None,
        };
        let r = run(&s, cfg, a.timeout_s, &ctx).await?;
        Ok(Json(CodeResult {
            sandbox_id: s.id.clone(),
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
            timed_out: r.timed_out,
        }))
    }

    #[tool(description = "Kill a process in a sandbox (one started in the background).")]
    async fn kill_process(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<KillArgs>,
    ) -> Result<String, String> {
        let s = self.sandbox(&parts, &a.sandbox_id)?;
        s.conn
            .call(&AgentRequest::Signal {
                pid: a.pid,
                signal: SIGKILL,
            })
            .await
            .map_err(|f| format!("process {}: {}", a.pid, f.message))?;
        Ok(format!("process {} killed", a.pid))
    }

    #[tool(description = "Read a text file from a sandbox.")]
    async fn read_file(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<FileArgs>,
    ) -> Result<Json<FileText>, String> {
        let s = self.sandbox(&parts, &a.sandbox_id)?;
        let path = absolute(&a.path);
        let (_, mut chunks) = s
            .conn
            .read_file(&path)
            .await
            .map_err(|f| format!("{path}: {}", f.message))?;
        let mut bytes = Vec::new();
        while let Some(c) = chunks.recv().await {
            let c = c.map_err(|f| format!("{path}: {}", f.message))?;
            if bytes.len() + c.len() > MAX_OUTPUT {
                return Err(format!(
                    "{path} is larger than 1 MiB: read a part with run_command (head, tail, sed)"
                ));
            }
            bytes.extend_from_slice(&c);
        }
        Ok(Json(FileText {
            path,
            content: String::from_utf8_lossy(&bytes).into_owned(),
        }))
    }

    #[tool(description = "Write a text file in a sandbox (its folders are made).")]
    async fn write_file(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<WriteArgs>,
    ) -> Result<Json<FileEntry>, String> {
        let s = self.sandbox(&parts, &a.sandbox_id)?;
        let path = absolute(&a.path);
        let body = futures::stream::iter([Ok::<_, String>(bytes::Bytes::from(a.content))]);
        let e = s
            .conn
            .write_file(&path, body)
            .await
            .map_err(|f| format!("{path}: {}", f.message))?;
        Ok(Json(entry(e)))
    }

    #[tool(description = "List a folder of a sandbox, to a depth (default 1).")]
    async fn list_files(
        &self,
        Extension(parts): Extension<http::request::Parts>,
        Parameters(a): Parameters<ListArgs>,
    ) -> Result<Json<Listing>, String> {
        let s = self.sandbox(&parts, &a.sandbox_id)?;
        let path = absolute(a.path.as_deref().unwrap_or("/home/user"));
        let v = s
            .conn
            .call(&AgentRequest::ListDir {
                path: path.clone(),
                depth: a.depth.unwrap_or(1).clamp(1, 16),
            })
            .await
            .map_err(|f| format!("{path}: {}", f.message))?;
        let entries: Vec<Entry> = serde_json::from_value(v).map_err(|e| format!("{path}: {e}"))?;
        let mut entries: Vec<FileEntry> = entries.into_iter().map(entry).collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Json(Listing { entries }))
    }
}

fn entry(e: Entry) -> FileEntry {
    FileEntry {
        path: e.path,
        kind: e.kind,
        size: e.size,
    }
}

fn created(s: &Sandbox) -> Created {
    Created {
        sandbox_id: s.id.clone(),
        template: s.template.name.clone(),
        end_at_unix_s: s
            .end_at()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// Runs a process to its end (or its timeout, or the call's cancellation: then it is killed).
async fn run(
    s: &Sandbox,
    cfg: ProcConfig,
    timeout_s: Option<u64>,
    ctx: &RequestContext<RoleServer>,
) -> Result<CommandResult, String> {
    let timeout = Duration::from_secs(timeout_s.unwrap_or(60).clamp(1, MAX_TIMEOUT_S));
    let (proc, mut events) = s
        .conn
        .spawn(cfg, false, None)
        .await
        .map_err(|f| format!("starting it: {}", f.message))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut timed_out = false;
    // With a progress token, a running command reports each second: seconds elapsed (of its
    // timeout) and the output so far, so hosts show it alive and do not time the call out.
    let token = ctx.meta.get_progress_token();
    let mut tick = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tick.tick(), if token.is_some() => {
                if let Some(t) = &token {
                    let secs = started.elapsed().as_secs_f64().round();
                    let note = ProgressNotificationParam::new(t.clone(), secs)
                        .with_total(timeout.as_secs_f64())
                        .with_message(format!(
                            "running for {secs} s; {} bytes of output so far",
                            out.len() + err.len()
                        ));
                    let _ = ctx.peer.notify_progress(note).await;
                }
                continue;
            }
            () = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                kill(s, proc.pid).await;
                continue;
            }
            () = ctx.ct.cancelled() => {
                kill(s, proc.pid).await;
                return Err("cancelled: the process was killed".into());
            }
        };
        match ev {
            Some(ProcEvent::Stdout(b)) if out.len() <= MAX_OUTPUT => out.extend_from_slice(&b),
            Some(ProcEvent::Stderr(b)) if err.len() <= MAX_OUTPUT => err.extend_from_slice(&b),
            Some(ProcEvent::End(exit)) => {
                return Ok(CommandResult {
                    stdout: clip(out),
                    stderr: clip(err),
                    exit_code: exit.exit_code,
                    timed_out,
                    pid: None,
                })
            }
            Some(_) => {}
            None => return Err("the sandbox ended while the command ran".into()),
        }
    }
}

async fn kill(s: &Sandbox, pid: u32) {
    let _ = s
        .conn
        .call(&AgentRequest::Signal {
            pid,
            signal: SIGKILL,
        })
        .await;
}

/// The signal that ends a command past its timeout or cancelled.
const SIGKILL: i32 = 9;

/// `/mcp` for `svc` (and the model API at `models`, the server's own base URL, when it serves
/// models; the conformance suite's fixtures too with `fixtures`): each request is authenticated
/// with `auth` (the server's API keys) and must come from the same origin when a browser sends
/// it.
pub fn router(
    svc: Arc<SandboxService>,
    auth: Authenticate,
    models: Option<String>,
    fixtures: bool,
) -> Router {
    let mcp = LastmileMcp::new(svc, models, fixtures);
    // The server's own guard checks `Host` on loopback listeners; keys guard the rest.
    let config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    let service = StreamableHttpService::new(
        move || Ok(mcp.session()),
        LocalSessionManager::default().into(),
        config,
    );
    Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let auth = auth.clone();
                async move { authenticate(auth, req, next).await }
            },
        ))
}

/// The caller's key (or an open server's `-`) into the request, or 401; a cross-origin browser
/// request is 403 (MCP's DNS-rebinding rule).
async fn authenticate(auth: Authenticate, mut req: Request, next: Next) -> Response {
    if let Some(bad) = foreign_origin(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(
                serde_json::json!({"error": format!("origin {bad} may not use this server")}),
            ),
        )
            .into_response();
    }
    match auth(req.headers()) {
        Ok(o) => {
            req.extensions_mut().insert(Owner(o));
            next.run(req).await
        }
        Err((status, message)) => {
            let mut r = (status, axum::Json(serde_json::json!({"error": message}))).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

/// An `Origin` whose host is not the request's `Host` (a web page elsewhere), if any.
fn foreign_origin(h: &HeaderMap) -> Option<String> {
    let origin = h.get(header::ORIGIN)?.to_str().ok()?;
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let authority = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    (authority != host).then(|| origin.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_same_origin_browsers_pass() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(foreign_origin(&h), None, "no Origin: not a browser");
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert_eq!(foreign_origin(&h), None);
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert_eq!(foreign_origin(&h).as_deref(), Some("http://evil.example"));
    }

    #[test]
    fn relative_paths_are_under_home() {
        assert_eq!(absolute("a/b.txt"), "/home/user/a/b.txt");
        assert_eq!(absolute("/etc/hosts"), "/etc/hosts");
    }
}
