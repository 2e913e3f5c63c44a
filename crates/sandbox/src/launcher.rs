//! The threads sandboxes are launched from.
//!
//! Backends start their processes with `PR_SET_PDEATHSIG`, so that a sandbox dies with lastmile
//! even when lastmile is killed outright. Linux sends that signal when the *thread* that forked
//! the child exits, not the process: a sandbox launched from tokio's blocking pool was killed as
//! soon as that pool let its thread go (10 s idle), whatever its timeout. These threads live as
//! long as the process, so a sandbox now lives exactly as long as its timeout or lastmile.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads that never exit, running launch jobs.
pub(crate) struct Launcher {
    jobs: Mutex<Sender<Job>>,
}

impl Launcher {
    /// `threads` launch threads, inside `runtime` (backends use tokio's process API).
    pub(crate) fn new(threads: usize, runtime: tokio::runtime::Handle) -> Self {
        let (tx, rx) = channel::<Job>();
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let (rx, runtime) = (rx.clone(), runtime.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("sandbox-launch-{i}"))
                .spawn(move || {
                    let _rt = runtime.enter();
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(e) => e.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            // Only when the launcher is gone: its sandboxes went with it.
                            Err(_) => park_forever(),
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("starting a sandbox launch thread: {e}");
            }
        }
        Self {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on a launch thread; its result, or `None` if no thread could run it.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .is_ok();
        if !sent {
            return None;
        }
        rx.await.ok()
    }
}

/// A launch thread outlives its launcher: the processes it forked die when it exits.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}
