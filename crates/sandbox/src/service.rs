//! The sandbox service: which sandboxes exist, whose they are, when they end. Creating one
//! launches its agent through the isolation backend; killing or expiring one ends its agent,
//! every process and its files (its writable file systems are tmpfs mounts of its own).
//!
//! Invariants: a sandbox is visible only to the owner that made it (another owner gets
//! `NotFound`, never `Forbidden`, so ids cannot be probed); an owner's live sandboxes, CPU and
//! memory never exceed [`KeyLimits`]; a sandbox past its end time is gone within one reaper
//! tick (100 ms).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::{Cgroup, IsolationBackend, LaunchSpec, Launched};
use crate::conn::{AgentConn, ProcConfig};
use crate::interpreter::Contexts;
use crate::metrics::Metrics;
use crate::template::Template;
use crate::SandboxError;

/// What one owner (API key) may hold at once.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyLimits {
    /// Live sandboxes.
    pub sandboxes: usize,
    /// CPU cores over its live sandboxes.
    pub cpus: f64,
    /// Memory over its live sandboxes, MiB.
    pub memory_mb: u64,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self {
            sandboxes: 20,
            cpus: 16.0,
            memory_mb: 16 * 1024,
        }
    }
}

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The templates clients may name.
    pub templates: Vec<Template>,
    /// The lifetime of a sandbox created without `timeout`.
    pub default_timeout: Duration,
    /// The longest lifetime a client may ask for.
    pub max_timeout: Duration,
    /// Per-owner limits.
    pub per_key: KeyLimits,
    /// Sandboxes on this server at once, all owners together.
    pub max_sandboxes: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            templates: crate::template::builtin(),
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            per_key: KeyLimits::default(),
            max_sandboxes: 1000,
        }
    }
}

impl ServiceConfig {
    /// Refuses inconsistent settings.
    pub fn validate(&self) -> Result<(), SandboxError> {
        for t in &self.templates {
            t.validate()?;
        }
        if self.templates.is_empty() {
            return Err(SandboxError::InvalidConfig("no sandbox templates".into()));
        }
        if self.default_timeout > self.max_timeout || self.default_timeout.is_zero() {
            return Err(SandboxError::InvalidConfig(
                "the default sandbox timeout must be positive and at most the maximum".into(),
            ));
        }
        Ok(())
    }
}

/// What a client asks for when creating a sandbox.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    /// Template id or alias.
    pub template: String,
    /// Lifetime; `None` = the default.
    pub timeout: Option<Duration>,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// Environment of every process.
    pub envs: BTreeMap<String, String>,
    /// Internet access behind these rules (`None`: no network but its own loopback);
    /// refused unless the server offers it.
    pub network: Option<crate::backend::egress::EgressRules>,
}

/// Metadata and environment caps: entries, key bytes, value bytes.
const MAX_ENTRIES: usize = 64;
const MAX_KEY: usize = 256;
const MAX_VALUE: usize = 4096;

/// One live sandbox.
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// Who made it (an API key id, or `-` on an open server).
    pub owner: String,
    /// What it runs.
    pub template: Template,
    /// The client's labels.
    pub metadata: BTreeMap<String, String>,
    /// When it started.
    pub started_at: SystemTime,
    /// The token data-plane calls must present (`X-Access-Token`).
    pub access_token: String,
    /// Its agent.
    pub conn: AgentConn,
    /// Code-interpreter contexts.
    pub contexts: Contexts,
    /// Folder watchers polled by id (`CreateWatcher`, `GetWatcherEvents`).
    pub watchers: Watchers,
    end: Mutex<(SystemTime, Instant)>,
    /// Its processes are stopped (paused), their memory kept.
    paused: std::sync::atomic::AtomicBool,
    child: Mutex<Option<tokio::process::Child>>,
    /// Host processes serving it (its network), ended with it.
    helpers: Mutex<Vec<std::process::Child>>,
    /// Its host folder, removed once it ended.
    scratch: Option<std::path::PathBuf>,
    /// Whether it has internet access.
    pub internet: bool,
    cgroup: Mutex<Option<Cgroup>>,
}

/// A watcher's agent watch id and its queued events.
pub type Watcher = (
    u32,
    Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<crate::wire::WatchEvent>>>,
);

/// A sandbox's watchers by id.
#[derive(Default)]
pub struct Watchers(Mutex<HashMap<String, Watcher>>);

impl Watchers {
    /// Keeps a new watcher; returns its id.
    pub fn add(
        &self,
        watch: u32,
        events: tokio::sync::mpsc::Receiver<crate::wire::WatchEvent>,
    ) -> String {
        let id = format!("w-{}", &new_token()[..16]);
        lock(&self.0).insert(
            id.clone(),
            (watch, Arc::new(tokio::sync::Mutex::new(events))),
        );
        id
    }

