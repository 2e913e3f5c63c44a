//! Where replicas run. [`ReplicaBackend`] starts one replica of a deployment and hands back a
//! [`StartedReplica`]: its address, a signal when it exits, and a way to stop it. The controller
//! needs nothing else, so a Kubernetes backend (a pod per replica) fits the same interface.
//!
//! [`LocalProcesses`] runs each replica as a child process of this binary
//! (`lastmile serve --port P --model ...`) on a free local port, started by
//! [`crate::launcher`]: without the parent's secrets, and dying with their parent
//! (`PR_SET_PDEATHSIG`), so a killed control plane leaves no orphan replicas behind.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::ControlError;

/// What one replica of a deployment runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSpec {
    /// The deployment (the model id the replica serves).
    pub deployment: String,
    /// The model file or folder.
    pub model: PathBuf,
    /// Compute threads.
    pub threads: usize,
    /// Extra `lastmile serve` options.
    pub args: Vec<String>,
}

/// How to stop a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Finish in-flight requests, then exit (SIGTERM).
    Graceful,
    /// Now (SIGKILL).
    Kill,
}

/// A replica that has been started (it may not be ready yet).
pub struct StartedReplica {
    /// Its identity in the backend (a process id, a pod name).
    pub id: String,
    /// Its base URL.
    pub url: String,
    /// Resolves with how it ended when it exits, for whatever reason.
    pub exited: oneshot::Receiver<String>,
    stop: Box<dyn Fn(Stop) + Send + Sync>,
}

impl StartedReplica {
    /// A replica as a backend describes it.
    pub fn new(
        id: String,
        url: String,
        exited: oneshot::Receiver<String>,
        stop: impl Fn(Stop) + Send + Sync + 'static,
    ) -> Self {
        Self {
            id,
            url,
            exited,
            stop: Box::new(stop),
        }
    }

    /// Asks it to stop; its `exited` resolves once it has.
    pub fn stop(&self, how: Stop) {
        (self.stop)(how)
    }
}

/// Starts replicas.
pub trait ReplicaBackend: Send + Sync + 'static {
    /// Starts one replica of `spec` (returns once it exists, before it is ready).
    fn start(&self, spec: &ReplicaSpec) -> Result<StartedReplica, ControlError>;
}

/// Replicas as child processes of `exe` (this binary) listening on free local ports.
pub struct LocalProcesses {
    /// The `lastmile` binary.
    pub exe: PathBuf,
    /// Host the replicas listen on.
    pub host: String,
}

impl LocalProcesses {
    /// Runs replicas with the binary at `exe` on 127.0.0.1.
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            host: "127.0.0.1".into(),
        }
    }
}

fn free_port(host: &str) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

impl ReplicaBackend for LocalProcesses {
    fn start(&self, spec: &ReplicaSpec) -> Result<StartedReplica, ControlError> {
        let fail = |message: String| ControlError::Start {
            deployment: spec.deployment.clone(),
            message,
        };
        let port = free_port(&self.host).map_err(|e| fail(format!("no free port: {e}")))?;
        let mut cmd = crate::launcher::worker_command(&self.exe);
        cmd.arg("serve")
            .args(["--host", &self.host, "--port", &port.to_string()])
            .arg("--model")
            .arg(&spec.model)
            .args(["--served-model-name", &spec.deployment])
            .args(["--threads", &spec.threads.to_string()])
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C at the terminal reaches the control plane, which
            // stops replicas in order, not every replica at once behind its back.
            .process_group(0);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("spawning {}: {e}", self.exe.display())))?;
        let pid = child.id().unwrap_or(0);
        let (tx, exited) = oneshot::channel();
        let reaped = Arc::new(AtomicBool::new(false));
        let reaped_by_waiter = reaped.clone();
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("lost: {e}"),
            };
            reaped_by_waiter.store(true, Ordering::SeqCst);
            let _ = tx.send(how);
        });
        let stop = move |how: Stop| {
            let signal = match how {
                Stop::Graceful => libc::SIGTERM,
                Stop::Kill => libc::SIGKILL,
            };
            if pid != 0 && !reaped.load(Ordering::SeqCst) {
                // SAFETY: kill(2) on our own child's pid, which cannot have been reused: the
                // child is reaped only by the waiter task, which sets `reaped` right after.
                unsafe {
                    libc::kill(pid as libc::pid_t, signal);
                }
            }
        };
        Ok(StartedReplica::new(
            pid.to_string(),
            format!("http://{}:{port}", self.host),
            exited,
            stop,
        ))
    }
}

/// Polls `url`'s `/health` every 2 ms until it answers 200 (refused connections cost
/// microseconds while the replica loads); `false` after `limit`.
pub async fn wait_healthy(client: &reqwest::Client, url: &str, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let health = format!("{url}/health");
    while tokio::time::Instant::now() < deadline {
        let ok = client
            .get(&health)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}
