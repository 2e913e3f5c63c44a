//! The `firecracker` backend: a microVM per sandbox, for hosts where `/dev/kvm` boots guests.
//!
//! Each sandbox is one `firecracker --no-api --config-file` process: the template's resources
//! as its vCPUs and memory, the guest kernel, the root image read-only (the agent mounts tmpfs
//! home, `/tmp` and `/dev/shm` in the guest), and a vsock device whose host end is a Unix
//! socket in the sandbox's scratch folder. The kernel starts lastmile's agent as the guest's
//! first process (`init=/usr/bin/lastmile sandbox-agent --vsock 1024 --init`: the root image
//! carries the lastmile binary); the host reaches it through Firecracker's vsock muxer
//! (`CONNECT 1024\n` → `OK <port>\n`) and speaks the same framed protocol as with bubblewrap.
//!
//! Starting the backend checks, in order, and says the first thing missing: a KVM that really
//! creates a VM with a vCPU (nested KVM on a Firecracker guest opens `/dev/kvm` but cannot run
//! one), the `firecracker` binary, the guest kernel and root image, and finally a probe guest
//! that must boot and answer on vsock within a deadline.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{IsolationBackend, LaunchSpec, Launched};
use crate::agent::VSOCK_PORT;
use crate::template::Template;
use crate::SandboxError;

/// Where the guest finds lastmile (in its root image).
const GUEST_LASTMILE: &str = "/usr/bin/lastmile";
/// How long a guest may take to boot and answer on vsock.
const BOOT_DEADLINE: Duration = Duration::from_secs(10);

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
    /// Where each sandbox's scratch folder (VM config, sockets, log) goes.
    pub state_dir: PathBuf,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            program: PathBuf::from("firecracker"),
            kernel: None,
            rootfs: None,
            kvm: PathBuf::from("/dev/kvm"),
            state_dir: std::env::temp_dir().join("lastmile-firecracker"),
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
        let program = find_program(&config.program);
        check(&config, program.is_some(), kvm_runs_a_vcpu(&config.kvm))?;
        let mut config = config;
        config.program = program.unwrap_or(config.program);
        let fc = Self { config };
        fc.probe()?;
        Ok(fc)
    }

    /// Boots a guest from the configured kernel and image and waits for its agent (within
    /// [`BOOT_DEADLINE`]): what a KVM that creates vCPUs but cannot run a guest fails.
    fn probe(&self) -> Result<(), SandboxError> {
        let template = Template {
            memory_mb: 128,
            cpus: 1.0,
            ..crate::template::builtin().remove(0)
        };
        let id = format!("probe-{}", std::process::id());
        let booted = self.boot(&id, &template);
        let dir = self.config.state_dir.join(&id);
        let log = std::fs::read_to_string(dir.join("firecracker.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        match booted {
            Ok((mut child, _sock)) => {
                let _ = child.start_kill();
                Ok(())
            }
            Err(e) => Err(SandboxError::Unavailable(format!(
                "firecracker backend: a probe guest did not boot: {e}{}; use the bwrap backend \
                 on this host",
                tail(&log)
            ))),
        }
    }

    /// Starts a microVM for sandbox `id` and connects to its agent; returns firecracker's
    /// process and the agent's socket.
    fn boot(&self, id: &str, t: &Template) -> Result<(tokio::process::Child, UnixStream), String> {
        let dir = self.config.state_dir.join(id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (Some(kernel), Some(rootfs)) = (&self.config.kernel, &self.config.rootfs) else {
            return Err("no guest kernel and root image".into());
        };
        let vsock = dir.join("vsock");
        let config = vm_config(kernel, rootfs, &vsock, t);
        let config_path = dir.join("vm.json");
        std::fs::write(&config_path, config.to_string()).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("firecracker.log")).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(&self.config.program);
        cmd.arg("--no-api")
            .arg("--config-file")
            .arg(&config_path)
            .args(["--id", id])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // The VM dies with lastmile.
        lastmile_process::die_with_parent(&mut cmd);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting firecracker: {e}"))?;
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("firecracker exited ({status})"));
            }
            match connect_agent(&vsock, VSOCK_PORT) {
                Ok(sock) => return Ok((child, sock)),
                Err(e) if Instant::now() > deadline => {
                    let _ = child.start_kill();
                    return Err(format!(
                        "its agent did not answer on vsock within {} s ({e})",
                        BOOT_DEADLINE.as_secs()
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The last lines of a log, for an error message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().rev().take(3).collect();
    if lines.is_empty() {
        String::new()
    } else {
        let mut l = lines;
        l.reverse();
        format!(" (firecracker: {})", l.join(" | "))
    }
}

/// Firecracker's configuration of one sandbox's VM.
fn vm_config(kernel: &Path, rootfs: &Path, vsock: &Path, t: &Template) -> Value {
    json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": format!(
                "console=ttyS0 reboot=k panic=1 pci=off quiet ro init={GUEST_LASTMILE} -- \
                 sandbox-agent --vsock {VSOCK_PORT} --init"
            ),
        },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": rootfs,
            "is_root_device": true,
            "is_read_only": true,
        }],
        "machine-config": {
            "vcpu_count": (t.cpus.ceil() as u64).clamp(1, 32),
            "mem_size_mib": t.memory_mb.max(128),
            "smt": false,
        },
        "vsock": {"guest_cid": 3, "uds_path": vsock},
    })
}

