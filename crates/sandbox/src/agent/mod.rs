//! The agent: the one lastmile process inside a sandbox (`lastmile sandbox-agent`, started by
//! the isolation backend as the sandbox's first process). It reads [`wire`] frames from its
//! stdin, starts processes and touches files as the host asks, and streams their output back
//! on its stdout. It sees exactly what the sandbox's code sees — the same namespaces, seccomp
//! filter, cgroup and user — so a path or a symlink can never reach further than the code it
//! serves could itself; the host never touches a sandbox's files directly.
//!
//! Plain threads and blocking I/O (no async runtime): a process gets a thread per output pipe
//! and one that waits for it; a file read gets a thread. When the host goes away (stdin ends)
//! the agent exits, and with it the sandbox's pid namespace.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::wire::{Entry, Exit, Failure, Frame, Kind, Reply, Request, WatchEvent, CHUNK};

mod guest;

/// Most entries one `ListDir` answers (the rest is refused, not truncated silently).
const MAX_LIST: usize = 50_000;
/// How long a process's output may trail its exit (a background child holding the pipe).
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Frames to the host, one writer at a time.
#[derive(Clone)]
struct Outbox(Arc<Mutex<Box<dyn Write + Send>>>);

impl Outbox {
    fn send(&self, frame: &Frame) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // The host gone means the sandbox is ending; nothing to do about a failed write.
        let _ = frame.write_to(&mut *out);
    }

    fn reply(&self, id: u32, reply: Result<serde_json::Value, Failure>) {
        let r = match reply {
            Ok(v) => Reply::Ok(v),
            Err(f) => Reply::Err(f),
        };
        self.send(&Frame::json(Kind::Reply, id, &r));
    }
}

/// Runs the agent until the host closes its stdin; returns the exit code.
pub fn run() -> i32 {
    serve(io::stdin().lock(), Box::new(io::stdout()))
}

/// The vsock port the agent of a microVM listens on.
pub const VSOCK_PORT: u32 = 1024;

/// Runs the agent of a microVM: with `init` (it is the guest's first process), mounts the
/// guest's file systems and leaves a reaper as pid 1 first; then serves the host's connections
/// on vsock `port`, one at a time (a host that reconnects finds the same processes).
pub fn run_vsock(port: u32, init: bool) -> i32 {
    if init {
        if let Err(e) = guest::init() {
            eprintln!("lastmile sandbox agent: preparing the guest: {e}");
            return 1;
        }
    }
    let listener = match guest::vsock_listen(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lastmile sandbox agent: vsock port {port}: {e}");
            return 1;
        }
    };
    loop {
        match guest::accept(&listener) {
            Ok(conn) => {
                let Ok(reader) = conn.try_clone() else {
                    continue;
                };
                serve(reader, Box::new(conn));
            }
            Err(e) => {
                eprintln!("lastmile sandbox agent: accepting: {e}");
                return 1;
            }
        }
    }
}

/// Serves the host's frames from `input` until it ends, answering on `output`.
fn serve(mut input: impl Read, output: Box<dyn Write + Send>) -> i32 {
    let out = Outbox(Arc::new(Mutex::new(output)));
    let mut state = State::default();
    let users = Users::load();
    loop {
        let frame = match Frame::read_from(&mut input) {
            Ok(Some(f)) => f,
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("lastmile sandbox agent: {e}");
                return 1;
            }
        };
        match frame.kind {
            Kind::Request => match frame.parse::<Request>() {
                Ok(req) => handle(req, frame.id, &out, &mut state, &users),
                Err(e) => out.reply(
                    frame.id,
                    Err(Failure {
                        code: "invalid_argument".into(),
                        message: e.to_string(),
                    }),
                ),
            },
            Kind::Stdin => {
                if let Some(tx) = state.stdins.get(&frame.id) {
                    if tx.send(frame.payload).is_err() {
                        state.stdins.remove(&frame.id);
                    }
                }
            }
            Kind::FileData => {
                let done = frame.payload.is_empty();
                if let Some(up) = state.uploads.get_mut(&frame.id) {
                    up.write(&frame.payload);
                }
                if done {
                    if let Some(up) = state.uploads.remove(&frame.id) {
                        out.reply(frame.id, up.finish(&users));
                    }
                }
            }
            _ => {}
        }
    }
}

