//! Opt-in internet access for a namespace sandbox: `slirp4netns` gives its network namespace a
//! `tap0` device routed through a user-mode TCP/IP stack on the host (no privileges, no host
//! routing or NAT rules), and an nftables filter *inside* that namespace decides where packets
//! may go. The sandbox's processes hold no capability there, so they can neither change the
//! filter nor the device.
//!
//! What is always refused (the server's policy, which no client can lift): the host's own
//! loopback (`--disable-host-loopback`) and addresses, private, link-local (cloud metadata at
//! 169.254.169.254), shared, multicast and reserved IPv4 ranges, and all IPv6 — except the
//! ranges the operator exempts (`--sandbox-egress-allow`, an internal package mirror, say).
//! Within that, a client narrows it as E2B's `network` option says: `allowOut` entries are let
//! through, then `denyOut` entries refused (`["0.0.0.0/0"]` with an `allowOut` list is an
//! allow-list). Entries are IPv4 addresses or CIDR blocks; domain names are refused.
//!
//! bubblewrap (unprivileged) makes two user namespaces: an outer one that owns the network
//! namespace and the inner one the sandbox runs in. The filter and slirp4netns join the outer one
//! (`NS_GET_USERNS` on the network namespace), as the same unprivileged host user bubblewrap
//! runs as: its owner.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::SandboxError;

/// An IPv4 network (`10.0.0.0/8`; a bare address is a /32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    fn masked(addr: Ipv4Addr, prefix: u8) -> Self {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        }
    }

    /// Whether `ip` is in it.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Self::masked(ip, self.prefix).addr == self.addr
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not an IPv4 address or CIDR block (domain names and IPv6 are not \
                 supported here)"
            )
        };
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>().ok().filter(|&p| p <= 32).ok_or_else(bad)?,
            ),
            None => (s.trim(), 32),
        };
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        Ok(Self::masked(addr, p))
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What one sandbox's client asked for (E2B's `network.allowOut` / `denyOut`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    /// Let through (before `deny`).
    pub allow: Vec<Ipv4Net>,
    /// Refused.
    pub deny: Vec<Ipv4Net>,
}

impl EgressRules {
    /// Parses the client's lists; names the bad entry.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Self, SandboxError> {
        let parse = |list: &[String], field: &str| {
            if list.len() > 256 {
                return Err(SandboxError::InvalidArgument(format!(
                    "network.{field}: at most 256 entries"
                )));
            }
            list.iter()
                .map(|e| {
                    e.parse()
                        .map_err(|m| SandboxError::InvalidArgument(format!("network.{field}: {m}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: parse(allow, "allowOut")?,
            deny: parse(deny, "denyOut")?,
        })
    }
}

/// Where slirp4netns's DNS forwarder answers inside.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// Ranges no sandbox reaches unless the operator exempts them.
const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The server's side of egress: the programs, and what is always refused.
#[derive(Clone, Debug)]
pub struct Egress {
    slirp: PathBuf,
    nft: PathBuf,
    /// Refused ranges: [`BLOCKED`] and the host's own addresses.
    blocked: Vec<Ipv4Net>,
    /// Exempted from `blocked` by the operator.
    exempt: Vec<Ipv4Net>,
}

/// The first of `names` found in the usual program folders.
fn find(names: &[&str]) -> Option<PathBuf> {
    let dirs = [
        "/usr/bin",
        "/usr/sbin",
        "/bin",
        "/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
    ];
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| PathBuf::from(d).join(n)))
        .find(|p| p.is_file())
}

impl Egress {
    /// Finds slirp4netns and nft, and checks that `host_user` (the user sandboxes run as on the
    /// host; `None`: this process's) may open `/dev/net/tun`; fails saying what to install or
    /// change.
    pub fn probe(
        exempt: Vec<Ipv4Net>,
        host_user: Option<(u32, u32)>,
    ) -> Result<Self, SandboxError> {
        tun_usable(host_user)?;
        let slirp = find(&["slirp4netns"]);
        let nft = find(&["nft"]);
        let (Some(slirp), Some(nft)) = (slirp, nft) else {
            return Err(SandboxError::Unavailable(
                "sandbox internet access needs slirp4netns and nft (Debian: apt-get install \
                 slirp4netns nftables)"
                    .into(),
            ));
        };
        let mut blocked: Vec<Ipv4Net> = BLOCKED.iter().filter_map(|b| b.parse().ok()).collect();
        blocked.extend(host_addresses().into_iter().map(|a| Ipv4Net::masked(a, 32)));
        Ok(Self {
            slirp,
            nft,
            blocked,
            exempt,
        })
    }