/// Connects to the guest's vsock `port` through Firecracker's muxer at `uds`:
/// `CONNECT <port>\n`, answered `OK <host port>\n` once the guest listens.
pub fn connect_agent(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut sock = UnixStream::connect(uds)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the answer byte by byte: what follows the line belongs to the agent.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match std::io::Read::read(&mut sock, &mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "the vsock muxer answered {:?}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    sock.set_read_timeout(None)?;
    Ok(sock)
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
        (Some(k), Some(r)) if k.is_file() && r.is_file() => Ok(()),
        _ => no(
            "a guest kernel (--sandbox-kernel) and root image with lastmile in it \
             (--sandbox-rootfs-image) must be given"
                .into(),
        ),
    }
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
        if !spec.envs.is_empty() {
            // The guest agent takes the environment per process; sandbox-wide variables are
            // not passed into the guest yet.
            return Err(SandboxError::InvalidArgument(
                "envVars are not supported by the firecracker backend yet: pass them per command"
                    .into(),
            ));
        }
        let (child, sock) = self
            .boot(spec.id, spec.template)
            .map_err(|e| SandboxError::Unavailable(format!("starting the microVM: {e}")))?;
        Ok(Launched {
            child,
            agent_socket: Some(sock),
            scratch: Some(self.config.state_dir.join(spec.id)),
            cgroup: None,
            helpers: Vec::new(),
        })
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
    fn a_vm_boots_the_agent_as_init_with_the_templates_resources() {
        let t = Template {
            cpus: 1.5,
            memory_mb: 512,
            ..crate::template::builtin().remove(0)
        };
        let v = vm_config(
            Path::new("/k/vmlinux"),
            Path::new("/k/root.ext4"),
            Path::new("/s/vsock"),
            &t,
        );
        let args = v["boot-source"]["boot_args"].as_str().unwrap();
        assert!(
            args.contains("init=/usr/bin/lastmile -- sandbox-agent --vsock 1024 --init"),
            "{args}"
        );
        assert!(
            args.contains(" ro "),
            "the root image is mounted read-only: {args}"
        );
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k/vmlinux");
        assert_eq!(v["drives"][0]["path_on_host"], "/k/root.ext4");
        assert_eq!(v["drives"][0]["is_read_only"], true);
        assert_eq!(v["machine-config"]["vcpu_count"], 2);
        assert_eq!(v["machine-config"]["mem_size_mib"], 512);
        assert_eq!(v["vsock"]["uds_path"], "/s/vsock");
    }

    #[test]
    fn the_agent_is_reached_through_the_vsock_muxer_handshake() {
        // A stand-in for Firecracker's muxer, speaking its documented handshake.
        let dir = std::env::temp_dir().join(format!("lastmile-fc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock");
        let _ = std::fs::remove_file(&uds);
        let listener = std::os::unix::net::UnixListener::bind(&uds).unwrap();
        let muxer = std::thread::spawn(move || {
            for answer in ["OK 1073741824\n", ""] {
                let (mut s, _) = listener.accept().unwrap();
                let mut asked = [0u8; 13];
                std::io::Read::read_exact(&mut s, &mut asked).unwrap();
                assert_eq!(&asked, b"CONNECT 1024\n");
                s.write_all(answer.as_bytes()).unwrap();
                if !answer.is_empty() {
                    s.write_all(b"agent bytes").unwrap();
                }
            }
        });
        let mut sock = connect_agent(&uds, 1024).expect("connected");
        let mut got = [0u8; 11];
        std::io::Read::read_exact(&mut sock, &mut got).unwrap();
        assert_eq!(
            &got, b"agent bytes",
            "what follows the OK line is the agent's"
        );
        // A guest not listening yet: the muxer closes; the caller retries.
        assert!(connect_agent(&uds, 1024).is_err());
        muxer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_firecracker_that_exits_fails_the_boot_with_its_reason() {
        let dir = std::env::temp_dir().join(format!("lastmile-fc-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, r) = (dir.join("vmlinux"), dir.join("rootfs"));
        std::fs::write(&k, b"").unwrap();
        std::fs::write(&r, b"").unwrap();
        let fc = Firecracker {
            config: FirecrackerConfig {
                program: PathBuf::from("/bin/false"),
                kernel: Some(k),
                rootfs: Some(r),
                state_dir: dir.clone(),
                ..Default::default()
            },
        };
        let t = crate::template::builtin().remove(0);
        let e = fc.boot("x", &t).expect_err("no VM");
        assert!(e.contains("firecracker exited"), "{e}");
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("x/vm.json")).unwrap()).unwrap();
        assert!(cfg["boot-source"]["boot_args"]
            .as_str()
            .unwrap()
            .contains("--vsock 1024"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_host_is_checked_without_hanging() {
        // Wherever the tests run, the check answers (here: no usable KVM, or not implemented).
        let r = Firecracker::start(FirecrackerConfig::default());
        assert!(r.is_err());
    }
}
