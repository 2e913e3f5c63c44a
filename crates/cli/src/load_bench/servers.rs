//! The servers `lastmile bench` starts for itself: which (`plan_servers`, one pair per tier for
//! a comparison), and starting them (`lastmile serve` through the launcher, llama.cpp's
//! `llama-server` from the anchor build of the tier), each stopped when its guard is dropped.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{CompareArg, LoadBenchArgs, Target, TierArg};

/// A server process that is killed when dropped.
pub(super) struct ServerGuard {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) pid: u32,
    _process: ServerProcess,
}

/// The process behind a [`ServerGuard`].
enum ServerProcess {
    /// `lastmile serve`, started by the launcher (which kills it when dropped).
    Ours {
        _worker: lastmile_control::launcher::LaunchedWorker,
    },
    /// Another binary.
    Foreign(Child),
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Self::Foreign(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where the output of the server called `name` goes: a log file in the temp folder (a tier's
/// `/` in the name becomes `-`).
fn server_log(name: &str) -> PathBuf {
    let name = name.replace(['/', '\\'], "-");
    std::env::temp_dir().join(format!("lastmile-bench-{name}-{}.log", std::process::id()))
}

/// Starts `lastmile serve` on a port it picks and waits until it listens (the model loaded).
fn start_ours(
    rt: &tokio::runtime::Runtime,
    gguf: &std::path::Path,
    threads: usize,
    extra: &[&str],
    name: &str,
) -> Result<ServerGuard> {
    use lastmile_control::launcher::{Launch, Output};
    let exe = std::env::current_exe().context("locating the lastmile binary")?;
    let mut command: Vec<std::ffi::OsString> = vec!["serve".into(), "--model".into()];
    command.push(gguf.into());
    for arg in ["--threads", &threads.to_string()]
        .into_iter()
        .chain(["--served-model-name", "bench-model"])
        .chain(extra.iter().copied())
    {
        command.push(arg.into());
    }
    let log = server_log(name);
    eprintln!("{name}: server log in {}", log.display());
    let launch = Launch::new(exe, command)
        .output(Output::LogFile(log))
        .env("RUST_LOG", "warn");
    let (worker, url) = rt.block_on(async {
        let worker = launch.spawn()?;
        let url = worker.listening(Duration::from_secs(300)).await?;
        Ok::<_, lastmile_control::ControlError>((worker, url))
    })?;
    Ok(ServerGuard {
        name: name.to_string(),
        url,
        pid: worker.pid(),
        _process: ServerProcess::Ours { _worker: worker },
    })
}

/// A port nothing listens on now, for llama-server, which cannot report a port it picked
/// itself: the one bind-then-drop left (another process may take the port in between).
fn free_port_for_llama_server() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How `start_llama_server` runs it: threads, slots and the context each slot gets.
struct LlamaServerShape {
    threads: usize,
    /// The GPU to offload every layer to (`None`: the CPU).
    gpu: Option<usize>,
    slots: usize,
    ctx_per_slot: usize,
}

fn start_llama_server(
    bin: &std::path::Path,
    gguf: &std::path::Path,
    shape: &LlamaServerShape,
    name: &str,
) -> Result<ServerGuard> {
    let LlamaServerShape {
        threads,
        gpu,
        slots,
        ctx_per_slot,
    } = *shape;
    if !bin.exists() {
        bail!(
            "{} not found: build it with scripts/anchor/build_llama_cpp.sh (for a tier: \
             LASTMILE_ANCHOR_TIER=avx2 or avx512) or pass --llama-server",
            bin.display()
        );
    }
    let port = free_port_for_llama_server()?;
    // Its shared libraries first; the CUDA libraries it needs may be on the path already.
    let lib_dir = bin.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let lib_path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(rest) if !rest.is_empty() => {
            let mut p = lib_dir.into_os_string();
            p.push(":");
            p.push(rest);
            p
        }
        _ => lib_dir.into_os_string(),
    };
    let offload: Vec<String> = match gpu {
        Some(n) => vec!["-ngl".into(), "999".into(), "-mg".into(), n.to_string()],
        None => Vec::new(),
    };
    let log_path = server_log(name);
    eprintln!("{name}: server log in {}", log_path.display());
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let child = Command::new(bin)
        .arg("-m")
        .arg(gguf)
        .args([
            "-t",
            &threads.to_string(),
            "-np",
            &slots.to_string(),
            "-c",
            &(slots * ctx_per_slot).to_string(),
        ])
        .args([
            "--cont-batching",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--alias",
            "bench-model",
        ])
        .args(&offload)
        .env("LD_LIBRARY_PATH", lib_path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting llama-server")?;
    Ok(ServerGuard {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}"),
        pid: child.id(),
        _process: ServerProcess::Foreign(child),
    })
}

/// A server `start_servers` starts: its name in the reports and what it is.
#[derive(Debug, Clone, PartialEq)]
struct PlannedServer {
    name: String,
    tier: TierArg,
    kind: PlannedKind,
}

/// What a planned server is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PlannedKind {
    /// `lastmile serve` (with or without its prefix cache).
    Ours { prefix_cache: bool },
    /// llama.cpp's `llama-server`.
    LlamaServer,
}

/// The servers a run starts, in order: for each tier, lastmile, then what `--compare` sets
/// beside it (so that a comparison's servers come in pairs, tier by tier). With one tier the
/// names are the plain ones (`lastmile`, `llama.cpp`, `no-cache`); with several, each carries
/// its tier (`lastmile/avx2`).
fn plan_servers(compare: Option<CompareArg>, tiers: &[TierArg]) -> Vec<PlannedServer> {
    let mut plan = Vec::new();
    for &tier in tiers {
        let suffix = if tiers.len() > 1 {
            format!("/{}", tier.name())
        } else {
            String::new()
        };
        let mut add = |name: &str, kind| {
            plan.push(PlannedServer {
                name: format!("{name}{suffix}"),
                tier,
                kind,
            })
        };
        add("lastmile", PlannedKind::Ours { prefix_cache: true });
        match compare {
            None => {}
            Some(CompareArg::NoPrefixCache) => add(
                "no-cache",
                PlannedKind::Ours {
                    prefix_cache: false,
                },
            ),
            Some(CompareArg::LlamaCpp) => add("llama.cpp", PlannedKind::LlamaServer),
        }
    }
    plan
}

/// The servers to measure, as (name, base URL): the one `--url` names, or those started here
/// (whose guards stop them when dropped).
pub(super) fn start_servers(
    a: &LoadBenchArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<(Vec<ServerGuard>, Vec<Target>)> {
    if let Some(url) = &a.url {
        if a.compare.is_some() {
            bail!("--compare starts its own servers; drop --url");
        }
        return Ok((
            Vec::new(),
            vec![("server".into(), url.trim_end_matches('/').to_string())],
        ));
    }
    if a.tier.len() > 1 && a.llama_server.is_some() {
        bail!(
            "--llama-server names one binary: with several tiers, each tier's anchor build is used"
        );
    }
    // The model is needed only for servers started here: `--url` benchmarks fetch nothing.
    let gguf = match &a.gguf {
        Some(p) => p.clone(),
        None => lastmile_models::ensure_default_model()?,
    };
    let slots = a.concurrency.iter().copied().max().unwrap_or(1).max(1);
    let gpu = match a.device {
        lastmile_engine::Device::Cpu => None,
        lastmile_engine::Device::Cuda(n) => Some(n),
    };
    let shape = LlamaServerShape {
        threads: a.threads,
        gpu,
        slots,
        // Room for the long prompt in its slot (the context is split evenly between slots).
        ctx_per_slot: a.long_prompt.map_or(4096, |n| (n * 5 / 4 + 512).max(4096)),
    };
    let device = a.device.to_string();
    let mut servers: Vec<ServerGuard> = Vec::new();
    for planned in plan_servers(a.compare, &a.tier) {
        let kernels = planned.tier.kernels();
        let server = match planned.kind {
            PlannedKind::Ours { prefix_cache } => {
                let mut extra = vec!["--kernels", &kernels, "--device", &device];
                if !prefix_cache {
                    extra.push("--no-prefix-cache");
                }
                start_ours(rt, &gguf, a.threads, &extra, &planned.name)?
            }
            PlannedKind::LlamaServer => {
                let bin = a.llama_server.clone().unwrap_or_else(|| {
                    lastmile_models::lastmile_home()
                        .join("anchor")
                        .join(match gpu {
                            Some(_) => "build-cuda",
                            None => planned.tier.anchor_build(),
                        })
                        .join("bin/llama-server")
                });
                start_llama_server(&bin, &gguf, &shape, &planned.name)?
            }
        };
        servers.push(server);
    }
    let targets = servers
        .iter()
        .map(|s| (s.name.clone(), s.url.clone()))
        .collect();
    Ok((servers, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tier keeps the plain names; several start each comparison's pair once per tier, in
    /// pairs (what `print_ratios` divides), each server at its tier.
    #[test]
    fn servers_are_planned_in_pairs_per_tier() {
        let names = |plan: &[PlannedServer]| -> Vec<String> {
            plan.iter().map(|p| p.name.clone()).collect()
        };
        let one = plan_servers(Some(CompareArg::LlamaCpp), &[TierArg::Avx2]);
        assert_eq!(names(&one), ["lastmile", "llama.cpp"]);
        assert!(one.iter().all(|p| p.tier == TierArg::Avx2));
        let two = plan_servers(
            Some(CompareArg::LlamaCpp),
            &[TierArg::Native, TierArg::Avx2],
        );
        assert_eq!(
            names(&two),
            [
                "lastmile/native",
                "llama.cpp/native",
                "lastmile/avx2",
                "llama.cpp/avx2"
            ]
        );
        assert_eq!(two[2].tier, TierArg::Avx2);
        assert_eq!(two[2].kind, PlannedKind::Ours { prefix_cache: true });
        assert_eq!(two[3].kind, PlannedKind::LlamaServer);
        let cache = plan_servers(Some(CompareArg::NoPrefixCache), &[TierArg::Avx512]);
        assert_eq!(
            cache[1].kind,
            PlannedKind::Ours {
                prefix_cache: false
            }
        );
        assert_eq!(names(&plan_servers(None, &[TierArg::Native])), ["lastmile"]);
        assert_eq!(TierArg::AvxVnni.name(), "avx-vnni");
        // A tier's name is no folder in the log's path.
        let log = server_log("lastmile/avx2");
        assert_eq!(log.parent(), Some(std::env::temp_dir().as_path()));
    }
}