    /// The nftables program for a sandbox with these client rules.
    pub fn ruleset(&self, client: &EgressRules) -> String {
        let set = |nets: &[Ipv4Net]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut r = String::from(
            "table inet lastmile {\n  chain out {\n    type filter hook output priority 0; \
             policy accept;\n    oifname \"lo\" accept\n",
        );
        let _ = writeln!(r, "    ip daddr {DNS} udp dport 53 accept");
        let _ = writeln!(r, "    ip daddr {DNS} tcp dport 53 accept");
        r.push_str("    meta nfproto ipv6 reject\n");
        let mut server = String::new();
        if !self.exempt.is_empty() {
            let _ = writeln!(server, "    ip daddr {{ {} }} accept", set(&self.exempt));
        }
        let _ = writeln!(
            server,
            "    ip daddr {{ {} }} reject with icmp type admin-prohibited",
            set(&self.blocked)
        );
        if !client.allow.is_empty() {
            // Allowed by the client: still subject to the server's refusals.
            let _ = writeln!(r, "    ip daddr {{ {} }} jump server", set(&client.allow));
        }
        if !client.deny.is_empty() {
            let _ = writeln!(
                r,
                "    ip daddr {{ {} }} reject with icmp type admin-prohibited",
                set(&client.deny)
            );
        }
        r.push_str("    jump server\n  }\n  chain server {\n");
        r.push_str(&server);
        r.push_str("  }\n}\n");
        r
    }

    /// Connects the network namespace of the sandbox process `pid` (bubblewrap's child) to
    /// the internet through slirp4netns, behind `client`'s filter; runs both programs as
    /// `host_user`. Returns slirp4netns, which must live as long as the sandbox.
    pub fn attach(
        &self,
        pid: u32,
        host_user: Option<(u32, u32)>,
        client: &EgressRules,
    ) -> Result<Child, SandboxError> {
        let net =
            File::open(format!("/proc/{pid}/ns/net")).map_err(|e| failed("its namespace", e))?;
        // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor (or -1).
        let owner = unsafe { libc::ioctl(net.as_raw_fd(), NS_GET_USERNS) };
        if owner < 0 {
            return Err(failed("its user namespace", io::Error::last_os_error()));
        }
        // SAFETY: the descriptor was just returned to us and is owned by nobody else.
        let userns = unsafe { OwnedFd::from_raw_fd(owner) };
        let fds = [userns.as_raw_fd(), net.as_raw_fd()];
        self.load_filter(fds, host_user, client)?;
        self.start_slirp(fds, host_user)
    }

