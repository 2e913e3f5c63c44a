//! How lastmile starts the processes it owns — server replicas (`lastmile-control`'s launcher)
//! and sandboxes (`lastmile-sandbox`'s backends) — so that none outlives lastmile.
//!
//! Two rules, both about `PR_SET_PDEATHSIG`, the Linux signal a child gets when its parent dies:
//! - Linux sends it when the **thread** that forked the child exits, not the process. A child
//!   forked from tokio's blocking pool was killed as soon as the pool let that thread go (10 s
//!   idle). Children are forked on [`launch`]'s threads, which live as long as the process.
//! - The parent may die between `fork` and the `prctl` call; the child then has no parent to
//!   outlive and would run forever. [`arm_parent_death`] checks for that and fails the exec.

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// In a forked child before `exec`: asks for SIGKILL when the thread that forked it exits, and
/// fails with `ESRCH` if `parent` (the pid of the process that forked, read before the fork) is
/// already gone.
///
/// Call it **last** in a `pre_exec` closure: Linux clears the parent-death signal when the
/// effective user or group changes, so arming it before [`switch_user`] would be undone.
/// Async-signal-safe (it calls only `prctl` and `getppid`).
pub fn arm_parent_death(parent: u32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments and getppid touch no memory of ours.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                // ESRCH, "no such process": an exec fails with an errno, nothing richer.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
    Ok(())
}

/// In a forked child before `exec`: becomes user `uid` and group `gid`, with no supplementary
/// groups. Async-signal-safe (`setgroups`, `setgid`, `setuid`); follow it with
/// [`arm_parent_death`].
pub fn switch_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: these calls take integers and a null list and touch no memory of ours.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Has the child of `cmd` receive SIGKILL when lastmile dies (see [`arm_parent_death`]).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child and only calls arm_parent_death, which is
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || arm_parent_death(parent));
    }
}

/// Threads that run launch jobs and never exit (see the crate's documentation): launches at
/// once (a sandbox's launch waits for its agent to answer, so a few run side by side).
const LAUNCH_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// The process's launch threads, started on first use.
struct LaunchThreads {
    jobs: Mutex<Sender<Job>>,
}

impl LaunchThreads {
    fn start(threads: usize) -> Self {
        let (tx, rx) = channel::<Job>();
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lastmile-launch-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        // A panicking job must not take the thread (and its children) along.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        // The sender lives in a static: never, but never exit either.
                        Err(_) => std::thread::park(),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("starting a launch thread: {e}");
            }
        }
        Self {
            jobs: Mutex::new(tx),
        }
    }

    fn send(&self, job: Job) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .is_ok()
    }
}

fn threads() -> &'static LaunchThreads {
    static THREADS: OnceLock<LaunchThreads> = OnceLock::new();
    THREADS.get_or_init(|| LaunchThreads::start(LAUNCH_THREADS))
}

/// Wraps `f` to run inside `runtime` (if any), so that it may use tokio's process API.
fn in_runtime<T>(
    runtime: Option<tokio::runtime::Handle>,
    f: impl FnOnce() -> T,
) -> impl FnOnce() -> T {
    move || {
        let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
        f()
    }
}

/// Runs `f` — which forks children — on a launch thread, inside the caller's tokio runtime when
/// there is one, and waits for its result; `None` if no launch thread could run it (none could
/// be started, or `f` panicked).
///
/// Blocks the calling thread for as long as `f` runs: keep `f` to the fork and what must
/// happen on the forking thread. From async code prefer [`launch_async`].
pub fn launch<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = channel();
    let f = in_runtime(tokio::runtime::Handle::try_current().ok(), f);
    if !threads().send(Box::new(move || {
        let _ = tx.send(f());
    })) {
        return None;
    }
    rx.recv().ok()
}

/// [`launch`] for async callers: the caller's task waits, its thread does not.
pub async fn launch_async<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let f = in_runtime(tokio::runtime::Handle::try_current().ok(), f);
    if !threads().send(Box::new(move || {
        let _ = tx.send(f());
    })) {
        return None;
    }
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether process `pid` is gone (or a zombie).
    fn is_dead(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    fn sleeper() -> std::process::Command {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        die_with_parent(&mut cmd);
        cmd
    }

    #[test]
    fn a_child_forked_by_a_short_lived_thread_outlives_that_thread() {
        // The failure this crate exists for: fork from a thread that then exits.
        let mut child = std::thread::spawn(|| launch(|| sleeper().spawn()))
            .join()
            .expect("thread")
            .expect("a launch thread ran it")
            .expect("spawned");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!is_dead(child.id()), "killed with the thread that asked");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    #[test]
    fn the_same_child_forked_by_that_thread_itself_dies_with_it() {
        // The control: without launch threads the child goes when its forking thread exits.
        let mut child = std::thread::spawn(|| sleeper().spawn())
            .join()
            .expect("thread")
            .expect("spawned");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_dead(child.id()) {
            assert!(Instant::now() < deadline, "PDEATHSIG never came");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().expect("reap");
    }

    #[test]
    fn a_child_whose_parent_is_already_gone_refuses_to_start() {
        // A parent pid that is not ours stands for a parent that died before prctl.
        let mut cmd = std::process::Command::new("true");
        // SAFETY: as in die_with_parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || arm_parent_death(1));
        }
        let err = cmd.spawn().expect_err("must not start");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }

    /// Waits up to `wait` for `pid` to die; whether it did.
    fn dies_within(pid: u32, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while !is_dead(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// `sleep 30` as user nobody, forked by a thread that exits at once, with `arm_first`
    /// choosing the order of the two pre-exec steps; whether it died with that thread.
    fn dies_with_its_thread_as_nobody(arm_first: bool, wait: Duration) -> bool {
        let mut child = std::thread::spawn(move || {
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("30");
            let parent = std::process::id();
            // SAFETY: both steps are async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if arm_first {
                        arm_parent_death(parent)?;
                        switch_user(65534, 65534)
                    } else {
                        switch_user(65534, 65534)?;
                        arm_parent_death(parent)
                    }
                });
            }
            cmd.spawn()
        })
        .join()
        .expect("thread")
        .expect("spawned");
        let died = dies_within(child.id(), wait);
        let _ = child.kill();
        let _ = child.wait();
        died
    }

    #[test]
    fn armed_after_switching_user_the_signal_holds() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: switching user needs root");
            return;
        }
        assert!(
            dies_with_its_thread_as_nobody(false, Duration::from_secs(10)),
            "armed last: the child dies with its forking thread"
        );
        // The reason for the order: the kernel forgets a signal armed before the switch.
        assert!(
            !dies_with_its_thread_as_nobody(true, Duration::from_secs(1)),
            "armed first, the switch clears it (if this kernel keeps it, the order is moot)"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn tokio_children_can_be_forked_from_async_code() {
        let mut child = launch_async(|| {
            let mut cmd = tokio::process::Command::from(sleeper());
            cmd.kill_on_drop(true);
            cmd.spawn()
        })
        .await
        .expect("a launch thread ran it")
        .expect("spawned");
        let pid = child.id().expect("running");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!is_dead(pid));
        child.kill().await.expect("kill");
    }

    #[test]
    fn a_panicking_job_leaves_the_launch_threads_working() {
        for _ in 0..LAUNCH_THREADS + 1 {
            assert_eq!(launch(|| -> u8 { panic!("boom") }), None);
        }
        assert_eq!(launch(|| 7), Some(7));
    }
}