/// What the agent keeps between requests.
#[derive(Default)]
struct State {
    stdins: HashMap<u32, SyncSender<Vec<u8>>>,
    uploads: HashMap<u32, Upload>,
    watches: HashMap<u32, Arc<std::sync::atomic::AtomicBool>>,
    terminals: HashMap<u32, std::os::fd::OwnedFd>,
}

fn handle(req: Request, id: u32, out: &Outbox, state: &mut State, users: &Users) {
    let State {
        stdins,
        uploads,
        watches,
        terminals,
    } = state;
    let result = match req {
        Request::Spawn {
            cmd,
            args,
            envs,
            cwd,
            stdin,
            pty,
        } => match spawn(&cmd, &args, &envs, cwd.as_deref(), stdin, pty) {
            Ok(spawned) => return started(spawned, id, out, stdins, terminals),
            Err(e) => Err(Failure::io(&cmd, &e)),
        },
        Request::Signal { pid, signal } => signal_process(pid, signal),
        Request::Resize { pid, cols, rows } => resize(terminals, pid, cols, rows),
        Request::CloseStdin { pid } => {
            stdins.remove(&pid);
            Ok(serde_json::Value::Null)
        }
        Request::Stat { path } => {
            let p = resolve(&path);
            entry(&p, users).map(|e| serde_json::to_value(e).unwrap_or_default())
        }
        Request::ListDir { path, depth } => list(&resolve(&path), depth.max(1), users)
            .map(|v| serde_json::to_value(v).unwrap_or_default()),
        Request::MakeDir { path } => make_dir(&path, users),
        Request::Move {
            source,
            destination,
        } => move_entry(&source, &destination, users),
        Request::Remove { path } => remove_entry(&path),
        Request::ReadFile { path } => match open_file(&path) {
            Ok((f, p)) => {
                let e = entry(&p, users);
                out.reply(id, e.map(|e| serde_json::to_value(e).unwrap_or_default()));
                let out = out.clone();
                thread::spawn(move || stream_file(f, id, &out));
                return;
            }
            Err(e) => Err(e),
        },
        Request::WriteFile { path } => {
            uploads.insert(id, Upload::open(&path));
            return;
        }
        Request::Watch { path, recursive } => match Watch::start(&resolve(&path), recursive) {
            Ok(w) => {
                out.reply(id, Ok(serde_json::Value::Null));
                let stop = w.stop.clone();
                watches.insert(id, stop);
                let out = out.clone();
                thread::spawn(move || w.run(id, &out));
                return;
            }
            Err(e) => Err(Failure::io(&path, &e)),
        },
        Request::Unwatch { watch } => {
            if let Some(stop) = watches.remove(&watch) {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(serde_json::Value::Null)
        }
    };
    out.reply(id, result);
}

/// Keeps a spawned process's input queue and terminal under its pid, replies to request `id`
/// with the pid, then watches the process (the reply goes out before any output frame of it).
fn started(
    (child, tx, terminal): Spawned,
    id: u32,
    out: &Outbox,
    stdins: &mut HashMap<u32, SyncSender<Vec<u8>>>,
    terminals: &mut HashMap<u32, std::os::fd::OwnedFd>,
) {
    let pid = child.id();
    if let Some(tx) = tx {
        stdins.insert(pid, tx);
    }
    let term_output = terminal.map(|(m, output)| {
        terminals.insert(pid, m);
        output
    });
    out.reply(id, Ok(serde_json::json!({ "pid": pid })));
    watch(child, term_output, out.clone());
}

/// Sets the size of process `pid`'s terminal; `not_found` if it has none.
fn resize(
    terminals: &HashMap<u32, std::os::fd::OwnedFd>,
    pid: u32,
    cols: u16,
    rows: u16,
) -> Result<serde_json::Value, Failure> {
    match terminals.get(&pid) {
        Some(m) => set_size(m, cols, rows)
            .map(|()| serde_json::Value::Null)
            .map_err(|e| Failure::io("terminal", &e)),
        None => Err(Failure {
            code: "not_found".into(),
            message: format!("process {pid} has no terminal"),
        }),
    }
}

/// Creates folder `path` with its parents and returns its entry; `already_exists` if anything
/// is there.
fn make_dir(path: &str, users: &Users) -> Result<serde_json::Value, Failure> {
    let p = resolve(path);
    if fs::symlink_metadata(&p).is_ok() {
        Err(Failure {
            code: "already_exists".into(),
            message: format!("{} already exists", p.display()),
        })
    } else {
        fs::create_dir_all(&p)
            .map_err(|e| Failure::io(path, &e))
            .and_then(|()| entry(&p, users))
            .map(|e| serde_json::to_value(e).unwrap_or_default())
    }
}

/// Renames `source` to `destination` (making its parent folders) and returns the moved entry.
fn move_entry(
    source: &str,
    destination: &str,
    users: &Users,
) -> Result<serde_json::Value, Failure> {
    let (s, d) = (resolve(source), resolve(destination));
    if let Some(parent) = d.parent() {
        let _ = fs::create_dir_all(parent);
    }
    fs::rename(&s, &d)
        .map_err(|e| Failure::io(source, &e))
        .and_then(|()| entry(&d, users))
        .map(|e| serde_json::to_value(e).unwrap_or_default())
}

/// Removes `path`: a folder with everything in it, or a single file or link.
fn remove_entry(path: &str) -> Result<serde_json::Value, Failure> {
    let p = resolve(path);
    let r = match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
        Ok(_) => fs::remove_file(&p),
        Err(e) => Err(e),
    };
    r.map(|()| serde_json::Value::Null)
        .map_err(|e| Failure::io(path, &e))
}

