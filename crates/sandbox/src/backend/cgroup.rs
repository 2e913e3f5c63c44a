//! Resource limits through cgroups, on v2, on v1, and on the hybrids in between (memory and
//! pids on v1 with an empty v2 hierarchy beside them is what these machines run). Each
//! controller is placed where the host has it: its own v1 hierarchy if mounted, else the v2
//! hierarchy if that lists it. Sandbox cgroups go under lastmile's own cgroup (so the host's
//! own limits on lastmile still bound them), in a `lastmile-sandboxes` folder.
//!
//! Invariants: a [`Cgroup`] is created before its sandbox's first process and removed after
//! its last one; dropping it kills whatever is left inside.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The controllers a sandbox is limited by; `cpuacct` only reports (v1).
const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

/// Which cgroup version a controller is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Its own v1 hierarchy.
    V1,
    /// The unified v2 hierarchy.
    V2,
}

/// Where one controller's sandbox cgroups are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// Which version.
    pub version: Version,
    /// The folder under which each sandbox gets a cgroup.
    pub parent: PathBuf,
}

/// The limits of one sandbox.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Memory (tmpfs pages included), bytes.
    pub memory_bytes: u64,
    /// CPU time as a number of cores.
    pub cpus: f64,
    /// Processes and threads.
    pub pids: u32,
}

/// What the host offers, found once at start.
#[derive(Clone, Debug, Default)]
pub struct CgroupSetup {
    places: Vec<(String, Place)>,
}

impl CgroupSetup {
    /// Reads `/proc/self/mountinfo` and `/proc/self/cgroup` and prepares the parent folders.
    pub fn probe() -> io::Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let mut setup = Self::plan(&mountinfo, &own, |p| fs::read_to_string(p).ok());
        for (_, place) in &mut setup.places {
            remove_stale(&place.parent);
            if place.version == Version::V2 {
                enable_v2(place)?;
            }
            fs::create_dir_all(&place.parent)?;
        }
        Ok(setup)
    }

    /// Removes this process's folders (at shutdown, after every sandbox ended).
    pub fn remove(&self) {
        for (_, place) in &self.places {
            let _ = fs::remove_dir(&place.parent);
        }
    }

    /// The placement decision alone (pure, for tests): v1 hierarchies first, then v2.
    pub fn plan(mountinfo: &str, own: &str, read: impl Fn(&Path) -> Option<String>) -> Self {
        let mut v1: Vec<(Vec<String>, PathBuf)> = Vec::new();
        let mut v2: Option<PathBuf> = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split(' ').nth(4).unwrap_or("");
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or("");
            let opts = r.nth(1).unwrap_or("");
            match fstype {
                "cgroup" => v1.push((
                    opts.split(',').map(str::to_string).collect(),
                    PathBuf::from(mount_point),
                )),
                "cgroup2" => v2 = Some(PathBuf::from(mount_point)),
                _ => {}
            }
        }
        // Our own path in each hierarchy: "id:controllers:path"; v2 is "0::path".
        let own_path = |ctrl: Option<&str>| -> String {
            own.lines()
                .filter_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                    let hit = match ctrl {
                        Some(c) => ctrls.split(',').any(|x| x == c),
                        None => ctrls.is_empty(),
                    };
                    hit.then(|| path.trim_start_matches('/').to_string())
                })
                .next()
                .unwrap_or_default()
        };
        let under = |mount: &Path, rel: String| -> PathBuf {
            let own_dir = mount.join(&rel);
            // Inside a container the path may not exist where we look; the mount's root does.
            let base = if rel.is_empty() || read(&own_dir.join("cgroup.procs")).is_some() {
                own_dir
            } else {
                mount.to_path_buf()
            };
            // One folder per lastmile process, so that a later one can tell which are left
            // over from a process that died (and clear them) from those of a live one.
            base.join("lastmile-sandboxes")
                .join(std::process::id().to_string())
        };
        let v2_controllers = v2
            .as_ref()
            .and_then(|m| read(&m.join("cgroup.controllers")))
            .unwrap_or_default();
        let mut places = Vec::new();
        for c in CONTROLLERS {
            if let Some((_, m)) = v1.iter().find(|(opts, _)| opts.iter().any(|o| o == c)) {
                let parent = under(m, own_path(Some(c)));
                places.push((
                    c.to_string(),
                    Place {
                        version: Version::V1,
                        parent,
                    },
                ));
            } else if let Some(m) = &v2 {
                // v2's cpu controller also reports usage, so cpuacct needs no place there.
                if c != "cpuacct" && v2_controllers.split_whitespace().any(|x| x == c) {
                    let parent = under(m, own_path(None));
                    places.push((
                        c.to_string(),
                        Place {
                            version: Version::V2,
                            parent,
                        },
                    ));
                }
            }
        }
        Self { places }
    }

    /// Where `controller` goes, if the host has it.
    pub fn place(&self, controller: &str) -> Option<&Place> {
        self.places
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p)
    }

    /// The limiting controllers the host lacks (an empty list means every limit holds).
    pub fn missing(&self) -> Vec<&'static str> {
        ["memory", "pids", "cpu"]
            .into_iter()
            .filter(|c| self.place(c).is_none())
            .collect()
    }

    /// One line for logs and `/health`: where each controller lives.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .places
            .iter()
            .map(|(c, p)| format!("{c}: {:?} ({})", p.version, p.parent.display()))
            .collect();
        if parts.is_empty() {
            "no cgroup controllers".into()
        } else {
            parts.join(", ")
        }
    }

    /// Makes sandbox `id`'s cgroups with `limits` written.
    pub fn create(&self, id: &str, limits: &Limits) -> io::Result<Cgroup> {
        let mut cg = Cgroup::default();
        for (ctrl, place) in &self.places {
            let dir = place.parent.join(id);
            // v2 has one folder for every controller: make and join it once.
            if !cg.dirs.contains(&dir) {
                fs::create_dir_all(&dir)?;
                cg.procs.push(
                    OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))?,
                );
                cg.dirs.push(dir.clone());
            }
            let v = place.version;
            match ctrl.as_str() {
                "memory" => {
                    cg.memory = Some((dir.clone(), v));
                    let bytes = limits.memory_bytes.to_string();
                    match v {
                        Version::V1 => {
                            write(&dir, "memory.limit_in_bytes", &bytes)?;
                            // With swap accounting on, swap counts toward the same limit.
                            let _ = write(&dir, "memory.memsw.limit_in_bytes", &bytes);
                        }
                        Version::V2 => {
                            write(&dir, "memory.max", &bytes)?;
                            let _ = write(&dir, "memory.swap.max", "0");
                        }
                    }
                }
                "pids" => write(&dir, "pids.max", &limits.pids.to_string())?,
                "cpu" => {
                    let quota = ((limits.cpus * 100_000.0) as u64).max(1_000);
                    match v {
                        Version::V1 => {
                            write(&dir, "cpu.cfs_period_us", "100000")?;
                            write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                        }
                        Version::V2 => {
                            cg.cpu_usage = Some((dir.clone(), v));
                            write(&dir, "cpu.max", &format!("{quota} 100000"))?;
                        }
                    }
                }
                "cpuacct" => cg.cpu_usage = Some((dir.clone(), v)),
                _ => {}
            }
        }
        Ok(cg)
    }
}

