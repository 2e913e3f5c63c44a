//! The one way lastmile starts its own server processes (the replicas of `serve --config` and
//! of `serve --workers N`, the servers `bench --compare` measures): a
//! [`Launch`] runs `lastmile <command> --host H --port 0`, reads the address the child reports
//! once it listens ([`LISTENING`], one line on its stdout), keeps its output, and hands back a
//! [`LaunchedWorker`].
//!
//! Invariants:
//! - no port is picked here: the child binds port 0 and says which port it got, so two launches
//!   can never race for the same port (as `bind(0)`, drop, then pass the number on did);
//! - a child never sees the admin key or any credential of its parent (a replica given
//!   `LASTMILE_ADMIN_KEY` would read it as its own `--admin-key` and refuse to start, and a
//!   replica has no use for credentials it could leak);
//! - on Linux a child is killed when the process that started it dies, even by `kill -9`
//!   (`PR_SET_PDEATHSIG`), and refuses to start if that process is already gone; dropping its
//!   [`LaunchedWorker`] kills it too. It is forked through `lastmile_process`, as sandboxes
//!   are, on a thread that lives as long as the process (the signal follows the forking
//!   thread), so a launch from a short-lived thread does not kill the child minutes later;
//! - its stdout and stderr are never discarded: each line goes to a log file or to this
//!   process's stderr with a prefix, and the last lines of its stderr are kept for the error
//!   that says why it never listened;
//! - a signal reaches the child only while it is running and not yet reaped (its pid cannot
//!   have been reused): signals go through the one task that waits for it.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};

use crate::{lock, ControlError};

/// What a server command prints on its stdout, followed by its base URL
/// (`http://127.0.0.1:41234`), once it listens: the line a launcher waits for.
pub const LISTENING: &str = "lastmile: listening on ";

/// The line announcing that a server listens at `url`.
pub fn listening_line(url: &str) -> String {
    format!("{LISTENING}{url}")
}

/// The base URL in a [`listening_line`], if `line` is one.
pub fn parse_listening_line(line: &str) -> Option<&str> {
    let url = line.trim_end().strip_prefix(LISTENING)?;
    url.starts_with("http://").then_some(url)
}

/// Lines of a child's stderr kept for errors: its first lines (where a failing program says
/// why, before any backtrace) and its last.
const STDERR_HEAD_LINES: usize = 10;
const STDERR_TAIL_LINES: usize = 40;

/// The first and the last lines of a child's stderr.
#[derive(Default)]
struct KeptLines {
    head: Vec<String>,
    tail: VecDeque<String>,
    skipped: usize,
}

impl KeptLines {
    fn push(&mut self, line: &str) {
        if self.head.len() < STDERR_HEAD_LINES {
            self.head.push(line.to_string());
            return;
        }
        if self.tail.len() == STDERR_TAIL_LINES {
            self.tail.pop_front();
            self.skipped += 1;
        }
        self.tail.push_back(line.to_string());
    }

    fn text(&self) -> String {
        let mut lines: Vec<String> = self.head.clone();
        if self.skipped > 0 {
            lines.push(format!("[... {} lines ...]", self.skipped));
        }
        lines.extend(self.tail.iter().cloned());
        lines.join("\n")
    }
}

/// How long the exit of a child waits for the last of its output to be read (a bound, in case
/// a grandchild holds the pipes open; a loaded machine may take a while to schedule the reader).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// How to stop a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Finish in-flight requests, then exit (SIGTERM).
    Graceful,
    /// Now (SIGKILL).
    Kill,
}

impl Stop {
    fn signal(self) -> libc::c_int {
        match self {
            Self::Graceful => libc::SIGTERM,
            Self::Kill => libc::SIGKILL,
        }
    }
}

/// Where a child's stdout and stderr go, line by line.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Appended to this file (created if missing).
    LogFile(PathBuf),
    /// Written to this process's stderr as `PREFIX[PID] line`.
    Prefixed(String),
}