/// Opens file `path` for reading, with its resolved path; `invalid_argument` for a folder.
fn open_file(path: &str) -> Result<(File, PathBuf), Failure> {
    let p = resolve(path);
    match File::open(&p).and_then(|f| f.metadata().map(|m| (f, m))) {
        Ok((_, m)) if m.is_dir() => Err(Failure {
            code: "invalid_argument".into(),
            message: format!("{path} is a directory"),
        }),
        Ok((f, _)) => Ok((f, p)),
        Err(e) => Err(Failure::io(path, &e)),
    }
}

/// What [`spawn`] hands back: the child, its input queue, and its terminal (if it has one:
/// the descriptor kept for resizing, and a reader of its output).
type Spawned = (
    Child,
    Option<SyncSender<Vec<u8>>>,
    Option<(std::os::fd::OwnedFd, File)>,
);

/// Sets a terminal's size.
fn set_size(master: &std::os::fd::OwnedFd, cols: u16, rows: u16) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ on a terminal descriptor we own, with a valid winsize.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts one process in its own process group (so a signal reaches its whole tree); with
/// `pty`, in its own session on a new terminal of that size.
fn spawn(
    cmd: &str,
    args: &[String],
    envs: &BTreeMap<String, String>,
    cwd: Option<&str>,
    stdin: bool,
    pty: Option<[u16; 2]>,
) -> io::Result<Spawned> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut c = Command::new(cmd);
    c.args(args).envs(envs);
    let mut master: Option<OwnedFd> = None;
    if let Some([cols, rows]) = pty {
        let (mut m, mut sl) = (-1, -1);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into integers we own; the size is valid.
        if unsafe { libc::openpty(&mut m, &mut sl, std::ptr::null_mut(), std::ptr::null(), &ws) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just created and are owned by nobody else.
        let (m, sl) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(sl)) };
        c.stdin(Stdio::from(sl.try_clone()?))
            .stdout(Stdio::from(sl.try_clone()?))
            .stderr(Stdio::from(sl));
        // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the terminal's slave here.
        unsafe {
            c.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        master = Some(m);
    } else {
        c.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
    }
    let dir = match cwd {
        Some(d) if !d.is_empty() => resolve(d),
        _ => home(),
    };
    c.current_dir(dir);
    // SAFETY: the closure only calls open/write/close, which are async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            // The agent is shielded from the OOM killer; the code it runs is not.
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            Ok(())
        });
    }
    let mut child = c.spawn()?;
    drop(c); // our copies of the terminal's slave side close here
    if let Some(m) = master {
        // Output is read from the terminal, input typed into it.
        let output = File::from(m.try_clone()?);
        let input = File::from(m.try_clone()?);
        return Ok((child, Some(feed_stdin(input)), Some((m, output))));
    }
    let tx = child.stdin.take().map(feed_stdin);
    Ok((child, tx, None))
}

