//! lastmile's control plane: deployments declared in YAML (`deployments`), the autoscaler's
//! arithmetic (`autoscaler`), replicas run as local processes and restarted when they crash
//! (`supervisor`, through the one process launcher, `launcher`), and the controller that ties
//! them to the gateway's load (`controller`), with its read-only admin API (`admin`).
//!
//! The gateway does not depend on this crate: the controller sees the gateway through the
//! [`controller::Balancer`] trait (load per deployment, replicas in and out of rotation), which
//! the binary implements over the gateway's handle.
#![warn(missing_docs)]

pub mod admin;
pub mod autoscaler;
pub mod controller;
pub mod deployments;
pub mod launcher;
pub mod supervisor;

use thiserror::Error;

/// A mutex's guard, also after a thread panicked holding it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the control plane can fail at.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The deployments file is invalid; `at` is `file:line:column`.
    #[error("{at}: {message}")]
    Config {
        /// Where: `file:line:column`.
        at: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A replica could not be started.
    #[error("starting a replica of {deployment}: {message}")]
    Start {
        /// The deployment.
        deployment: String,
        /// Why.
        message: String,
    },
    /// A server process could not be started.
    #[error("starting {exe}: {message}")]
    Launch {
        /// The binary.
        exe: String,
        /// Why.
        message: String,
    },
    /// A server process exited before it reported the address it listens at.
    #[error("{exe} exited before it listened ({status}); the end of its stderr:\n{stderr}")]
    ExitedEarly {
        /// The binary.
        exe: String,
        /// How it ended (`exit status: 1`).
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// A server process did not report an address in time.
    #[error("{exe} did not listen within {after:?}; the end of its stderr:\n{stderr}")]
    NotListening {
        /// The binary.
        exe: String,
        /// How long it was given.
        after: std::time::Duration,
        /// The last lines of its stderr.
        stderr: String,
    },
}

impl ControlError {
    /// A short label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Config { .. } => "invalid_config",
            Self::Start { .. } => "replica_start_failed",
            Self::Launch { .. } => "launch_failed",
            Self::ExitedEarly { .. } => "exited_early",
            Self::NotListening { .. } => "not_listening",
        }
    }
}
