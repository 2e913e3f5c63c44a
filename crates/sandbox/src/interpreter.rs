//! The code interpreter without Jupyter: a context is one long-lived Python process in the
//! sandbox running [`DRIVER`], which executes cells in one namespace (state persists across
//! cells), evaluates a final expression as the cell's result, and reports output, results and
//! errors as JSON lines on a private descriptor (the process's stdout; the cell's own raw
//! writes to fd 1 go to stderr). Cells of one context run one at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::conn::{AgentConn, ProcConfig, ProcEvent};
use crate::wire::Failure;

/// The Python side of a context. Requests are JSON lines on stdin: `{"code", "env"}`.
pub const DRIVER: &str = r#"
import ast, io, json, os, sys, traceback
_proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
def _emit(o):
    _proto.write(json.dumps(o) + "\n")
    _proto.flush()
class _Out(io.TextIOBase):
    def __init__(self, kind):
        self.kind = kind
        self.buf = ""
    def writable(self):
        return True
    def write(self, t):
        self.buf += t
        nl = self.buf.rfind("\n")
        if nl >= 0 or len(self.buf) > 65536:
            cut = nl + 1 if nl >= 0 else len(self.buf)
            _emit({"type": self.kind, "text": self.buf[:cut]})
            self.buf = self.buf[cut:]
        return len(t)
    def flush(self):
        if self.buf:
            _emit({"type": self.kind, "text": self.buf})
            self.buf = ""
sys.stdout = _Out("stdout")
sys.stderr = _Out("stderr")
_g = {"__name__": "__main__", "__builtins__": __builtins__}
_n = 0
def _formats(v):
    out = {"text": repr(v)}
    for attr, key in (("_repr_html_", "html"), ("_repr_markdown_", "markdown"), ("_repr_svg_", "svg"), ("_repr_png_", "png"), ("_repr_latex_", "latex"), ("_repr_json_", "json")):
        f = getattr(v, attr, None)
        if callable(f):
            try:
                r = f()
                if r is not None:
                    out[key] = r
            except Exception:
                pass
    return out
for _line in sys.__stdin__:
    try:
        _req = json.loads(_line)
    except ValueError:
        continue
    _n += 1
    _emit({"type": "number_of_executions", "execution_count": _n})
    _saved = {}
    for _k, _v in (_req.get("env") or {}).items():
        _saved[_k] = os.environ.get(_k)
        os.environ[_k] = _v
    try:
        _tree = ast.parse(_req.get("code", ""), "<cell>", "exec")
        _last = None
        if _tree.body and isinstance(_tree.body[-1], ast.Expr):
            _last = ast.Expression(_tree.body.pop().value)
        exec(compile(_tree, "<cell>", "exec"), _g)
        if _last is not None:
            _v = eval(compile(_last, "<cell>", "eval"), _g)
            if _v is not None:
                _r = _formats(_v)
                _r["type"] = "result"
                _r["is_main_result"] = True
                _emit(_r)
    except BaseException as _e:
        _emit({"type": "error", "name": type(_e).__name__, "value": str(_e), "traceback": traceback.format_exc()})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for _k, _v in _saved.items():
            if _v is None:
                os.environ.pop(_k, None)
            else:
                os.environ[_k] = _v
    _emit({"type": "end"})
"#;