/// How to start one server process: `exe command... --host HOST --port 0`.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `lastmile` binary.
    pub exe: PathBuf,
    /// The subcommand and its options (`["serve", "--model", "m.gguf"]`), without `--host` and
    /// `--port`, which the launcher adds.
    pub command: Vec<OsString>,
    /// The address the child listens on (it picks the port).
    pub host: String,
    /// Where its output goes.
    pub output: Output,
    /// Put the child in a process group of its own, so that a Ctrl-C at the terminal reaches
    /// only this process, which then stops its children in order.
    pub own_process_group: bool,
    /// Extra environment variables for the child (after the secrets are removed).
    pub env: Vec<(OsString, OsString)>,
}

impl Launch {
    /// `exe command...` on 127.0.0.1, its output on this process's stderr behind `worker[PID]`.
    pub fn new(
        exe: impl Into<PathBuf>,
        command: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Self {
            exe: exe.into(),
            command: command.into_iter().map(Into::into).collect(),
            host: "127.0.0.1".into(),
            output: Output::Prefixed("worker".into()),
            own_process_group: false,
            env: Vec::new(),
        }
    }

    /// Sets where the child's output goes.
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The process as it will be run.
    fn command(&self) -> Command {
        let mut cmd = worker_command(&self.exe);
        cmd.args(&self.command)
            .args(["--host", &self.host, "--port", "0"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.own_process_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        cmd
    }

    /// Starts the child (returns at once; [`LaunchedWorker::listening`] waits for its address).
    /// Must be called within a tokio runtime, which then runs the tasks that read its output
    /// and wait for its exit.
    pub fn spawn(&self) -> Result<LaunchedWorker, ControlError> {
        let failed = |message: String| ControlError::Launch {
            exe: self.exe.display().to_string(),
            message,
        };
        let sink = Sink::open(&self.output).map_err(|e| failed(format!("opening its log: {e}")))?;
        let command = self.command();
        // Forked on a thread that lives as long as this process: the child's parent-death
        // signal follows the forking thread, not the process.
        let mut child = lastmile_process::launch(move || {
            let mut cmd = tokio::process::Command::from(command);
            cmd.kill_on_drop(true);
            cmd.spawn()
        })
        .ok_or_else(|| failed("no launch thread could start it".into()))?
        .map_err(|e| failed(format!("spawning it: {e}")))?;
        let pid = child.id().unwrap_or(0);
        let sink = Arc::new(sink.with_pid(pid));
        let tail = Arc::new(Mutex::new(KeptLines::default()));
        let (listening_tx, listening) = watch::channel(None);
        let (exit_tx, exit) = watch::channel(None);
        let (signals, mut signal_rx) = mpsc::unbounded_channel::<Stop>();
        let stdout = child.stdout.take().map(|out| {
            let sink = sink.clone();
            tokio::spawn(copy_lines(out, move |line| {
                if let Some(url) = parse_listening_line(line) {
                    listening_tx.send_replace(Some(url.to_string()));
                }
                sink.write(line);
            }))
        });
        let stderr = child.stderr.take().map(|err| {
            let (sink, tail) = (sink.clone(), tail.clone());
            tokio::spawn(copy_lines(err, move |line| {
                lock(&tail).push(line);
                sink.write(line);
            }))
        });
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    stop = signal_rx.recv() => {
                        // The handle is gone: it was dropped, so the child goes too.
                        let stop = stop.unwrap_or(Stop::Kill);
                        // `id()` is `None` once the child is reaped, which only `wait` above
                        // does: the pid still names our child.
                        if let Some(pid) = child.id() {
                            // SAFETY: kill(2) on the pid of our own unreaped child.
                            unsafe {
                                libc::kill(pid as libc::pid_t, stop.signal());
                            }
                        }
                        if stop == Stop::Kill && signal_rx.is_closed() {
                            break child.wait().await;
                        }
                    }
                }
            };
            // The rest of its output, so that the error about its exit shows its last words.
            for task in [stdout, stderr].into_iter().flatten() {
                let _ = tokio::time::timeout(OUTPUT_DRAIN, task).await;
            }
            let how = match status {
                Ok(status) => status.to_string(),
                Err(e) => format!("lost: {e}"),
            };
            exit_tx.send_replace(Some(how));
        });
        Ok(LaunchedWorker {
            pid,
            signals,
            watch: WorkerWatch {
                exe: self.exe.display().to_string(),
                listening,
                exit,
                tail,
            },
        })
    }
}