    /// A watcher by id.
    pub fn get(&self, id: &str) -> Option<Watcher> {
        lock(&self.0).get(id).cloned()
    }

    /// Forgets a watcher.
    pub fn remove(&self, id: &str) -> Option<Watcher> {
        lock(&self.0).remove(id)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sandbox {
    /// When it ends (wall clock).
    pub fn end_at(&self) -> SystemTime {
        lock(&self.end).0
    }

    fn expired(&self, now: Instant) -> bool {
        lock(&self.end).1 <= now || self.conn.is_closed()
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// `running` or `paused`, as E2B names the states.
    pub fn state(&self) -> &'static str {
        if self.is_paused() {
            "paused"
        } else {
            "running"
        }
    }

    /// The host pid of the process that holds it.
    fn root_pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().and_then(|c| c.id())
    }

    fn set_timeout(&self, timeout: Duration) {
        *lock(&self.end) = (SystemTime::now() + timeout, Instant::now() + timeout);
    }

    /// Memory in use (tmpfs included), bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        lock(&self.cgroup).as_ref().and_then(|c| c.memory_bytes())
    }

    /// CPU time used, nanoseconds.
    pub fn cpu_ns(&self) -> Option<u64> {
        lock(&self.cgroup).as_ref().and_then(|c| c.cpu_ns())
    }

    /// Times the memory limit was hit.
    pub fn oom_events(&self) -> Option<u64> {
        lock(&self.cgroup).as_ref().and_then(|c| c.oom_events())
    }

    /// Ends it: the agent and every process, then the cgroups (waiting for the last exit).
    async fn end(&self) {
        let child = lock(&self.child).take();
        let scratch = self.scratch.clone();
        if let Some(mut c) = child {
            let _ = c.start_kill();
            tokio::spawn(async move {
                let _ = c.wait().await;
                if let Some(dir) = scratch {
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                }
            });
        }
        let helpers = std::mem::take(&mut *lock(&self.helpers));
        for mut h in helpers {
            let _ = h.kill();
            tokio::task::spawn_blocking(move || h.wait());
        }
        let cgroup = lock(&self.cgroup).take();
        if let Some(cg) = cgroup {
            let _ = tokio::task::spawn_blocking(move || drop(cg)).await;
        }
    }
}

/// The service.
pub struct SandboxService {
    backend: Arc<dyn IsolationBackend>,
    config: ServiceConfig,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// Counters and histograms.
    pub metrics: Metrics,
    created: AtomicU64,
    changes: tokio::sync::broadcast::Sender<Change>,
}

/// A sandbox's life changed: made, its timeout set, paused, resumed, killed or expired (what
/// MCP's resource subscriptions report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The sandbox.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// Whether it has ended (killed or expired).
    pub ended: bool,
}