/// One context.
pub struct Context {
    /// Its id.
    pub id: String,
    /// Its language (`python`).
    pub language: String,
    /// Its working directory.
    pub cwd: String,
    /// The process running it.
    pub pid: u32,
    /// Held while a cell runs (one cell at a time).
    pub cell: tokio::sync::Mutex<()>,
    /// Where the process's output goes: the running cell, or nowhere between cells (a thread
    /// a cell left printing must never stall the sandbox's other traffic).
    sink: Arc<Mutex<Option<mpsc::Sender<ProcEvent>>>>,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl Context {
    /// Starts receiving the process's output for one cell (until [`Context::detach`]); `None`
    /// when the process has already ended.
    pub fn attach(&self) -> Option<mpsc::Receiver<ProcEvent>> {
        let (tx, rx) = mpsc::channel(64);
        *lock(&self.sink) = Some(tx);
        if self.dead.load(std::sync::atomic::Ordering::SeqCst) {
            *lock(&self.sink) = None;
            return None;
        }
        Some(rx)
    }

    /// Output goes nowhere again.
    pub fn detach(&self) {
        *lock(&self.sink) = None;
    }
}

/// Moves a context process's output to the cell that is running, and drops it between cells.
async fn forward(
    mut rx: mpsc::Receiver<ProcEvent>,
    sink: Arc<Mutex<Option<mpsc::Sender<ProcEvent>>>>,
    dead: Arc<std::sync::atomic::AtomicBool>,
) {
    while let Some(ev) = rx.recv().await {
        let end = matches!(ev, ProcEvent::End(_));
        let tx = lock(&sink).clone();
        if let Some(tx) = tx {
            let _ = tx.send(ev).await;
        }
        if end {
            break;
        }
    }
    dead.store(true, std::sync::atomic::Ordering::SeqCst);
    // A cell waiting now learns the process is gone (its channel closes).
    lock(&sink).take();
}

/// A sandbox's contexts.
#[derive(Default)]
pub struct Contexts {
    map: Mutex<HashMap<String, Arc<Context>>>,
    defaults: Mutex<HashMap<String, String>>,
    creating: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Languages a context can run.
pub fn supported(language: &str) -> bool {
    matches!(language, "python" | "python3" | "")
}

impl Contexts {
    /// Starts a new context.
    pub async fn create(
        &self,
        conn: &AgentConn,
        language: &str,
        cwd: Option<&str>,
        id: Option<String>,
    ) -> Result<Arc<Context>, Failure> {
        if !supported(language) {
            return Err(Failure {
                code: "invalid_argument".into(),
                message: format!("language `{language}` is not supported here (python is)"),
            });
        }
        let cwd = cwd.unwrap_or(crate::backend::bwrap::HOME).to_string();
        let config = ProcConfig {
            cmd: "/usr/bin/python3".into(),
            args: vec!["-u".into(), "-c".into(), DRIVER.into()],
            envs: Default::default(),
            cwd: Some(cwd.clone()),
            pty: None,
        };
        let id = id.unwrap_or_else(|| format!("ctx-{}", &crate::service::new_token()[..16]));
        let (proc, rx) = conn
            .spawn(config, true, Some(format!("context:{id}")))
            .await?;
        let ctx = Arc::new(Context {
            id: id.clone(),
            language: "python".into(),
            cwd,
            pid: proc.pid,
            cell: tokio::sync::Mutex::new(()),
            sink: Arc::new(Mutex::new(None)),
            dead: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        });
        tokio::spawn(forward(rx, ctx.sink.clone(), ctx.dead.clone()));
        lock(&self.map).insert(id, ctx.clone());
        Ok(ctx)
    }

    /// The context for `language` used when a cell names none (made on first use).
    pub async fn default_for(
        &self,
        conn: &AgentConn,
        language: &str,
    ) -> Result<Arc<Context>, Failure> {
        let _creating = self.creating.lock().await;
        let lang = if language.is_empty() {
            "python"
        } else {
            language
        };
        let existing = lock(&self.defaults)
            .get(lang)
            .and_then(|id| lock(&self.map).get(id).cloned());
        if let Some(c) = existing {
            return Ok(c);
        }
        let ctx = self.create(conn, lang, None, None).await?;
        lock(&self.defaults).insert(lang.to_string(), ctx.id.clone());
        Ok(ctx)
    }

    /// A context by id.
    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        lock(&self.map).get(id).cloned()
    }

    /// Every context.
    pub fn list(&self) -> Vec<Arc<Context>> {
        let mut v: Vec<_> = lock(&self.map).values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Forgets a context (its process is killed by the caller).
    pub fn remove(&self, id: &str) -> Option<Arc<Context>> {
        lock(&self.map).remove(id)
    }
}
