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
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::wire::{Exit, Failure, Frame, Kind, Reply, Request, CHUNK};

mod files;
mod guest;

use files::{
    entry, home, list, make_dir, move_entry, open_file, remove_entry, resolve, stream_file, Upload,
    Watch,
};

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
