//! The host's end of one sandbox's agent: requests out, replies and process output in, over
//! the agent's stdin and stdout ([`crate::wire`] frames).
//!
//! One reader task owns the incoming side: it answers each pending request and fans a
//! process's output out to whoever follows it (the `Start` stream, `Connect` streams). It
//! waits on a slow follower rather than dropping output, so a client that reads slowly slows
//! only its own sandbox's output (as a terminal would), never the server; a follower that
//! went away is dropped. A process's start is registered before any of its output is read,
//! so nothing is lost between the two.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::wire::{Entry, Exit, Failure, Frame, Kind, Reply, Request, WatchEvent, CHUNK};

/// What a follower of a process receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// Bytes on stdout.
    Stdout(Bytes),
    /// Bytes on stderr.
    Stderr(Bytes),
    /// The process ended (the last event).
    End(Exit),
}

/// How a process was started.
#[derive(Clone, Debug)]
pub struct ProcConfig {
    /// The program.
    pub cmd: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its extra environment.
    pub envs: BTreeMap<String, String>,
    /// Its working directory.
    pub cwd: Option<String>,
    /// A terminal of this size (`[cols, rows]`) to run on, if any.
    pub pty: Option<[u16; 2]>,
}

/// A process running in the sandbox.
#[derive(Debug)]
pub struct Proc {
    /// Its pid inside the sandbox.
    pub pid: u32,
    /// How it was started.
    pub config: ProcConfig,
    /// The client's tag for it.
    pub tag: Option<String>,
    followers: Mutex<Vec<mpsc::Sender<ProcEvent>>>,
}

/// Followers' queue depth: output chunks in flight before the agent is made to wait.
const FOLLOW_DEPTH: usize = 64;

impl Proc {
    /// A new follower from now on.
    pub fn follow(&self) -> mpsc::Receiver<ProcEvent> {
        let (tx, rx) = mpsc::channel(FOLLOW_DEPTH);
        lock(&self.followers).push(tx);
        rx
    }
}

/// The answer to a spawn: the process and a follower registered before any of its output.
pub type Spawned = (Arc<Proc>, mpsc::Receiver<ProcEvent>);

enum Pending {
    /// A plain request.
    Call(oneshot::Sender<Reply>),
    /// A spawn: the reader registers the process on the reply.
    Spawn(
        ProcConfig,
        Option<String>,
        oneshot::Sender<Result<Spawned, Failure>>,
    ),
    /// A file read: the reply, then chunks, then an empty chunk.
    Read(
        mpsc::Sender<Result<Bytes, Failure>>,
        Option<oneshot::Sender<Reply>>,
    ),
    /// A folder watch: the reply, then events until it is removed.
    Watch(mpsc::Sender<WatchEvent>, Option<oneshot::Sender<Reply>>),
}

/// Events of one watch queued for its reader; past this they are dropped (a watcher that
/// does not read must not stall the sandbox).
const WATCH_DEPTH: usize = 4096;

struct Shared {
    pending: Mutex<HashMap<u32, Pending>>,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    closed: AtomicBool,
}