/// A thread that writes queued input into a child's stdin (so a child that does not read
/// never blocks the agent); dropping the sender closes the pipe.
fn feed_stdin(mut pipe: impl Write + Send + 'static) -> SyncSender<Vec<u8>> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(64);
    thread::spawn(move || {
        for chunk in rx {
            if pipe.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    tx
}

/// Streams a child's output and reports its end after the output (or after a short grace,
/// when a background grandchild keeps the pipe open).
fn watch(mut child: Child, terminal: Option<File>, out: Outbox) {
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let stdout = child
        .stdout
        .take()
        .map(|p| Box::new(p) as Box<dyn Read + Send>)
        .or_else(|| terminal.map(|t| Box::new(t) as Box<dyn Read + Send>));
    for (pipe, kind) in [
        (stdout, Kind::Stdout),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            Kind::Stderr,
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let out = out.clone();
        let done = done_tx.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.send(&Frame {
                        kind,
                        id: pid,
                        payload: buf[..n].to_vec(),
                    }),
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);
    thread::spawn(move || {
        let status = child.wait();
        let deadline = std::time::Instant::now() + OUTPUT_GRACE;
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        let exit = match status {
            Ok(s) => Exit {
                exit_code: s.code().unwrap_or(-1),
                signal: s.signal(),
            },
            Err(_) => Exit {
                exit_code: -1,
                signal: None,
            },
        };
        out.send(&Frame::json(Kind::Exited, pid, &exit));
    });
}

fn signal_process(pid: u32, signal: i32) -> Result<serde_json::Value, Failure> {
    let Ok(p) = i32::try_from(pid) else {
        return Err(Failure {
            code: "invalid_argument".into(),
            message: format!("pid {pid}"),
        });
    };
    // SAFETY: kill(2) with plain integers; a negative pid names the process group.
    let r = unsafe { libc::kill(-p, signal) };
    // SAFETY: as above, the process itself when it left its group.
    if r == 0 || unsafe { libc::kill(p, signal) } == 0 {
        Ok(serde_json::Value::Null)
    } else {
        Err(Failure {
            code: "not_found".into(),
            message: format!("process {pid} not found"),
        })
    }
}

fn stream_file(mut f: File, id: u32, out: &Outbox) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.send(&Frame {
                kind: Kind::FileChunk,
                id,
                payload: buf[..n].to_vec(),
            }),
        }
    }
    out.send(&Frame {
        kind: Kind::FileChunk,
        id,
        payload: Vec::new(),
    });
}

/// A file being written from `FileData` frames; the first error sticks and is the reply.
struct Upload {
    path: PathBuf,
    file: Result<File, Failure>,
}

impl Upload {
    fn open(path: &str) -> Self {
        let p = resolve(path);
        let file = (|| {
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent)?;
            }
            File::create(&p)
        })()
        .map_err(|e| Failure::io(path, &e));
        Self { path: p, file }
    }

    fn write(&mut self, data: &[u8]) {
        if let Ok(f) = &mut self.file {
            if let Err(e) = f.write_all(data) {
                self.file = Err(Failure::io(&self.path.to_string_lossy(), &e));
            }
        }
    }

    fn finish(self, users: &Users) -> Result<serde_json::Value, Failure> {
        let f = self.file?;
        f.sync_data().ok();
        entry(&self.path, users).map(|e| serde_json::to_value(e).unwrap_or_default())
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Relative paths are relative to the home directory, as in E2B.
fn resolve(path: &str) -> PathBuf {
    if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home().join(path)
    }
}

fn entry(p: &Path, users: &Users) -> Result<Entry, Failure> {
    let m = fs::symlink_metadata(p).map_err(|e| Failure::io(&p.to_string_lossy(), &e))?;
    let ft = m.file_type();
    let (kind, target) = if ft.is_symlink() {
        ("symlink", fs::read_link(p).ok())
    } else if ft.is_dir() {
        ("dir", None)
    } else {
        ("file", None)
    };
    Ok(Entry {
        name: p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind: kind.into(),
        path: p.to_string_lossy().into_owned(),
        size: m.len(),
        mode: m.permissions().mode(),
        owner: users.user(m.uid()),
        group: users.group(m.gid()),
        mtime_s: m.mtime(),
        mtime_ns: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        symlink_target: target.map(|t| t.to_string_lossy().into_owned()),
    })
}