/// Clears what a lastmile process that died left beside `ours` (`lastmile-sandboxes/<pid>`
/// folders of pids that no longer run): kills anything still inside, removes the folders.
fn remove_stale(ours: &Path) {
    let (Some(all), Some(me)) = (ours.parent(), ours.file_name()) else {
        return;
    };
    let Ok(dirs) = fs::read_dir(all) else { return };
    for d in dirs.flatten() {
        let name = d.file_name();
        let stale = name != me
            && name
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists());
        if !stale {
            continue;
        }
        if let Ok(children) = fs::read_dir(d.path()) {
            for c in children.flatten().filter(|c| c.path().is_dir()) {
                let mut left = Cgroup::default();
                left.dirs.push(c.path());
                drop(left);
            }
        }
        let _ = fs::remove_dir(d.path());
    }
}

/// Turns on memory, pids and cpu for the cgroups under `place.parent` (v2 passes controllers
/// down only through `cgroup.subtree_control`, and only from a cgroup with no processes of its
/// own: when ours has some, lastmile first moves itself into a `lastmile` leaf beside).
fn enable_v2(place: &Place) -> io::Result<()> {
    let Some(own) = place.parent.parent().and_then(Path::parent) else {
        return Ok(());
    };
    let want = "+memory +pids +cpu";
    let enable = |dir: &Path| -> io::Result<()> {
        let avail = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for c in want.split(' ') {
            if avail.split_whitespace().any(|a| a == &c[1..]) {
                write(dir, "cgroup.subtree_control", c)?;
            }
        }
        Ok(())
    };
    if enable(own).is_err() {
        let leaf = own.join("lastmile");
        fs::create_dir_all(&leaf)?;
        write(&leaf, "cgroup.procs", &std::process::id().to_string())?;
        enable(own)?;
    }
    let mut dir = own.to_path_buf();
    for level in place
        .parent
        .strip_prefix(own)
        .unwrap_or(Path::new(""))
        .components()
    {
        dir.push(level);
        fs::create_dir_all(&dir)?;
        enable(&dir)?;
    }
    Ok(())
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(dir.join(file))?;
    f.write_all(value.as_bytes())
}