/// The connection.
pub struct AgentConn {
    out: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The failure every request gets once the agent is gone.
pub fn gone() -> Failure {
    Failure {
        code: "unavailable".into(),
        message: "the sandbox is not running".into(),
    }
}

impl AgentConn {
    /// Starts the reader and writer tasks over the agent's pipes.
    pub fn start(
        input: impl AsyncWrite + Unpin + Send + 'static,
        output: impl AsyncRead + Unpin + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            procs: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let mut input = input;
        tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                if input.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let mut output = output;
            if let Err(e) = read_loop(&mut output, &s).await {
                tracing::debug!("sandbox agent stream ended: {e}");
            }
            s.closed.store(true, Ordering::SeqCst);
            // Every waiter learns the sandbox is gone; every follower's stream ends.
            lock(&s.pending).clear();
            lock(&s.procs).clear();
        });
        Self {
            out: tx,
            shared,
            next_id: AtomicU32::new(1),
        }
    }

    /// Whether the agent is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    fn id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn send(&self, frame: Frame) -> Result<(), Failure> {
        if self.is_closed() {
            return Err(gone());
        }
        self.out.send(frame.encode()).await.map_err(|_| gone())
    }

    /// One request and its reply.
    pub async fn call(&self, req: &Request) -> Result<serde_json::Value, Failure> {
        let id = self.id();
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, Pending::Call(tx));
        self.send(Frame::json(Kind::Request, id, req)).await?;
        match rx.await.map_err(|_| gone())? {
            Reply::Ok(v) => Ok(v),
            Reply::Err(f) => Err(f),
        }
    }

    /// Starts a process; its follower sees every byte it writes.
    pub async fn spawn(
        &self,
        config: ProcConfig,
        stdin: bool,
        tag: Option<String>,
    ) -> Result<Spawned, Failure> {
        let id = self.id();
        let (tx, rx) = oneshot::channel();
        let req = Request::Spawn {
            cmd: config.cmd.clone(),
            args: config.args.clone(),
            envs: config.envs.clone(),
            cwd: config.cwd.clone(),
            stdin,
            pty: config.pty,
        };
        lock(&self.shared.pending).insert(id, Pending::Spawn(config, tag, tx));
        self.send(Frame::json(Kind::Request, id, &req)).await?;
        rx.await.map_err(|_| gone())?
    }

    /// A running process by pid.
    pub fn process(&self, pid: u32) -> Option<Arc<Proc>> {
        lock(&self.shared.procs).get(&pid).cloned()
    }

    /// A running process by tag.
    pub fn process_by_tag(&self, tag: &str) -> Option<Arc<Proc>> {
        lock(&self.shared.procs)
            .values()
            .find(|p| p.tag.as_deref() == Some(tag))
            .cloned()
    }

    /// Every running process.
    pub fn processes(&self) -> Vec<Arc<Proc>> {
        let mut v: Vec<_> = lock(&self.shared.procs).values().cloned().collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// Bytes for a process's stdin.
    pub async fn stdin(&self, pid: u32, data: Bytes) -> Result<(), Failure> {
        for chunk in data.chunks(CHUNK) {
            self.send(Frame {
                kind: Kind::Stdin,
                id: pid,
                payload: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Reads a file: its entry, then its bytes as they come (an empty chunk never appears).
    pub async fn read_file(
        &self,
        path: &str,
    ) -> Result<(Entry, mpsc::Receiver<Result<Bytes, Failure>>), Failure> {
        let id = self.id();
        let (chunks_tx, chunks_rx) = mpsc::channel(8);
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, Pending::Read(chunks_tx, Some(reply_tx)));
        let req = Request::ReadFile { path: path.into() };
        self.send(Frame::json(Kind::Request, id, &req)).await?;
        match reply_rx.await.map_err(|_| gone())? {
            Reply::Ok(v) => {
                let entry = serde_json::from_value(v).map_err(|e| Failure {
                    code: "internal".into(),
                    message: e.to_string(),
                })?;
                Ok((entry, chunks_rx))
            }
            Reply::Err(f) => {
                lock(&self.shared.pending).remove(&id);
                Err(f)
            }
        }
    }

    /// Watches a folder; returns the watch's id (for [`AgentConn::unwatch`]) and its events.
    pub async fn watch(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<(u32, mpsc::Receiver<WatchEvent>), Failure> {
        let id = self.id();
        let (events_tx, events_rx) = mpsc::channel(WATCH_DEPTH);
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, Pending::Watch(events_tx, Some(reply_tx)));
        let req = Request::Watch {
            path: path.into(),
            recursive,
        };
        self.send(Frame::json(Kind::Request, id, &req)).await?;
        match reply_rx.await.map_err(|_| gone())? {
            Reply::Ok(_) => Ok((id, events_rx)),
            Reply::Err(f) => {
                lock(&self.shared.pending).remove(&id);
                Err(f)
            }
        }
    }

    /// Stops a watch.
    pub async fn unwatch(&self, watch: u32) -> Result<(), Failure> {
        lock(&self.shared.pending).remove(&watch);
        self.call(&Request::Unwatch { watch }).await.map(|_| ())
    }

    /// Writes a file from `body`, streamed in chunks; answers its entry.
    pub async fn write_file<S, E>(&self, path: &str, mut body: S) -> Result<Entry, Failure>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures::StreamExt;
        let id = self.id();
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, Pending::Call(tx));
        self.send(Frame::json(
            Kind::Request,
            id,
            &Request::WriteFile { path: path.into() },
        ))
        .await?;
        let mut failed = None;
        while let Some(item) = body.next().await {
            match item {
                Ok(bytes) => {
                    for chunk in bytes.chunks(CHUNK) {
                        self.send(Frame {
                            kind: Kind::FileData,
                            id,
                            payload: chunk.to_vec(),
                        })
                        .await?;
                    }
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        self.send(Frame {
            kind: Kind::FileData,
            id,
            payload: Vec::new(),
        })
        .await?;
        let reply = rx.await.map_err(|_| gone())?;
        if let Some(msg) = failed {
            // A cut upload leaves no half-written file behind.
            let _ = self.call(&Request::Remove { path: path.into() }).await;
            return Err(Failure {
                code: "canceled".into(),
                message: format!("upload interrupted: {msg}"),
            });
        }
        match reply {
            Reply::Ok(v) => serde_json::from_value(v).map_err(|e| Failure {
                code: "internal".into(),
                message: e.to_string(),
            }),
            Reply::Err(f) => Err(f),
        }
    }
}

async fn read_loop(output: &mut (impl AsyncRead + Unpin), s: &Shared) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; 9];
        match output.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (kind, id, n) = Frame::parse_header(&h)?;
        let mut payload = vec![0u8; n];
        output.read_exact(&mut payload).await?;
        let frame = Frame { kind, id, payload };
        match kind {
            Kind::Reply => on_reply(s, frame)?,
            Kind::Stdout | Kind::Stderr => {
                let proc = lock(&s.procs).get(&id).cloned();
                if let Some(p) = proc {
                    let bytes = Bytes::from(frame.payload);
                    let ev = if kind == Kind::Stdout {
                        ProcEvent::Stdout(bytes)
                    } else {
                        ProcEvent::Stderr(bytes)
                    };
                    deliver(&p, ev).await;
                }
            }
            Kind::Exited => {
                let exit: Exit = frame.parse()?;
                let proc = lock(&s.procs).remove(&id);
                if let Some(p) = proc {
                    deliver(&p, ProcEvent::End(exit)).await;
                    lock(&p.followers).clear();
                }
            }
            Kind::FileChunk => {
                let tx = match lock(&s.pending).get(&id) {
                    Some(Pending::Read(tx, _)) => Some(tx.clone()),
                    _ => None,
                };
                if frame.payload.is_empty() {
                    lock(&s.pending).remove(&id);
                } else if let Some(tx) = tx {
                    if tx.send(Ok(Bytes::from(frame.payload))).await.is_err() {
                        // The reader went away; later chunks of this file are dropped.
                        lock(&s.pending).remove(&id);
                    }
                }
            }
            Kind::WatchEvent => {
                let event: WatchEvent = frame.parse()?;
                if let Some(Pending::Watch(tx, _)) = lock(&s.pending).get(&id) {
                    let _ = tx.try_send(event);
                }
            }
            Kind::Request | Kind::Stdin | Kind::FileData => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the agent sent a host-side frame",
                ))
            }
        }
    }
}