impl SandboxService {
    /// A service over `backend`, with its expiry reaper running.
    pub fn start(
        backend: Arc<dyn IsolationBackend>,
        config: ServiceConfig,
    ) -> Result<Arc<Self>, SandboxError> {
        config.validate()?;
        tracing::info!("sandboxes: {}", backend.describe());
        let svc = Arc::new(Self {
            backend,
            config,
            sandboxes: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            created: AtomicU64::new(0),
            changes: tokio::sync::broadcast::channel(1024).0,
        });
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(svc) = weak.upgrade() else { return };
                svc.reap().await;
            }
        });
        Ok(svc)
    }

    /// Every change from now on, to every owner's sandboxes (a receiver that lags misses the
    /// oldest).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn changed(&self, s: &Sandbox, ended: bool) {
        let _ = self.changes.send(Change {
            id: s.id.clone(),
            owner: s.owner.clone(),
            ended,
        });
    }

    /// The backend's description.
    pub fn backend(&self) -> String {
        self.backend.describe()
    }

    /// The templates.
    pub fn templates(&self) -> &[Template] {
        &self.config.templates
    }

    async fn reap(&self) {
        let now = Instant::now();
        let expired: Vec<Arc<Sandbox>> = {
            let mut map = lock(&self.sandboxes);
            let ids: Vec<String> = map
                .values()
                .filter(|s| s.expired(now))
                .map(|s| s.id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for s in expired {
            tracing::info!("sandbox {} expired", s.id);
            self.metrics.expired.fetch_add(1, Ordering::Relaxed);
            s.end().await;
            self.changed(&s, true);
        }
    }

    /// Creates a sandbox for `owner`.
    pub async fn create(
        &self,
        owner: &str,
        req: CreateRequest,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let started = Instant::now();
        let template = self.template(&req.template)?;
        let timeout = req.timeout.unwrap_or(self.config.default_timeout);
        self.check_timeout(timeout)?;
        check_map("metadata", &req.metadata, |_| true)?;
        check_map("envVars", &req.envs, crate::backend::valid_env_name)?;
        let id = new_id();
        self.check_room(owner, &template)?;
        let launched = self.launch(&id, &template, &req).await?;
        let mut child = launched.child;
        let conn = connect_agent(launched.agent_socket, &mut child)?;
        let sandbox = Arc::new(Sandbox {
            id: id.clone(),
            owner: owner.to_string(),
            template: template.clone(),
            metadata: req.metadata,
            started_at: SystemTime::now(),
            access_token: new_token(),
            conn,
            contexts: Contexts::default(),
            watchers: Watchers::default(),
            end: Mutex::new((SystemTime::now() + timeout, Instant::now() + timeout)),
            paused: std::sync::atomic::AtomicBool::new(false),
            child: Mutex::new(Some(child)),
            helpers: Mutex::new(launched.helpers),
            scratch: launched.scratch,
            internet: req.network.is_some(),
            cgroup: Mutex::new(launched.cgroup),
        });
        if !self.admit(owner, &sandbox) {
            sandbox.end().await;
            return Err(SandboxError::Exhausted(
                "this key reached its live sandbox limit".into(),
            ));
        }
        if let Some(cmd) = &template.start_cmd {
            run_start_cmd(&sandbox, cmd).await;
        }
        self.created.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .create_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!("sandbox {id} created from `{}` for {owner}", template.name);
        self.changed(&sandbox, false);
        Ok(sandbox)
    }

    /// The configured template that answers to `name`, or `NotFound`.
    fn template(&self, name: &str) -> Result<Template, SandboxError> {
        self.config
            .templates
            .iter()
            .find(|t| t.answers_to(name))
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(format!("template `{name}` not found")))
    }

    /// Refuses a create when the server is full, or when `owner`'s live sandboxes plus one from
    /// `template` would pass its [`KeyLimits`]. Checked under the lock, so concurrent creates
    /// cannot overshoot.
    fn check_room(&self, owner: &str, template: &Template) -> Result<(), SandboxError> {
        let map = lock(&self.sandboxes);
        if map.len() >= self.config.max_sandboxes {
            return Err(SandboxError::Exhausted(format!(
                "this server holds its maximum of {} sandboxes",
                self.config.max_sandboxes
            )));
        }
        let mine: Vec<&Arc<Sandbox>> = map.values().filter(|s| s.owner == owner).collect();
        let lim = &self.config.per_key;
        let cpus: f64 = mine.iter().map(|s| s.template.cpus).sum::<f64>() + template.cpus;
        let mem: u64 = mine.iter().map(|s| s.template.memory_mb).sum::<u64>() + template.memory_mb;
        if mine.len() >= lim.sandboxes {
            return Err(SandboxError::Exhausted(format!(
                "this key already has {} live sandboxes (its limit)",
                mine.len()
            )));
        }
        if cpus > lim.cpus + 1e-9 || mem > lim.memory_mb {
            return Err(SandboxError::Exhausted(format!(
                "this key's sandboxes would use {cpus} CPUs and {mem} MiB, over its limit of \
                 {} CPUs and {} MiB",
                lim.cpus, lim.memory_mb
            )));
        }
        Ok(())
    }

    /// Launches sandbox `id` from `template` through the backend, on one of the threads that
    /// fork lastmile's children (they live as long as the process: a sandbox's parent-death
    /// signal follows the thread that forked it).
    async fn launch(
        &self,
        id: &str,
        template: &Template,
        req: &CreateRequest,
    ) -> Result<Launched, SandboxError> {
        let backend = self.backend.clone();
        let (t2, id2, envs) = (template.clone(), id.to_string(), req.envs.clone());
        let network = req.network.clone();
        lastmile_process::launch_async(move || {
            backend.launch(&LaunchSpec {
                id: &id2,
                template: &t2,
                envs: &envs,
                network: network.as_ref(),
            })
        })
        .await
        .ok_or_else(|| SandboxError::Unavailable("no thread to launch sandboxes on".into()))?
    }

    /// Adds `sandbox` to the map unless its owner or the server reached a limit while it was
    /// launching (another create of this owner may have finished meanwhile); false if it did not
    /// fit.
    fn admit(&self, owner: &str, sandbox: &Arc<Sandbox>) -> bool {
        let mut map = lock(&self.sandboxes);
        let mine = map.values().filter(|s| s.owner == owner).count();
        let over = mine >= self.config.per_key.sandboxes || map.len() >= self.config.max_sandboxes;
        if !over {
            map.insert(sandbox.id.clone(), sandbox.clone());
        }
        !over
    }

    /// `owner`'s sandbox `id`.
    pub fn get(&self, owner: &str, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        lock(&self.sandboxes)
            .get(id)
            .filter(|s| owner_matches(owner, &s.owner))
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// A sandbox by id alone, for the data plane (which checks the access token instead).
    pub fn by_id(&self, id: &str) -> Option<Arc<Sandbox>> {
        lock(&self.sandboxes).get(id).cloned()
    }

    /// `owner`'s sandboxes (every sandbox for the admin), oldest first.
    pub fn list(&self, owner: &str) -> Vec<Arc<Sandbox>> {
        let mut v: Vec<_> = lock(&self.sandboxes)
            .values()
            .filter(|s| owner_matches(owner, &s.owner))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Every sandbox (admin and metrics).
    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        self.list(ADMIN)
    }

    /// `timeout` within the maximum, or why not.
    fn check_timeout(&self, timeout: Duration) -> Result<(), SandboxError> {
        if timeout > self.config.max_timeout {
            return Err(SandboxError::InvalidArgument(format!(
                "timeout {} s is longer than the maximum {} s",
                timeout.as_secs(),
                self.config.max_timeout.as_secs()
            )));
        }
        Ok(())
    }

    /// Sets a sandbox's remaining lifetime.
    pub fn set_timeout(
        &self,
        owner: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<(), SandboxError> {
        self.check_timeout(timeout)?;
        let s = self.get(owner, id)?;
        s.set_timeout(timeout);
        self.changed(&s, false);
        Ok(())
    }

    /// Pauses `owner`'s sandbox `id`: every process in it stops where it is (memory kept, no
    /// CPU used), the data plane answers that it is paused, and its timeout stops running; it
    /// is killed only if it stays paused longer than the maximum timeout.
    pub async fn pause(&self, owner: &str, id: &str) -> Result<(), SandboxError> {
        let s = self.get(owner, id)?;
        if s.paused.swap(true, Ordering::AcqRel) {
            return Err(SandboxError::Conflict(format!(
                "sandbox `{id}` is already paused"
            )));
        }
        let root = s.root_pid().ok_or_else(|| not_found(id))?;
        let backend = self.backend.clone();
        let r = tokio::task::spawn_blocking(move || backend.pause(root))
            .await
            .map_err(|e| SandboxError::Unavailable(e.to_string()))?;
        if let Err(e) = r {
            // Whatever was stopped runs again: a half-paused sandbox would be neither.
            let backend = self.backend.clone();
            let _ = tokio::task::spawn_blocking(move || backend.resume(root)).await;
            s.paused.store(false, Ordering::Release);
            return Err(e);
        }
        s.set_timeout(self.config.max_timeout);
        self.metrics.paused.fetch_add(1, Ordering::Relaxed);
        tracing::info!("sandbox {id} paused");
        self.changed(&s, false);
        Ok(())
    }

    /// Resumes `owner`'s paused sandbox `id`, to live `timeout` more (default: the default
    /// timeout). `Ok(false)` if it was running (its timeout is then extended to `timeout` if
    /// that is later than its end).
    pub async fn resume(
        &self,
        owner: &str,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<bool, SandboxError> {
        let s = self.get(owner, id)?;
        let t = timeout.unwrap_or(self.config.default_timeout);
        self.check_timeout(t)?;
        if !s.is_paused() {
            if timeout.is_some() && SystemTime::now() + t > s.end_at() {
                s.set_timeout(t);
                self.changed(&s, false);
            }
            return Ok(false);
        }
        let root = s.root_pid().ok_or_else(|| not_found(id))?;
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.resume(root))
            .await
            .map_err(|e| SandboxError::Unavailable(e.to_string()))??;
        s.set_timeout(t);
        if !s.paused.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        self.metrics.resumed.fetch_add(1, Ordering::Relaxed);
        tracing::info!("sandbox {id} resumed");
        self.changed(&s, false);
        Ok(true)
    }

    /// Kills a sandbox.
    pub async fn kill(&self, owner: &str, id: &str) -> Result<(), SandboxError> {
        let s = {
            let mut map = lock(&self.sandboxes);
            match map.get(id) {
                Some(s) if owner_matches(owner, &s.owner) => map.remove(id),
                _ => None,
            }
        }
        .ok_or_else(|| not_found(id))?;
        s.end().await;
        self.changed(&s, true);
        self.metrics.killed.fetch_add(1, Ordering::Relaxed);
        tracing::info!("sandbox {id} killed");
        Ok(())
    }

    /// Kills every sandbox (at shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<_> = lock(&self.sandboxes).drain().map(|(_, s)| s).collect();
        for s in all {
            s.end().await;
        }
        let backend = self.backend.clone();
        let _ = tokio::task::spawn_blocking(move || backend.shutdown()).await;
    }
}

/// The owner name that sees every sandbox (the admin key).
pub const ADMIN: &str = "\u{0}admin";

/// Whether `caller` may see a sandbox of `owner` (its own, or any for the admin).
pub fn owner_matches(caller: &str, owner: &str) -> bool {
    caller == ADMIN || caller == owner
}

/// Starts the connection to a launched sandbox's agent: over its own socket when the backend
/// gave one, else over `child`'s stdin and stdout.
fn connect_agent(
    agent_socket: Option<std::os::unix::net::UnixStream>,
    child: &mut tokio::process::Child,
) -> Result<AgentConn, SandboxError> {
    match agent_socket {
        Some(sock) => {
            let sock = sock
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(sock))
                .map_err(|e| SandboxError::Unavailable(format!("the agent's socket: {e}")))?;
            let (read, write) = sock.into_split();
            Ok(AgentConn::start(write, read))
        }
        None => {
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(SandboxError::Unavailable(
                    "the sandbox agent has no pipes".into(),
                ));
            };
            Ok(AgentConn::start(stdin, stdout))
        }
    }
}