/// One sandbox's cgroups.
#[derive(Debug, Default)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
    memory: Option<(PathBuf, Version)>,
    cpu_usage: Option<(PathBuf, Version)>,
}

impl Cgroup {
    /// The open `cgroup.procs` files a new process writes `0` into to join (before it execs).
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Memory in use now (tmpfs included), bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        let (dir, v) = self.memory.as_ref()?;
        let file = match v {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    }

    /// CPU time used so far, nanoseconds.
    pub fn cpu_ns(&self) -> Option<u64> {
        let (dir, v) = self.cpu_usage.as_ref()?;
        match v {
            Version::V1 => fs::read_to_string(dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok(),
            Version::V2 => fs::read_to_string(dir.join("cpu.stat"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us * 1000),
        }
    }

    /// How many processes the OOM killer ended for hitting the memory limit.
    pub fn oom_events(&self) -> Option<u64> {
        let (dir, v) = self.memory.as_ref()?;
        let file = match v {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        fs::read_to_string(dir.join(file))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// SIGKILLs every process left in the sandbox's cgroups, until none is.
    pub fn kill_all(&self) {
        for _ in 0..100 {
            let mut any = false;
            for dir in &self.dirs {
                if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                    continue;
                }
                for pid in fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                {
                    any = true;
                    // SAFETY: kill(2) with plain integers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if !any {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.procs.clear();
        self.kill_all();
        for dir in &self.dirs {
            // A cgroup can be removed only once its last process has been reaped.
            for _ in 0..200 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 30 0:31 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
";
    const HYBRID_OWN: &str = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n2:cpuacct:/\n0::/\n";

    #[test]
    fn hybrid_host_puts_every_controller_on_v1_under_our_own_cgroup() {
        let s = CgroupSetup::plan(HYBRID_MOUNTS, HYBRID_OWN, |p| {
            // Our memory cgroup exists; the empty v2 hierarchy lists no controllers.
            (p.ends_with("process_api/abc/cgroup.procs")
                || p.ends_with("unified/cgroup.controllers"))
            .then(String::new)
        });
        let mem = s.place("memory").unwrap();
        assert_eq!(mem.version, Version::V1);
        assert_eq!(
            mem.parent,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/lastmile-sandboxes")
                .join(std::process::id().to_string())
        );
        assert_eq!(
            s.place("pids").unwrap().parent,
            PathBuf::from("/sys/fs/cgroup/pids/lastmile-sandboxes")
                .join(std::process::id().to_string())
        );
        assert!(s.missing().is_empty());
    }

    #[test]
    fn pure_v2_host_uses_the_unified_hierarchy_for_what_it_lists() {
        let mounts = "31 25 0:27 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        let own = "0::/user.slice/session-1.scope\n";
        let s = CgroupSetup::plan(mounts, own, |p| {
            if p == Path::new("/sys/fs/cgroup/cgroup.controllers") {
                Some("cpuset cpu io memory pids\n".into())
            } else if p.ends_with("session-1.scope/cgroup.procs") {
                Some(String::new())
            } else {
                None
            }
        });
        for c in ["memory", "pids", "cpu"] {
            let p = s.place(c).unwrap();
            assert_eq!(p.version, Version::V2);
            assert_eq!(
                p.parent,
                PathBuf::from("/sys/fs/cgroup/user.slice/session-1.scope/lastmile-sandboxes")
                    .join(std::process::id().to_string())
            );
        }
        assert!(s.place("cpuacct").is_none());
    }

    #[test]
    fn a_host_without_controllers_says_which_limits_are_missing() {
        let mounts = "31 25 0:27 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        let s = CgroupSetup::plan(mounts, "0::/\n", |_| Some("io\n".into()));
        assert_eq!(s.missing(), vec!["memory", "pids", "cpu"]);
    }
}
