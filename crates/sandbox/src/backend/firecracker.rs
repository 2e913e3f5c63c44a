//! The `firecracker` backend: a microVM per sandbox, for hosts where `/dev/kvm` boots guests.
//!
//! What exists today is its start-up check, so that choosing it on a host that cannot run it
//! fails at once with the reason instead of at the first sandbox: the `firecracker` binary,
//! a readable and writable `/dev/kvm`, a guest kernel and root file system, and a KVM
//! that really creates a VM with a vCPU (nested KVM on a Firecracker guest opens `/dev/kvm`
//! but cannot run one). Booting the guest and speaking to its agent over vsock is the next
//! step; until then `launch` refuses.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::{IsolationBackend, LaunchSpec, Launched};
use crate::SandboxError;

/// `KVM_CREATE_VM` and `KVM_CREATE_VCPU` from `linux/kvm.h`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// What the backend needs.
#[derive(Clone, Debug)]
pub struct FirecrackerConfig {
    /// The `firecracker` executable.
    pub program: PathBuf,
    /// The guest kernel (an uncompressed `vmlinux`).
    pub kernel: Option<PathBuf>,
    /// The guest root file system image (ext4), with the agent inside.
    pub rootfs: Option<PathBuf>,
    /// The KVM device.
    pub kvm: PathBuf,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            program: PathBuf::from("firecracker"),
            kernel: None,
            rootfs: None,
            kvm: PathBuf::from("/dev/kvm"),
        }
    }
}

/// The backend (after a successful check).
#[derive(Debug)]
pub struct Firecracker {
    config: FirecrackerConfig,
}

impl Firecracker {
    /// Checks everything a microVM needs here, and says the first thing missing.
    pub fn start(config: FirecrackerConfig) -> Result<Self, SandboxError> {
        check(
            &config,
            find_program(&config.program).is_some(),
            kvm_runs_a_vcpu(&config.kvm),
        )?;
        Ok(Self { config })
    }
}

/// The decision alone (pure, for tests).
fn check(
    config: &FirecrackerConfig,
    program_found: bool,
    kvm: Result<(), String>,
) -> Result<(), SandboxError> {
    let no = |m: String| {
        Err(SandboxError::Unavailable(format!(
            "firecracker backend: {m}"
        )))
    };
    kvm.or_else(|e| no(format!("{e}; use the bwrap backend on this host")))?;
    if !program_found {
        return no(format!(
            "no `{}` executable on PATH",
            config.program.display()
        ));
    }
    match (&config.kernel, &config.rootfs) {
        (Some(k), Some(r)) if k.is_file() && r.is_file() => {}
        _ => return no("a guest kernel and root file system must be given".into()),
    }
    no("booting microVMs is not implemented yet; use the bwrap backend".into())
}

fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(p))
        .find(|c| c.is_file())
}

/// Opens the KVM device and creates a VM with one vCPU: what nested KVM here cannot do.
fn kvm_runs_a_vcpu(dev: &Path) -> Result<(), String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
    // SAFETY: plain KVM ioctls on descriptors we own; results are checked.
    unsafe {
        if libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) != 12 {
            return Err("KVM API version is not 12".into());
        }
        let vm = libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0);
        if vm < 0 {
            return Err(format!(
                "KVM cannot create a VM: {}",
                std::io::Error::last_os_error()
            ));
        }
        let vcpu = libc::ioctl(vm, KVM_CREATE_VCPU, 0);
        let err = std::io::Error::last_os_error();
        libc::close(vm);
        if vcpu < 0 {
            return Err(format!("KVM cannot create a vCPU: {err}"));
        }
        libc::close(vcpu);
    }
    Ok(())
}

impl IsolationBackend for Firecracker {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn describe(&self) -> String {
        format!("firecracker: {}", self.config.program.display())
    }

    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<Launched, SandboxError> {
        if spec.network.is_some() {
            return Err(SandboxError::InvalidArgument(
                "internet access is not offered by the firecracker backend yet".into(),
            ));
        }
        Err(SandboxError::Unavailable(
            "booting microVMs is not implemented yet".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_first_what_stops_it() {
        let c = FirecrackerConfig::default();
        let e = check(&c, true, Err("cannot open /dev/kvm: No such file".into())).unwrap_err();
        assert!(e.to_string().contains("/dev/kvm") && e.to_string().contains("bwrap"));
        let e = check(&c, false, Ok(())).unwrap_err();
        assert!(e.to_string().contains("executable"));
        let e = check(&c, true, Ok(())).unwrap_err();
        assert!(e.to_string().contains("kernel"));
    }

    #[test]
    fn this_host_is_checked_without_hanging() {
        // Wherever the tests run, the check answers (here: no usable KVM, or not implemented).
        let r = Firecracker::start(FirecrackerConfig::default());
        assert!(r.is_err());
    }
}
