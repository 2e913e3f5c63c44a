//! Agent sandboxes: isolated environments where agents run code, behind E2B's API so the
//! official `e2b` SDKs work against lastmile unchanged.
//!
//! The shape, outside in:
//! - [`e2b`]: the HTTP face — control plane (`/v2/sandboxes`…) and data plane (Connect-RPC
//!   `process.Process` and `filesystem.Filesystem`, `/files`, the code interpreter), routed by
//!   E2B's headers so one port serves every sandbox beside lastmile's own API.
//! - [`service`]: which sandboxes exist, whose they are (one API key each), their limits and
//!   lifetimes (expiry kills every process and drops every file).
//! - [`conn`]: the host's end of a sandbox's agent; [`wire`]: the frames between them.
//! - [`agent`]: the process inside each sandbox that starts commands and touches files, so the
//!   host never resolves a path the sandbox controls.
//! - [`backend`]: isolation behind one trait — `bwrap` (namespaces, seccomp, cgroups v1/v2),
//!   `firecracker` (microVMs, where KVM boots guests).
#![warn(missing_docs)]

pub mod agent;
pub mod backend;
pub mod conn;
pub mod e2b;
pub mod interpreter;
pub mod metrics;
pub mod service;
pub mod template;
pub mod wire;

use std::sync::Arc;

use axum::http::StatusCode;
use thiserror::Error;

pub use backend::{AgentCommand, BackendKind};
pub use service::{KeyLimits, SandboxService, ServiceConfig};
pub use template::Template;

/// What can go wrong in the sandbox service.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// Settings that cannot work.
    #[error("invalid sandbox settings: {0}")]
    InvalidConfig(String),
    /// The isolation backend cannot run here, or failed to start a sandbox.
    #[error("sandboxes unavailable: {0}")]
    Unavailable(String),
    /// No such sandbox or template (for this caller).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A limit (per key or per server) is reached.
    #[error("{0}")]
    Exhausted(String),
    /// The sandbox is not in the state the call needs (pausing a paused one).
    #[error("{0}")]
    Conflict(String),
}

impl SandboxError {
    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_) => "invalid_config",
            Self::Unavailable(_) => "unavailable",
            Self::NotFound(_) => "not_found",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Exhausted(_) => "exhausted",
            Self::Conflict(_) => "conflict",
        }
    }

    /// The HTTP status of the control plane for it.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidConfig(_) | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Self::Exhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Conflict(_) => StatusCode::CONFLICT,
        }
    }
}

/// Everything needed to start the service.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Which isolation backend.
    pub backend: BackendKind,
    /// The agent to run inside each sandbox.
    pub agent: AgentCommand,
    /// Refuse to start without memory, pids and cpu cgroup controllers.
    pub require_limits: bool,
    /// The service's own settings.
    pub service: ServiceConfig,
    /// The firecracker backend's settings.
    pub firecracker: backend::firecracker::FirecrackerConfig,
    /// Offer internet access to sandboxes that ask for it, with these ranges exempted from
    /// what is always refused (`None`: no sandbox gets a network).
    pub egress: Option<Vec<backend::egress::Ipv4Net>>,
}

impl SandboxConfig {
    /// Defaults around `agent`.
    pub fn new(agent: AgentCommand) -> Self {
        Self {
            backend: BackendKind::Bwrap,
            agent,
            require_limits: true,
            service: ServiceConfig::default(),
            firecracker: Default::default(),
            egress: None,
        }
    }
}

/// Starts the backend (proving it works here) and the service.
pub fn start(config: SandboxConfig) -> Result<Arc<SandboxService>, SandboxError> {
    let backend: Arc<dyn backend::IsolationBackend> = match config.backend {
        BackendKind::Bwrap => {
            let mut b = backend::bwrap::BwrapConfig::new(config.agent.clone());
            b.require_limits = config.require_limits;
            b.egress = config
                .egress
                .clone()
                .map(|exempt| backend::egress::Egress::probe(exempt, b.host_user))
                .transpose()?;
            Arc::new(backend::bwrap::Bwrap::start(b)?)
        }
        BackendKind::Firecracker => Arc::new(backend::firecracker::Firecracker::start(
            config.firecracker.clone(),
        )?),
    };
    SandboxService::start(backend, config.service)
}
