//! Isolation backends behind one trait: each starts a sandbox's agent inside its isolation
//! and hands back the agent's stdin and stdout; the service and the API never know which
//! backend runs. `bwrap` (Linux namespaces + seccomp + cgroups) is the default;
//! `firecracker` (a microVM per sandbox) is chosen where `/dev/kvm` boots guests.

pub mod bwrap;
pub mod cgroup;
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
}

/// A started sandbox: its agent (stdin and stdout piped) and its cgroups.
#[derive(Debug)]
pub struct Launched {
    /// The process that holds the sandbox; killing it ends the sandbox.
    pub child: tokio::process::Child,
    /// Where its resources are limited and counted.
    pub cgroup: Option<Cgroup>,
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