fn list(dir: &Path, depth: u32, users: &Users) -> Result<Vec<Entry>, Failure> {
    let meta = fs::metadata(dir).map_err(|e| Failure::io(&dir.to_string_lossy(), &e))?;
    if !meta.is_dir() {
        return Err(Failure {
            code: "invalid_argument".into(),
            message: format!("{} is not a directory", dir.display()),
        });
    }
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 1)];
    while let Some((d, level)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            let Ok(e) = entry(&p, users) else { continue };
            if e.kind == "dir" && level < depth {
                stack.push((p.clone(), level + 1));
            }
            out.push(e);
            if out.len() > MAX_LIST {
                return Err(Failure {
                    code: "resource_exhausted".into(),
                    message: format!("more than {MAX_LIST} entries; list with a smaller depth"),
                });
            }
        }
    }
    Ok(out)
}

/// A folder watch over inotify: one thread, polling its descriptor so that `Unwatch` (a flag)
/// ends it within 200 ms; new subfolders are added when watching recursively.
struct Watch {
    fd: std::os::fd::OwnedFd,
    dirs: HashMap<i32, PathBuf>,
    root: PathBuf,
    recursive: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB;

impl Watch {
    fn start(root: &Path, recursive: bool) -> io::Result<Self> {
        if !fs::metadata(root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        // SAFETY: inotify_init1 has no preconditions; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by inotify_init1 and is owned by nobody else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut w = Self {
            fd,
            dirs: HashMap::new(),
            root: root.to_path_buf(),
            recursive,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        w.add(root)?;
        Ok(w)
    }

    /// Watches `dir` (and, recursively, its subfolders).
    fn add(&mut self, dir: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_path_buf());
        if self.recursive {
            for e in fs::read_dir(dir)?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = self.add(&e.path());
                }
            }
        }
        Ok(())
    }

    fn emit(&self, path: &Path, op: &str, id: u32, out: &Outbox) {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let e = WatchEvent {
            name: rel.to_string_lossy().into_owned(),
            op: op.into(),
        };
        out.send(&Frame::json(Kind::WatchEvent, id, &e));
    }

    /// `create` events for everything under `dir` (a folder that was just made or moved in).
    fn emit_tree(&self, dir: &Path, id: u32, out: &Outbox) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            self.emit(&p, "create", id, out);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                self.emit_tree(&p, id, out);
            }
        }
    }

    fn run(mut self, id: u32, out: &Outbox) {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 64 * 1024];
        while !self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: reading into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let mut at = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name_bytes = &buf[at + header..at + header + ev.len as usize];
                at += header + ev.len as usize;
                let name_end = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = String::from_utf8_lossy(&name_bytes[..name_end]).into_owned();
                let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                    continue;
                };
                let full = dir.join(&name);
                let new_dir = self.recursive
                    && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                    && ev.mask & libc::IN_ISDIR != 0;
                if new_dir {
                    let _ = self.add(&full);
                }
                let op = if ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                    "create"
                } else if ev.mask & libc::IN_MODIFY != 0 {
                    "write"
                } else if ev.mask & libc::IN_DELETE != 0 {
                    "remove"
                } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                    "rename"
                } else if ev.mask & libc::IN_ATTRIB != 0 {
                    "chmod"
                } else {
                    continue;
                };
                self.emit(&full, op, id, out);
                if new_dir {
                    // Whatever appeared in the new folder before its watch held.
                    self.emit_tree(&full, id, out);
                }
            }
        }
    }
}

/// User and group names from the sandbox's own `/etc/passwd` and `/etc/group`.
struct Users {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Users {
    fn load() -> Self {
        let read = |path: &str| -> HashMap<u32, String> {
            fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    let id = f.nth(1)?.parse().ok()?;
                    Some((id, name.to_string()))
                })
                .collect()
        };
        Self {
            users: read("/etc/passwd"),
            groups: read("/etc/group"),
        }
    }

    fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}