/// A started child: its pid, the address it reports, its exit, and its stderr's last lines.
/// Dropping it kills the child.
pub struct LaunchedWorker {
    pid: u32,
    signals: mpsc::UnboundedSender<Stop>,
    watch: WorkerWatch,
}

impl LaunchedWorker {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits up to `limit` for the base URL it listens at; fails if it exits first or stays
    /// silent, with the end of its stderr in the error.
    pub async fn listening(&self, limit: Duration) -> Result<String, ControlError> {
        self.watch.clone().listening(limit).await
    }

    /// Sends it `how` (nothing happens once it has exited).
    pub fn stop(&self, how: Stop) {
        let _ = self.signals.send(how);
    }

    /// Resolves, with how it ended, once it has exited and its output has been read.
    pub async fn exited(&self) -> String {
        self.watch.clone().exited().await
    }

    /// A handle that watches it (its address, its exit) without keeping it alive.
    pub fn watch(&self) -> WorkerWatch {
        self.watch.clone()
    }

    /// The first and the last lines of its stderr (the middle of a long one elided).
    pub fn stderr_tail(&self) -> String {
        self.watch.stderr_tail()
    }
}

/// Watches a [`LaunchedWorker`]: the address it reports, its exit, its stderr's last lines.
#[derive(Clone)]
pub struct WorkerWatch {
    exe: String,
    listening: watch::Receiver<Option<String>>,
    exit: watch::Receiver<Option<String>>,
    tail: Arc<Mutex<KeptLines>>,
}

impl WorkerWatch {
    /// See [`LaunchedWorker::listening`].
    pub async fn listening(mut self, limit: Duration) -> Result<String, ControlError> {
        let mut exit = self.exit.clone();
        let reported = tokio::time::timeout(limit, async {
            tokio::select! {
                // `Err`: the stdout reader is gone (the child closed its stdout) without the
                // line; its exit, which follows, says why.
                url = self.listening.wait_for(Option::is_some) => {
                    if let Ok(url) = url {
                        return Ok(url.clone().unwrap_or_default());
                    }
                }
                _ = exit.wait_for(Option::is_some) => {}
            }
            let how = exit.wait_for(Option::is_some).await;
            Err(how.map_or_else(|_| "lost".into(), |h| h.clone().unwrap_or_default()))
        })
        .await;
        match reported {
            Ok(Ok(url)) => Ok(url),
            Ok(Err(status)) => Err(ControlError::ExitedEarly {
                exe: self.exe.clone(),
                status,
                stderr: self.stderr_tail(),
            }),
            Err(_) => Err(ControlError::NotListening {
                exe: self.exe.clone(),
                after: limit,
                stderr: self.stderr_tail(),
            }),
        }
    }

    /// See [`LaunchedWorker::exited`].
    pub async fn exited(mut self) -> String {
        match self.exit.wait_for(Option::is_some).await {
            Ok(how) => how.clone().unwrap_or_default(),
            Err(_) => "lost".into(),
        }
    }

    /// See [`LaunchedWorker::stderr_tail`].
    pub fn stderr_tail(&self) -> String {
        lock(&self.tail).text()
    }
}

