//! The `bwrap` backend: each sandbox is a bubblewrap container — fresh user, mount, pid, ipc,
//! uts, net and cgroup namespaces; the template's `/usr` read-only; `/home/user`, `/tmp` and
//! `/dev/shm` as size-capped tmpfs (charged to the sandbox's memory cgroup, gone with it);
//! every capability dropped; no new user namespaces; the seccomp filter of [`super::seccomp`];
//! memory, CPU and pids limited by cgroups; no network (only its own loopback).
//!
//! bubblewrap runs as an unprivileged host user (`nobody` by default when lastmile is root), so
//! the sandbox's user maps to nobody on the host: even a kernel escape from the namespaces
//! lands without privileges. The agent binary, the seccomp programs and the generated
//! `/etc/passwd` reach bubblewrap as file descriptors, so nothing on the host needs to be
//! readable by that user but `/usr` and the binary itself.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::cgroup::{CgroupSetup, Limits};
use super::seccomp::{self, Filters};
use super::{AgentCommand, IsolationBackend, LaunchSpec, Launched};
use crate::SandboxError;

/// The user every sandbox's processes run as, inside.
pub const SANDBOX_UID: u32 = 1000;
/// Its home.
pub const HOME: &str = "/home/user";
/// Where the agent binary is mounted inside.
const AGENT_PATH: &str = "/.lastmile/agent";
/// `/etc` entries of the root file system that sandboxes see (read-only, when present).
const ETC: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "profile.d",
    "python3",
    "python3.11",
    "ssl",
];
/// The base `PATH` inside.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Settings of the backend.
#[derive(Clone, Debug)]
pub struct BwrapConfig {
    /// The bubblewrap executable.
    pub program: PathBuf,
    /// The agent to start inside.
    pub agent: AgentCommand,
    /// The host uid and gid bubblewrap runs as; `None` keeps lastmile's own (when not root).
    pub host_user: Option<(u32, u32)>,
    /// Refuse to start when the host lacks a cgroup controller (memory, pids, cpu).
    pub require_limits: bool,
    /// Internet access for sandboxes that ask (`None`: refused).
    pub egress: Option<super::egress::Egress>,
}

impl BwrapConfig {
    /// Defaults: `bwrap` from `PATH`, `nobody` when running as root, limits required.
    pub fn new(agent: AgentCommand) -> Self {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Self {
            program: PathBuf::from("bwrap"),
            agent,
            host_user: root.then_some((65534, 65534)),
            require_limits: true,
            egress: None,
        }
    }
}

/// The backend.
pub struct Bwrap {
    config: BwrapConfig,
    cgroups: CgroupSetup,
    filters: Filters,
    /// The host's `/` entries that are links into `/usr` (`/bin -> usr/bin` on merged-usr
    /// systems) and those that are real folders.
    top_links: Vec<(String, String)>,
}