/// Runs a template's start command in `sandbox` (in the background, through a login shell);
/// a failure to start it is logged, not returned.
async fn run_start_cmd(sandbox: &Sandbox, cmd: &str) {
    let config = ProcConfig {
        cmd: "/bin/bash".into(),
        args: vec!["-l".into(), "-c".into(), cmd.to_string()],
        envs: BTreeMap::new(),
        cwd: None,
        pty: None,
    };
    if let Err(e) = sandbox
        .conn
        .spawn(config, false, Some("start".into()))
        .await
    {
        tracing::warn!(
            "sandbox {}: start command failed: {}",
            sandbox.id,
            e.message
        );
    }
}

fn not_found(id: &str) -> SandboxError {
    SandboxError::NotFound(format!("sandbox `{id}` not found"))
}

fn check_map(
    what: &str,
    m: &BTreeMap<String, String>,
    key_ok: impl Fn(&str) -> bool,
) -> Result<(), SandboxError> {
    if m.len() > MAX_ENTRIES {
        return Err(SandboxError::InvalidArgument(format!(
            "{what} has {} entries; at most {MAX_ENTRIES}",
            m.len()
        )));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_KEY || !key_ok(k) {
            return Err(SandboxError::InvalidArgument(format!(
                "{what} key `{}` is not allowed",
                k.chars().take(64).collect::<String>()
            )));
        }
        if v.len() > MAX_VALUE || v.contains('\0') {
            return Err(SandboxError::InvalidArgument(format!(
                "{what}[{k}] is longer than {MAX_VALUE} bytes or holds a NUL"
            )));
        }
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS random source does not fail on Linux after boot; fall back to the clock if it does.
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    b
}

/// A sandbox id: 20 characters of `[a-z0-9]`, as E2B's look.
fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    random_bytes::<20>()
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// An access token: 32 random bytes as hex.
pub(crate) fn new_token() -> String {
    random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_tokens_are_random_and_shaped() {
        let a = new_id();
        assert_eq!(a.len(), 20);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, new_id());
        assert_eq!(new_token().len(), 64);
    }

    #[test]
    fn maps_are_capped() {
        let mut m = BTreeMap::new();
        m.insert("GOOD_NAME".to_string(), "v".to_string());
        check_map("envVars", &m, crate::backend::valid_env_name).unwrap();
        m.insert("bad name".to_string(), "v".to_string());
        assert!(check_map("envVars", &m, crate::backend::valid_env_name).is_err());
        let big: BTreeMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(check_map("metadata", &big, |_| true).is_err());
        let long = BTreeMap::from([("k".to_string(), "x".repeat(5000))]);
        assert!(check_map("metadata", &long, |_| true).is_err());
    }

    #[test]
    fn the_admin_sees_all_and_owners_only_their_own() {
        assert!(owner_matches(ADMIN, "key_a"));
        assert!(owner_matches("key_a", "key_a"));
        assert!(!owner_matches("key_b", "key_a"));
    }
}
