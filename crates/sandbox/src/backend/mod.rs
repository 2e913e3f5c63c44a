//! Isolation backends behind one trait: each starts a sandbox's agent inside its isolation
//! and hands back the agent's stdin and stdout; the service and the API never know which
//! backend runs. `bwrap` (Linux namespaces + seccomp + cgroups) is the default;
//! `firecracker` (a microVM per sandbox) is chosen where `/dev/kvm` boots guests.

pub mod bwrap;
pub mod cgroup;
pub mod egress;
pub mod firecracker;
pub mod seccomp;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::template::Template;
use crate::SandboxError;

pub use cgroup::{Cgroup, Limits};

/// How to start the agent: a program and its arguments (by default lastmile's own binary
/// with `sandbox-agent`).
#[derive(Clone, Debug)]
pub struct AgentCommand {
    /// The executable, on the host.
    pub path: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// One sandbox to start.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    /// Its id (names its cgroups).
    pub id: &'a str,
    /// What it starts from.
    pub template: &'a Template,
    /// Environment variables every process in it sees.
    pub envs: &'a BTreeMap<String, String>,
    /// Internet access behind these rules (`None`: no network but its own loopback).
    pub network: Option<&'a egress::EgressRules>,
}

/// A started sandbox: its agent (stdin and stdout piped, or a socket) and its cgroups.
#[derive(Debug)]
pub struct Launched {
    /// The process that holds the sandbox; killing it ends the sandbox.
    pub child: tokio::process::Child,
    /// The agent's connection when it is not the child's stdin and stdout (a microVM's vsock).
    pub agent_socket: Option<std::os::unix::net::UnixStream>,
    /// A host folder of the sandbox's own (a microVM's config and sockets), removed with it.
    pub scratch: Option<PathBuf>,
    /// Where its resources are limited and counted.
    pub cgroup: Option<Cgroup>,
    /// Processes that serve it from the host (its user-mode network), ended with it.
    pub helpers: Vec<std::process::Child>,
}

/// An isolation technique.
pub trait IsolationBackend: Send + Sync {
    /// Its name (`bwrap`, `firecracker`).
    fn name(&self) -> &'static str;
    /// One line on what it guarantees on this host (for logs and `/health`).
    fn describe(&self) -> String;
    /// Starts a sandbox's agent.
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<Launched, SandboxError>;
    /// Releases what the backend holds on the host, once every sandbox has ended.
    fn shutdown(&self) {}
    /// Stops every process of the sandbox held by `root` (its launched process) where it is,
    /// memory kept; nothing in it runs until [`IsolationBackend::resume`].
    fn pause(&self, root: u32) -> Result<(), SandboxError> {
        signal_tree(root, libc::SIGSTOP)
            .map(drop)
            .map_err(|e| SandboxError::Unavailable(format!("pausing the sandbox: {e}")))
    }
    /// Lets every process of a paused sandbox run on.
    fn resume(&self, root: u32) -> Result<(), SandboxError> {
        signal_tree(root, libc::SIGCONT)
            .map(drop)
            .map_err(|e| SandboxError::Unavailable(format!("resuming the sandbox: {e}")))
    }
}

/// A pipe (read end, write end), both close-on-exec.
pub(crate) fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// `root` and every process descended from it, from `/proc` (a sandbox's processes all
/// descend from its launched process: orphans are adopted by its pid namespace's init, which
/// is one of them).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parent = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold anything, so read after its last ')'.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent.iter().filter(|&&(_, pp)| pp == p).map(|&(c, _)| c));
        i += 1;
    }
    tree
}

/// Sends `sig` to `root` and its descendants; for `SIGSTOP`, sweeps again until a sweep finds
/// no process it had not stopped (one may fork while the first sweep runs). Returns how many
/// were signalled.
pub fn signal_tree(root: u32, sig: libc::c_int) -> std::io::Result<usize> {
    let mut done = std::collections::HashSet::new();
    for _ in 0..64 {
        let fresh: Vec<u32> = process_tree(root)
            .into_iter()
            .filter(|p| !done.contains(p))
            .collect();
        if fresh.is_empty() {
            return Ok(done.len());
        }
        for pid in fresh {
            // SAFETY: kill has no memory preconditions; a pid gone meanwhile gives ESRCH.
            if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 && pid == root {
                return Err(std::io::Error::last_os_error());
            }
            done.insert(pid);
        }
        if sig != libc::SIGSTOP {
            return Ok(done.len());
        }
    }
    Err(std::io::Error::other("processes kept appearing"))
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// Namespaces via bubblewrap.
    #[default]
    Bwrap,
    /// A microVM per sandbox.
    Firecracker,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bwrap" => Ok(Self::Bwrap),
            "firecracker" => Ok(Self::Firecracker),
            _ => Err(format!(
                "unknown sandbox backend `{s}` (bwrap, firecracker)"
            )),
        }
    }
}

/// Environment variable names a client may set: a shell word, not one of the sandbox's own.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 256
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next())
            .unwrap_or('?')
    }

    #[test]
    fn a_process_tree_is_stopped_and_continued_whole() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .expect("sh");
        let root = child.id();
        let mut tree = Vec::new();
        for _ in 0..200 {
            tree = process_tree(root);
            if tree.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(tree.len(), 3, "sh and its two sleeps: {tree:?}");
        assert_eq!(signal_tree(root, libc::SIGSTOP).expect("stop"), 3);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(tree.iter().all(|&p| state(p) == 'T'), "all stopped");
        signal_tree(root, libc::SIGCONT).expect("continue");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(tree.iter().all(|&p| state(p) == 'S'), "all running again");
        for p in tree.iter().rev() {
            // SAFETY: killing our own test children.
            unsafe { libc::kill(*p as libc::pid_t, libc::SIGKILL) };
        }
        let _ = child.wait();
    }
}