impl Bwrap {
    /// Prepares the backend and proves it works here: starts one empty container (with a
    /// deadline), and finds the cgroup controllers.
    pub fn start(config: BwrapConfig) -> Result<Self, SandboxError> {
        let cgroups =
            CgroupSetup::probe().map_err(|e| SandboxError::Unavailable(format!("cgroups: {e}")))?;
        let missing = cgroups.missing();
        if config.require_limits && !missing.is_empty() {
            return Err(SandboxError::Unavailable(format!(
                "this host has no {} cgroup controller for sandbox limits ({}); \
                 run without limits only with --sandbox-no-limits",
                missing.join(", "),
                cgroups.describe()
            )));
        }
        let filters = seccomp::build().map_err(SandboxError::Unavailable)?;
        let mut top_links = Vec::new();
        for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            if let Ok(t) = std::fs::read_link(Path::new("/").join(name)) {
                top_links.push((name.to_string(), t.to_string_lossy().into_owned()));
            }
        }
        let b = Self {
            config,
            cgroups,
            filters,
            top_links,
        };
        b.probe()?;
        Ok(b)
    }

    /// Runs `true` in a container like a sandbox's (no cgroup), within 5 s.
    fn probe(&self) -> Result<(), SandboxError> {
        let fds = self.fds(None, false)?;
        let mut args = self.args(&fds, &Default::default(), 1, None);
        args.push("/usr/bin/true".into());
        let mut cmd = std::process::Command::new(&self.config.program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.prepare(&mut cmd, &fds, &[]);
        let mut child = cmd.spawn().map_err(|e| {
            SandboxError::Unavailable(format!(
                "cannot run {} ({e}); install bubblewrap (Debian: apt-get install bubblewrap)",
                self.config.program.display()
            ))
        })?;
        drop(fds);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = io::Read::read_to_string(&mut e, &mut err);
                    }
                    return Err(SandboxError::Unavailable(format!(
                        "bubblewrap cannot make a sandbox here ({s}): {}; unprivileged user \
                         namespaces must be enabled",
                        err.trim()
                    )));
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    return Err(SandboxError::Unavailable(
                        "bubblewrap did not start a sandbox within 5 s".into(),
                    ));
                }
            }
        }
    }

    /// The file descriptors bubblewrap reads: agent binary, seccomp programs, `/etc` files.
    fn fds(&self, hostname: Option<&str>, network: bool) -> Result<Fds, SandboxError> {
        let io = |e: io::Error| SandboxError::Unavailable(format!("preparing a sandbox: {e}"));
        let agent = File::open(&self.config.agent.path).map_err(|e| {
            SandboxError::Unavailable(format!(
                "the sandbox agent {}: {e}",
                self.config.agent.path.display()
            ))
        })?;
        let passwd = format!(
            "root:x:0:0:root:/root:/bin/bash\nuser:x:{SANDBOX_UID}:{SANDBOX_UID}:user:{HOME}:/bin/bash\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        );
        let group = format!("root:x:0:\nuser:x:{SANDBOX_UID}:\nnogroup:x:65534:\n");
        let host = hostname.unwrap_or("sandbox");
        let hosts = format!("127.0.0.1 localhost {host}\n::1 localhost ip6-localhost\n");
        // Every command is a login shell (`bash -l`, as E2B's SDKs send them): a profile that
        // forks nothing keeps that to a few milliseconds.
        let profile = format!(
            "export PATH=\"{PATH}\"\nif [ -d /etc/profile.d ]; then\n  for i in /etc/profile.d/*.sh; do\n    \
             [ -r \"$i\" ] && . \"$i\"\n  done\n  unset i\nfi\n"
        );
        let mut etc = vec![
            ("/etc/passwd", data_fd(passwd.as_bytes()).map_err(io)?),
            ("/etc/group", data_fd(group.as_bytes()).map_err(io)?),
            ("/etc/hosts", data_fd(hosts.as_bytes()).map_err(io)?),
            (
                "/etc/hostname",
                data_fd(format!("{host}\n").as_bytes()).map_err(io)?,
            ),
            ("/etc/profile", data_fd(profile.as_bytes()).map_err(io)?),
        ];
        if network {
            let resolv = format!("nameserver {}\n", super::egress::DNS);
            etc.push(("/etc/resolv.conf", data_fd(resolv.as_bytes()).map_err(io)?));
        }
        Ok(Fds {
            agent: agent.into(),
            deny: data_fd(&self.filters.deny).map_err(io)?,
            clone3: data_fd(&self.filters.clone3).map_err(io)?,
            etc,
            info: None,
        })
    }

    /// bubblewrap's arguments up to (not including) the command.
    fn args(
        &self,
        fds: &Fds,
        envs: &std::collections::BTreeMap<String, String>,
        disk_mb: u64,
        rootfs: Option<&Path>,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::with_capacity(96);
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&[
            "--die-with-parent",
            "--new-session",
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
        ]);
        let uid = SANDBOX_UID.to_string();
        push(&["--uid", &uid, "--gid", &uid, "--clearenv"]);
        for (k, v) in [
            ("PATH", PATH),
            ("HOME", HOME),
            ("USER", "user"),
            ("LOGNAME", "user"),
            ("SHELL", "/bin/bash"),
            ("LANG", "C.UTF-8"),
            ("PYTHONUNBUFFERED", "1"),
        ] {
            push(&["--setenv", k, v]);
        }
        for (k, v) in envs {
            push(&["--setenv", k, v]);
        }
        let root = rootfs.unwrap_or(Path::new("/"));
        let usr = root.join("usr");
        a.extend(["--ro-bind".into(), usr.into_os_string(), "/usr".into()]);
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        for (name, target) in &self.top_links {
            push(&["--symlink", target, &format!("/{name}")]);
        }
        for e in ETC {
            let src = root.join("etc").join(e);
            a.extend([
                "--ro-bind-try".into(),
                src.into_os_string(),
                format!("/etc/{e}").into(),
            ]);
        }
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        for (dest, fd) in &fds.etc {
            push(&["--ro-bind-data", &fd.as_raw_fd().to_string(), dest]);
        }
        let size = (disk_mb << 20).to_string();
        push(&["--proc", "/proc", "--dev", "/dev"]);
        push(&["--perms", "1777", "--size", &size, "--tmpfs", "/tmp"]);
        push(&["--perms", "1777", "--size", &size, "--tmpfs", "/dev/shm"]);
        push(&["--perms", "0755", "--size", &size, "--tmpfs", HOME]);
        push(&[
            "--ro-bind-fd",
            &fds.agent.as_raw_fd().to_string(),
            AGENT_PATH,
        ]);
        push(&["--remount-ro", "/"]);
        if let Some(info) = &fds.info {
            push(&["--info-fd", &info.as_raw_fd().to_string()]);
        }
        push(&["--add-seccomp-fd", &fds.deny.as_raw_fd().to_string()]);
        push(&["--add-seccomp-fd", &fds.clone3.as_raw_fd().to_string()]);
        push(&["--chdir", HOME, "--"]);
        a
    }

    /// Makes `cmd` start with an empty environment, join the cgroups, keep out of the OOM killer's first pick, die with
    /// lastmile, and drop to the unprivileged host user, in the child before it execs.
    fn prepare(&self, cmd: &mut std::process::Command, fds: &Fds, join: &[RawFd]) {
        // bubblewrap's own process (pid 1 inside) keeps the environment it was started with,
        // readable in the sandbox at /proc/1/environ: it must hold none of lastmile's secrets.
        cmd.env_clear().env("PATH", "/usr/bin:/bin");
        let keep: Vec<RawFd> = fds.all().collect();
        let join = join.to_vec();
        let user = self.config.host_user;
        let parent = std::process::id();
        // SAFETY: the closure calls only async-signal-safe functions (write, fcntl, open,
        // close, setrlimit, setgroups, setgid, setuid, prctl, getppid) on values prepared
        // before fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                for &fd in &join {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for &fd in &keep {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                }
                let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"-900".as_ptr().cast(), 4);
                    libc::close(fd);
                }
                let core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &core);
                if let Some((uid, gid)) = user {
                    lastmile_process::switch_user(uid, gid)?;
                }
                // Last: a change of user clears it (bubblewrap was left without it before).
                lastmile_process::arm_parent_death(parent)
            });
        }
    }
}

