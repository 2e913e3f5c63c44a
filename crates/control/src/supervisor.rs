//! Where replicas run. [`ReplicaBackend`] starts one replica of a deployment and hands back a
//! [`StartedReplica`]: a signal with its address once it listens, a signal when it exits, and a
//! way to stop it. The controller needs nothing else, so a Kubernetes backend (a pod per
//! replica, whose address is known once it is scheduled) fits the same interface.
//!
//! [`LocalProcesses`] runs each replica as a child process of this binary
//! (`lastmile serve --port 0 --model ...`, which reports the port it bound), started by
//! [`crate::launcher`]: without the parent's secrets, its output on the parent's stderr behind
//! the deployment's name, and dying with its parent (`PR_SET_PDEATHSIG`), so a killed control
//! plane leaves no orphan replicas behind.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::launcher::{Launch, Output};
use crate::ControlError;

pub use crate::launcher::Stop;

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

/// A replica that has been started (it may not be listening yet).
pub struct StartedReplica {
    /// Its identity in the backend (a process id, a pod name).
    pub id: String,
    /// Resolves with its base URL once it listens; closed if it never does (it exited: then
    /// `exited` resolves).
    pub listening: oneshot::Receiver<String>,
    /// Resolves with how it ended when it exits, for whatever reason.
    pub exited: oneshot::Receiver<String>,
    stop: Box<dyn Fn(Stop) + Send + Sync>,
}

impl StartedReplica {
    /// A replica as a backend describes it.
    pub fn new(
        id: String,
        listening: oneshot::Receiver<String>,
        exited: oneshot::Receiver<String>,
        stop: impl Fn(Stop) + Send + Sync + 'static,
    ) -> Self {
        Self {
            id,
            listening,
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
    /// Starts one replica of `spec` (returns once it exists, before it listens).
    fn start(&self, spec: &ReplicaSpec) -> Result<StartedReplica, ControlError>;
}

/// Replicas as child processes of `exe` (this binary), each listening on a port it picks.
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

impl ReplicaBackend for LocalProcesses {
    /// Must be called within a tokio runtime.
    fn start(&self, spec: &ReplicaSpec) -> Result<StartedReplica, ControlError> {
        let mut command: Vec<std::ffi::OsString> = vec!["serve".into(), "--model".into()];
        command.push(spec.model.clone().into());
        for arg in [
            "--served-model-name",
            &spec.deployment,
            "--threads",
            &spec.threads.to_string(),
        ]
        .into_iter()
        .chain(spec.args.iter().map(String::as_str))
        {
            command.push(arg.into());
        }
        let launch = Launch {
            host: self.host.clone(),
            // Its own process group: a Ctrl-C at the terminal reaches the control plane, which
            // stops replicas in order, not every replica at once behind its back.
            own_process_group: true,
            ..Launch::new(&self.exe, command).output(Output::Prefixed(spec.deployment.clone()))
        };
        let worker = launch.spawn().map_err(|e| ControlError::Start {
            deployment: spec.deployment.clone(),
            message: e.to_string(),
        })?;
        let (listening_tx, listening) = oneshot::channel();
        let (exited_tx, exited) = oneshot::channel();
        let watch = worker.watch();
        tokio::spawn(async move {
            // The controller applies its own ready timeout: no limit here.
            if let Ok(url) = watch.clone().listening(Duration::MAX).await {
                let _ = listening_tx.send(url);
            }
        });
        let watch = worker.watch();
        tokio::spawn(async move {
            let _ = exited_tx.send(watch.exited().await);
        });
        Ok(StartedReplica::new(
            worker.pid().to_string(),
            listening,
            exited,
            // The closure owns the worker: dropping the replica kills the process.
            move |how| worker.stop(how),
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