/// Reads `from` line by line (any bytes: invalid UTF-8 is replaced) into `each`.
async fn copy_lines(from: impl AsyncRead + Unpin, mut each: impl FnMut(&str)) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                each(text.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

/// Where a child's lines are written.
enum Sink {
    File(Mutex<std::fs::File>),
    Prefixed(String),
}

impl Sink {
    fn open(output: &Output) -> std::io::Result<Self> {
        Ok(match output {
            Output::LogFile(path) => Self::File(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
            Output::Prefixed(prefix) => Self::Prefixed(prefix.clone()),
        })
    }

    fn with_pid(self, pid: u32) -> Self {
        match self {
            Self::Prefixed(prefix) => Self::Prefixed(format!("{prefix}[{pid}] ")),
            file => file,
        }
    }

    fn write(&self, line: &str) {
        match self {
            Self::File(file) => {
                let _ = writeln!(lock(file), "{line}");
            }
            Self::Prefixed(prefix) => {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            }
        }
    }
}

/// Environment variables that hold secrets, besides every `LASTMILE_*` variable whose name ends
/// in `_KEY`, `_TOKEN`, `_PASSWORD` or `_SECRET`: etcd's credentials as its own tools read them.
const SECRET_VARIABLES: &[&str] = &[
    "ETCDCTL_USER",
    "ETCDCTL_PASSWORD",
    "ETCD_USERNAME",
    "ETCD_PASSWORD",
];
/// Whether the environment variable `name` holds a secret a child must not inherit.
pub fn is_secret_variable(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let upper = name.to_ascii_uppercase();
    SECRET_VARIABLES.contains(&upper.as_str())
        || (upper.starts_with("LASTMILE_")
            && ["_KEY", "_TOKEN", "_PASSWORD", "_SECRET"]
                .iter()
                .any(|end| upper.ends_with(end)))
}

/// A command running `exe` as a worker child: this process's environment minus its secrets,
/// killed when this process dies (Linux).
pub fn worker_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    remove_secrets(&mut cmd, std::env::vars_os().map(|(name, _)| name));
    lastmile_process::die_with_parent(&mut cmd);
    cmd
}

/// Removes from `cmd`'s environment each of the variables `names` that holds a secret.
fn remove_secrets(cmd: &mut Command, names: impl Iterator<Item = std::ffi::OsString>) {
    for name in names {
        if is_secret_variable(&name) {
            cmd.env_remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_last_lines_of_stderr_are_kept() {
        let mut kept = KeptLines::default();
        for i in 0..100 {
            kept.push(&format!("line {i}"));
        }
        let text = kept.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), STDERR_HEAD_LINES + 1 + STDERR_TAIL_LINES);
        assert_eq!(lines[0], "line 0", "where the error is said");
        assert_eq!(lines[STDERR_HEAD_LINES], "[... 50 lines ...]");
        assert_eq!(lines.last(), Some(&"line 99"));
        let mut short = KeptLines::default();
        short.push("only");
        assert_eq!(short.text(), "only");
    }

    /// A launch of `sh -c SCRIPT` (the launcher's `--host H --port 0` become `$0 $1 ...`).
    fn shell(script: &str) -> Launch {
        Launch::new("/bin/sh", ["-c", script]).output(Output::Prefixed("test".into()))
    }

    /// Whether process `pid` is gone (or a zombie).
    fn is_dead(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    #[test]
    fn the_listening_line_round_trips() {
        let line = listening_line("http://127.0.0.1:41234");
        assert_eq!(line, "lastmile: listening on http://127.0.0.1:41234");
        assert_eq!(
            parse_listening_line(&format!("{line}\r\n")),
            Some("http://127.0.0.1:41234")
        );
        assert_eq!(parse_listening_line("lastmile: listening on soon"), None);
        assert_eq!(parse_listening_line("INFO listening on http://x"), None);
    }

    #[tokio::test]
    async fn the_address_is_the_one_the_child_reports_and_dropping_it_kills_it() {
        let worker =
            shell("echo starting; echo 'lastmile: listening on http://127.0.0.1:5'; exec sleep 30")
                .spawn()
                .expect("spawn");
        let url = worker.listening(Duration::from_secs(10)).await;
        assert_eq!(url.expect("listening"), "http://127.0.0.1:5");
        let (pid, watch) = (worker.pid(), worker.watch());
        assert!(!is_dead(pid));
        drop(worker);
        let how = tokio::time::timeout(Duration::from_secs(10), watch.exited())
            .await
            .expect("killed on drop");
        assert!(
            how.contains("SIGKILL") || how.contains("signal: 9"),
            "{how}"
        );
    }

    #[tokio::test]
    async fn a_child_that_exits_before_listening_is_an_error_with_its_stderr() {
        let worker = shell("echo 'error: loading no-such.gguf: not found' >&2; exit 3")
            .spawn()
            .expect("spawn");
        let err = worker
            .listening(Duration::from_secs(10))
            .await
            .expect_err("it never listens");
        assert_eq!(err.error_type(), "exited_early");
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(
            text.contains("error: loading no-such.gguf: not found"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_silent_child_is_an_error_after_the_limit_and_can_be_stopped() {
        let worker = shell("echo 'still loading' >&2; exec sleep 30")
            .spawn()
            .expect("spawn");
        // Once its line has been read (the reader runs on its own; a loaded machine may take a
        // while to schedule the child), the error about its silence must carry it.
        let start = std::time::Instant::now();
        while !worker.stderr_tail().contains("still loading") {
            assert!(start.elapsed() < Duration::from_secs(10), "no stderr read");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = worker
            .listening(Duration::from_millis(300))
            .await
            .expect_err("it never listens");
        assert_eq!(err.error_type(), "not_listening");
        assert!(err.to_string().contains("still loading"), "{err}");
        worker.stop(Stop::Graceful);
        let how = tokio::time::timeout(Duration::from_secs(10), worker.exited())
            .await
            .expect("stopped");
        assert!(
            how.contains("SIGTERM") || how.contains("signal: 15"),
            "{how}"
        );
    }

    #[tokio::test]
    async fn output_is_kept_in_the_log_file_with_the_added_arguments() {
        let dir = std::env::temp_dir().join(format!("lastmile-launcher-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("child.log");
        let _ = std::fs::remove_file(&log);
        let worker = Launch::new("/bin/sh", ["-c", "echo \"args: $*\"; echo oops >&2"])
            .output(Output::LogFile(log.clone()))
            .spawn()
            .expect("spawn");
        let how = worker.exited().await;
        assert_eq!(how, "exit status: 0");
        let text = std::fs::read_to_string(&log).expect("log");
        // `sh -c` takes the first of them as $0.
        assert!(text.contains("args: 127.0.0.1 --port 0"), "{text}");
        assert!(text.contains("oops"), "{text}");
        assert_eq!(worker.stderr_tail(), "oops");
    }

    #[test]
    fn secrets_are_recognised_and_settings_are_not() {
        for secret in [
            "LASTMILE_ADMIN_KEY",
            "LASTMILE_METRICS_KEY",
            "lastmile_admin_key",
            "LASTMILE_ETCD_PASSWORD",
            "ETCDCTL_PASSWORD",
            "ETCD_USERNAME",
        ] {
            assert!(is_secret_variable(OsStr::new(secret)), "{secret}");
        }
        for setting in [
            "LASTMILE_HOME",
            "LASTMILE_MODEL",
            "RUST_LOG",
            "PATH",
            "HOME",
        ] {
            assert!(!is_secret_variable(OsStr::new(setting)), "{setting}");
        }
    }

    #[test]
    fn worker_commands_drop_the_secrets_of_the_environment() {
        let mut cmd = Command::new("/bin/true");
        let names = ["PATH", "LASTMILE_ADMIN_KEY", "LASTMILE_HOME"].map(std::ffi::OsString::from);
        remove_secrets(&mut cmd, names.into_iter());
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_os_string())
            .collect();
        assert_eq!(removed, ["LASTMILE_ADMIN_KEY"]);
    }
}