impl IsolationBackend for Bwrap {
    fn name(&self) -> &'static str {
        "bwrap"
    }

    fn describe(&self) -> String {
        format!(
            "bwrap: user/mount/pid/ipc/uts/net/cgroup namespaces, no capabilities, seccomp, \
             host user {}, cgroups: {}",
            self.config
                .host_user
                .map(|(u, _)| u.to_string())
                .unwrap_or_else(|| "own".into()),
            self.cgroups.describe()
        )
    }

    fn shutdown(&self) {
        self.cgroups.remove();
    }

    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<Launched, SandboxError> {
        let t = spec.template;
        let limits = Limits {
            memory_bytes: t.memory_mb << 20,
            cpus: t.cpus,
            pids: t.pids,
        };
        let t0 = std::time::Instant::now();
        let cgroup = self.cgroups.create(spec.id, &limits).map_err(|e| {
            SandboxError::Unavailable(format!("creating the sandbox's cgroup: {e}"))
        })?;
        let t_cg = t0.elapsed();
        let egress = match (spec.network, &self.config.egress) {
            (None, _) => None,
            (Some(rules), Some(e)) => Some((rules, e)),
            (Some(_), None) => {
                return Err(SandboxError::InvalidArgument(
                    "internet access is not offered by this server: sandboxes have no network \
                     (create with allow_internet_access=False or leave it unset; the operator \
                     turns it on with --sandbox-egress)"
                        .into(),
                ))
            }
        };
        let mut fds = self.fds(None, egress.is_some())?;
        // With a network, bubblewrap reports the sandbox's pid (to attach the network to).
        let info = match egress {
            Some(_) => {
                let (r, w) = super::pipe()
                    .map_err(|e| SandboxError::Unavailable(format!("preparing a sandbox: {e}")))?;
                fds.info = Some(w);
                Some(r)
            }
            None => None,
        };
        let mut args = self.args(&fds, spec.envs, t.disk_mb, t.rootfs.as_deref());
        args.push(AGENT_PATH.into());
        args.extend(self.config.agent.args.iter().map(OsString::from));
        let mut cmd = std::process::Command::new(&self.config.program);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        self.prepare(&mut cmd, &fds, &cgroup.join_fds());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Unavailable(format!("starting bubblewrap: {e}")))?;
        drop(fds);
        let mut helpers = Vec::new();
        if let (Some(info), Some((rules, e))) = (info, egress) {
            let attached =
                sandbox_pid(info).and_then(|pid| e.attach(pid, self.config.host_user, rules));
            match attached {
                Ok(slirp) => helpers.push(slirp),
                Err(err) => {
                    let _ = child.start_kill();
                    return Err(err);
                }
            }
        }
        tracing::debug!(
            "sandbox {} launched in {:.2} ms (cgroup {:.2} ms)",
            spec.id,
            t0.elapsed().as_secs_f64() * 1e3,
            t_cg.as_secs_f64() * 1e3
        );
        Ok(Launched {
            child,
            agent_socket: None,
            scratch: None,
            cgroup: Some(cgroup),
            helpers,
        })
    }
}

