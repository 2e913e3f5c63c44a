//! What the agent does differently as a microVM's first process: prepares the guest, and
//! listens on vsock.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::backend::bwrap::{HOME, SANDBOX_UID};

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let (source, t, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: every pointer is a valid NUL-terminated string for the call's duration.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            t.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("mounting {target}: {e}")))
}

/// Mounts what a guest needs (the root image stays read-only; home, `/tmp` and `/dev/shm`
/// are tmpfs), then forks: pid 1 stays behind to reap orphans and powers the guest off when
/// the agent ends; the child goes on as the agent.
pub(super) fn init() -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    mount("proc", "/proc", "proc", nosuid | libc::MS_NOEXEC, "")?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        nosuid | libc::MS_NOEXEC | libc::MS_RDONLY,
        "",
    )?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount("tmpfs", "/tmp", "tmpfs", nosuid, "mode=1777")?;
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid, "mode=1777")?;
    mount(
        "tmpfs",
        HOME,
        "tmpfs",
        nosuid,
        &format!("mode=0755,uid={SANDBOX_UID},gid={SANDBOX_UID}"),
    )?;
    // SAFETY: sethostname reads the given bytes; fork has no preconditions here (one
    // thread so far).
    unsafe {
        libc::sethostname(b"sandbox".as_ptr().cast(), 7);
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(()),
            agent => loop {
                let mut status = 0;
                let pid = libc::waitpid(-1, &mut status, 0);
                if pid == agent
                    || (pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
                {
                    libc::sync();
                    libc::reboot(libc::RB_POWER_OFF);
                    libc::_exit(0);
                }
            },
        }
    }
}

/// A listening vsock socket on `port` (any CID).
pub(super) fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket returns a new descriptor or -1.
    let fd: RawFd =
        unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; the fields are then set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::bind(fd, (&raw const addr).cast(), len) })?;
    // SAFETY: a bound stream socket.
    check(unsafe { libc::listen(fd, 4) })?;
    Ok(sock)
}

/// The next host connection.
pub(super) fn accept(listener: &OwnedFd) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: accepting on our listening socket; no address wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor, ours.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