fn on_reply(s: &Shared, frame: Frame) -> std::io::Result<()> {
    let reply: Reply = frame.parse()?;
    let mut pending = lock(&s.pending);
    match pending.remove(&frame.id) {
        Some(Pending::Call(tx)) => {
            let _ = tx.send(reply);
        }
        Some(Pending::Read(chunks, Some(tx))) => {
            if matches!(reply, Reply::Ok(_)) {
                pending.insert(frame.id, Pending::Read(chunks, None));
            }
            let _ = tx.send(reply);
        }
        Some(Pending::Spawn(config, tag, tx)) => {
            drop(pending);
            let result = match reply {
                Reply::Ok(v) => match v.get("pid").and_then(|p| p.as_u64()) {
                    Some(pid) => {
                        let pid = pid as u32;
                        let proc = Arc::new(Proc {
                            pid,
                            config,
                            tag,
                            followers: Mutex::new(Vec::new()),
                        });
                        let rx = proc.follow();
                        lock(&s.procs).insert(pid, proc.clone());
                        Ok((proc, rx))
                    }
                    None => Err(Failure {
                        code: "internal".into(),
                        message: "the agent answered a start without a pid".into(),
                    }),
                },
                Reply::Err(f) => Err(f),
            };
            let _ = tx.send(result);
        }
        Some(Pending::Watch(events, Some(tx))) => {
            if matches!(reply, Reply::Ok(_)) {
                pending.insert(frame.id, Pending::Watch(events, None));
            }
            let _ = tx.send(reply);
        }
        Some(other @ (Pending::Read(_, None) | Pending::Watch(_, None))) => {
            pending.insert(frame.id, other);
        }
        None => {}
    }
    Ok(())
}

/// Sends `ev` to every follower, waiting on slow ones and dropping departed ones.
async fn deliver(p: &Proc, ev: ProcEvent) {
    let followers: Vec<_> = lock(&p.followers).clone();
    let mut gone_any = false;
    for f in &followers {
        if f.send(ev.clone()).await.is_err() {
            gone_any = true;
        }
    }
    if gone_any {
        lock(&p.followers).retain(|f| !f.is_closed());
    }
}