/// The descriptors one bubblewrap start needs (closed in lastmile once it started).
struct Fds {
    agent: OwnedFd,
    deny: OwnedFd,
    clone3: OwnedFd,
    etc: Vec<(&'static str, OwnedFd)>,
    /// Where bubblewrap writes its `--info-fd` report (the sandbox's pid).
    info: Option<OwnedFd>,
}

impl Fds {
    fn all(&self) -> impl Iterator<Item = RawFd> + '_ {
        [&self.agent, &self.deny, &self.clone3]
            .into_iter()
            .chain(self.etc.iter().map(|(_, f)| f))
            .chain(self.info.as_ref())
            .map(|f| f.as_raw_fd())
    }
}

/// The host pid of the sandbox's first process, from bubblewrap's `--info-fd` report
/// (`{"child-pid": N, ...}`), within 5 s.
fn sandbox_pid(info: OwnedFd) -> Result<u32, SandboxError> {
    let fail = |m: String| SandboxError::Unavailable(format!("starting the sandbox: {m}"));
    let mut text = Vec::new();
    let mut pfd = libc::pollfd {
        fd: info.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut file = File::from(info);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !text.contains(&b'}') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } != 1 {
            return Err(fail("bubblewrap did not report the sandbox's pid".into()));
        }
        let mut buf = [0u8; 256];
        match io::Read::read(&mut file, &mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| fail(format!("bubblewrap's report: {e}")))?;
    v["child-pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| fail("bubblewrap's report has no child-pid".into()))
}

/// A pipe holding `data` (small: it must fit the pipe's buffer), read end returned.
fn data_fd(data: &[u8]) -> io::Result<OwnedFd> {
    let (r, w) = super::pipe()?;
    if data.len() > 60 * 1024 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "data too large for a pipe",
        ));
    }
    File::from(w).write_all(data)?;
    Ok(r)
}