    /// Loads `client`'s filter with nft inside the namespaces `fds` (user, network), as
    /// `host_user`.
    fn load_filter(
        &self,
        fds: [RawFd; 2],
        host_user: Option<(u32, u32)>,
        client: &EgressRules,
    ) -> Result<(), SandboxError> {
        let mut nft = Command::new(&self.nft);
        nft.args(["-f", "-"])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        enter(&mut nft, host_user, fds, true);
        let mut child = nft.spawn().map_err(|e| failed("starting nft", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.ruleset(client).as_bytes())
                .map_err(|e| failed("writing the filter", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failed("running nft", e))?;
        if !out.status.success() {
            return Err(SandboxError::Unavailable(format!(
                "sandbox internet access: nft refused the filter: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Starts slirp4netns on the network namespace of `fds` (user, network), as `host_user`,
    /// and waits until it has set the network up.
    fn start_slirp(
        &self,
        fds: [RawFd; 2],
        host_user: Option<(u32, u32)>,
    ) -> Result<Child, SandboxError> {
        let (ready_r, ready_w) = super::pipe().map_err(|e| failed("a pipe", e))?;
        let mut slirp = Command::new(&self.slirp);
        slirp
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--netns-type=path",
            ])
            .arg(format!("--userns-path=/proc/self/fd/{}", fds[0]))
            .arg(format!("--ready-fd={}", ready_w.as_raw_fd()))
            .arg(format!("/proc/self/fd/{}", fds[1]))
            .arg("tap0")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let keep = [fds[0], fds[1], ready_w.as_raw_fd()];
        enter(&mut slirp, host_user, keep, false);
        let child = slirp
            .spawn()
            .map_err(|e| failed("starting slirp4netns", e))?;
        drop(ready_w);
        slirp_ready(child, ready_r)
    }
}

/// Waits up to 5 s for slirp4netns `child` to write "1" on `ready_r` (an end of file means it
/// failed); on failure kills it and reports what it said.
fn slirp_ready(mut child: Child, ready_r: OwnedFd) -> Result<Child, SandboxError> {
    let mut pfd = libc::pollfd {
        fd: ready_r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let polled = unsafe { libc::poll(&mut pfd, 1, 5000) };
    let mut byte = [0u8; 1];
    if polled == 1 && File::from(ready_r).read(&mut byte).ok() == Some(1) && byte[0] == b'1' {
        // Its later messages (one per refused packet, say) go nowhere.
        drop(child.stderr.take());
        return Ok(child);
    }
    let _ = child.kill();
    let said = child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    Err(SandboxError::Unavailable(format!(
        "sandbox internet access: slirp4netns {}: {said}",
        if polled == 1 {
            "could not set the network up"
        } else {
            "did not set the network up within 5 s"
        }
    )))
}

/// The error for a step of setting up a sandbox's internet access that failed.
fn failed(what: &str, e: io::Error) -> SandboxError {
    SandboxError::Unavailable(format!("sandbox internet access: {what}: {e}"))
}

/// `NS_GET_USERNS`: `_IO(0xb7, 0x1)`.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

/// Makes `cmd` drop to `host_user`, die with lastmile, and — with `join` — enter the sandbox's
/// outer user namespace and its network namespace before it execs; the descriptors in `keep`
/// (the namespaces first) stay open across the exec.
fn enter<const N: usize>(
    cmd: &mut Command,
    host_user: Option<(u32, u32)>,
    keep: [RawFd; N],
    join: bool,
) {
    let parent = std::process::id();
    // SAFETY: the closure calls only async-signal-safe functions (fcntl, setgroups, setgid,
    // setuid, setns, prctl, getppid) on values prepared before fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            if let Some((uid, gid)) = host_user {
                lastmile_process::switch_user(uid, gid)?;
            }
            if join
                && (libc::setns(keep[0], libc::CLONE_NEWUSER) != 0
                    || libc::setns(keep[1], libc::CLONE_NEWNET) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            // Last: a change of user clears it.
            lastmile_process::arm_parent_death(parent)
        });
    }
}

/// Whether `host_user` may open `/dev/net/tun` for reading and writing (slirp4netns makes the
/// sandbox's device with it, as that user).
fn tun_usable(host_user: Option<(u32, u32)>) -> Result<(), SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let path = "/dev/net/tun";
    let meta = std::fs::metadata(path).map_err(|e| {
        SandboxError::Unavailable(format!("sandbox internet access needs {path}: {e}"))
    })?;
    let mode = meta.mode();
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = host_user.unwrap_or_else(|| unsafe { (libc::getuid(), libc::getgid()) });
    let bits = if uid == 0 || uid == meta.uid() {
        mode >> 6
    } else if gid == meta.gid() {
        mode >> 3
    } else {
        mode
    };
    if bits & 0o6 == 0o6 {
        return Ok(());
    }
    Err(SandboxError::Unavailable(format!(
        "sandbox internet access: {path} (mode {:o}) cannot be opened by uid {uid}, which \
         sandboxes run as on the host; give it the usual mode: chmod 0666 {path}",
        mode & 0o777
    )))
}

/// The host's own IPv4 addresses (every interface).
fn host_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; entries are read only while
    // it is alive, and `ifa_addr` is checked for null and for its family before the cast.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_strictly_and_mask() {
        let n: Ipv4Net = "10.1.2.3/8".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains("10.200.0.1".parse().unwrap()));
        assert_eq!(
            "8.8.8.8".parse::<Ipv4Net>().unwrap().to_string(),
            "8.8.8.8/32"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Net>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        for bad in [
            "example.com",
            "1.2.3.4/33",
            "::1",
            "1.2.3.4; flush ruleset",
            "",
            "1.2.3/8",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        let err = EgressRules::parse(&["*.example.com".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("allowOut"), "{err}");
    }

    #[test]
    fn the_filter_checks_client_allows_against_the_server_policy() {
        let e = Egress {
            slirp: "slirp4netns".into(),
            nft: "nft".into(),
            blocked: vec!["10.0.0.0/8".parse().unwrap()],
            exempt: vec!["10.9.9.9".parse().unwrap()],
        };
        let rules = EgressRules::parse(&["1.1.1.1".into()], &["0.0.0.0/0".into()]).unwrap();
        let r = e.ruleset(&rules);
        let allow = r
            .find("{ 1.1.1.1/32 } jump server")
            .expect("allow jumps to server");
        let deny = r.find("{ 0.0.0.0/0 } reject").expect("deny");
        assert!(allow < deny, "allowOut before denyOut:\n{r}");
        let chain = r.find("chain server").unwrap();
        let exempt = r.find("{ 10.9.9.9/32 } accept").unwrap();
        let blocked = r.find("{ 10.0.0.0/8 } reject").unwrap();
        assert!(chain < exempt && exempt < blocked, "{r}");
    }
}
