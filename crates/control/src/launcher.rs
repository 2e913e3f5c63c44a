//! The one way this binary starts its own worker processes (replicas of `serve --config`, the
//! children of `serve --workers N`): a command for `exe` that inherits no secret from the
//! environment and dies with its parent.
//!
//! Invariants: a child never sees the admin key or any credential of its parent (a replica
//! given `LASTMILE_ADMIN_KEY` would read it as its own `--admin-key` and refuse to start, and
//! a replica has no use for credentials it could leak); on Linux a child is killed when the
//! process that started it dies, even by `kill -9` (`PR_SET_PDEATHSIG`), and refuses to start
//! if that process is already gone.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

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
    die_with_parent(&mut cmd);
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

/// Has the child of `cmd` receive SIGKILL when this process dies.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec and only calls prctl and getppid, which are
    // async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the line above: nothing would kill us later.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the parent process is gone"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

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
