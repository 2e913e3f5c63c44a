//! `lastmile bench`: drives an OpenAI-compatible endpoint with a workload and reports latency and
//! throughput; with `--compare` it starts two servers (ours and llama.cpp's `llama-server`, or
//! ours with and without the prefix cache) and runs the same workload against both in one run;
//! with several `--tier`s, that pair once per instruction-set tier, side by side.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::KernelTier;
use servers::start_servers;

mod servers;
use lastmile_bench::{
    discover_model, latency_throughput_svg, run_load, wait_healthy, Arrival, CurvePoint,
    LoadConfig, LoadReport, Workload, WorkloadKind,
};

/// Workload shapes on the command line.
#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    /// Independent requests of --input-tokens in, --output-tokens out.
    Fixed,
    /// The same --system-tokens system prompt, then a distinct user turn.
    SharedPrefix,
    /// --requests conversations of --turns turns; the context grows turn by turn.
    MultiTurn,
}

/// What `--compare` sets side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CompareArg {
    /// lastmile against llama.cpp's llama-server (same GGUF, threads, slots = concurrency).
    LlamaCpp,
    /// lastmile with the prefix cache against lastmile with --no-prefix-cache.
    NoPrefixCache,
}

/// `--tier`: the instruction-set tier both servers of a comparison run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TierArg {
    /// Each at its best on this CPU (llama.cpp built with native flags).
    Native,
    /// AVX-512 without AMX: lastmile `--kernels avx512`, llama.cpp's `build-avx512`.
    Avx512,
    /// As on an AVX2-only CPU with AVX-VNNI (Alder Lake and later Intel client CPUs): lastmile
    /// `--kernels avx-vnni`, llama.cpp's `build-avxvnni`.
    AvxVnni,
    /// As on an AVX2-only CPU: lastmile `--kernels avx2`, llama.cpp's `build-avx2`.
    Avx2,
}

impl TierArg {
    /// lastmile's `--kernels` value for this tier, as written on its command line.
    fn kernels(self) -> String {
        let tier = match self {
            Self::Native => KernelTier::Auto,
            Self::Avx512 => KernelTier::Avx512,
            Self::AvxVnni => KernelTier::AvxVnni,
            Self::Avx2 => KernelTier::Avx2,
        };
        tier.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// The tier's name on the command line (`avx2`, ...).
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// The anchor build folder of this tier (`scripts/anchor/build_llama_cpp.sh` with
    /// `LASTMILE_ANCHOR_TIER`).
    fn anchor_build(self) -> &'static str {
        match self {
            Self::Native => "build",
            Self::Avx512 => "build-avx512",
            Self::AvxVnni => "build-avxvnni",
            Self::Avx2 => "build-avx2",
        }
    }
}

/// Options of `lastmile bench`.
#[derive(Args)]
pub struct LoadBenchArgs {
    /// Server to load (`http://host:port`). Default: start `lastmile serve` with --gguf.
    #[arg(long)]
    url: Option<String>,
    /// Model id to request (default: the server's first model).
    #[arg(long)]
    model_id: Option<String>,
    /// Requests in flight; a comma list runs one load level per value (e.g. 1,4,16).
    #[arg(long, default_value = "8", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Poisson arrivals per second instead of fixed concurrency (comma list allowed).
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Shape of the traffic.
    #[arg(long, value_enum, default_value = "fixed")]
    workload: WorkloadArg,
    /// Requests per load level (conversations for multi-turn).
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Turns per conversation (multi-turn).
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Approximate tokens per user message.
    #[arg(long, default_value_t = 128)]
    input_tokens: usize,
    /// Tokens generated per request (max_tokens with ignore_eos).
    #[arg(long, default_value_t = 128)]
    output_tokens: usize,
    /// Approximate tokens of the shared system prompt (shared-prefix, multi-turn).
    #[arg(long, default_value_t = 1000)]
    system_tokens: usize,
    /// Seed of the prompt text.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Run the same workload against two servers started here, and print ratios.
    #[arg(long, value_enum)]
    compare: Option<CompareArg>,
    /// GGUF for servers started here (default: the default model).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Threads for servers started here.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// llama-server binary (default: the anchor build of --tier under $LASTMILE_HOME/anchor,
    /// or its CUDA build `build-cuda` with a `--device cuda`).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Device of the servers started here: `cpu`, or `cuda[:N]` (lastmile `serve --device`,
    /// llama-server with every layer offloaded to that GPU: `-ngl 999 -mg N`, from the anchor's
    /// CUDA build, `LASTMILE_ANCHOR_TIER=cuda scripts/anchor/build_llama_cpp.sh`).
    #[arg(long, default_value = "cpu")]
    device: lastmile_engine::Device,
    /// Instruction-set tier of the servers started here: native (each at its best), avx512 (no
    /// AMX) or avx2 (what an AVX2-only CPU gets): lastmile runs with `--kernels` capped there and
    /// llama-server comes from the anchor built for that tier
    /// (`LASTMILE_ANCHOR_TIER=avx2 scripts/anchor/build_llama_cpp.sh`). A comma list (e.g.
    /// `native,avx2`) starts the servers once per tier, runs every round against all of them and
    /// prints each tier's ratios: what a CPU with fewer instructions keeps of the comparison.
    #[arg(long, value_enum, default_value = "native", value_delimiter = ',')]
    tier: Vec<TierArg>,
    /// Write the full results (every request) as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Draw the latency/throughput curve (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Interference test: run each level twice, the second time with one extra request of about
    /// this many prompt tokens arriving once the level's streams are all generating, and compare
    /// the streams' inter-token latency with and without it.
    #[arg(long)]
    long_prompt: Option<usize>,
    /// Run the whole workload this many times per server, alternating which server goes first
    /// (round 1: as listed, round 2: reversed, ...) with fresh prompt text each round, and report
    /// each server's median of every measure and the ratios of those medians: on a shared or
    /// noisy machine one run, and the order two servers run in, move the numbers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: u32,
}

fn workload(a: &LoadBenchArgs) -> Workload {
    Workload {
        kind: match a.workload {
            WorkloadArg::Fixed => WorkloadKind::Fixed,
            WorkloadArg::SharedPrefix => WorkloadKind::SharedPrefix,
            WorkloadArg::MultiTurn => WorkloadKind::MultiTurn,
        },
        requests: a.requests,
        turns: a.turns,
        input_tokens: a.input_tokens,
        output_tokens: a.output_tokens,
        system_tokens: a.system_tokens,
        seed: a.seed,
    }
}

fn levels(a: &LoadBenchArgs) -> Vec<Arrival> {
    if a.rate.is_empty() {
        a.concurrency
            .iter()
            .map(|&c| Arrival::Concurrency(c))
            .collect()
    } else {
        a.rate.iter().map(|&r| Arrival::Rate(r)).collect()
    }
}

fn level_label(a: &Arrival) -> String {
    match a {
        Arrival::Concurrency(c) => format!("c={c}"),
        Arrival::Rate(r) => format!("{r}/s"),
    }
}

fn print_report(server: &str, r: &LoadReport, peak_rss: Option<f64>) {
    let s = &r.summary;
    println!(
        "{server:<16} {:<7} {:>4} ok {:>3} err | {:>8.1} out tok/s {:>6.2} req/s | TTFT ms mean {:>7.0} p50 {:>7.0} p90 {:>7.0} p99 {:>7.0} | ITL ms p50 {:>6.1} p99 {:>6.1} | e2e p50 {:>7.0} ms{}",
        format!(
            "{}{}",
            level_label(&r.arrival),
            if r.long_prompt.is_some() { "+long" } else { "" }
        ),
        s.completed,
        s.errors,
        s.output_tok_s,
        s.requests_s,
        s.ttft_ms.mean,
        s.ttft_ms.p50,
        s.ttft_ms.p90,
        s.ttft_ms.p99,
        s.itl_ms.p50,
        s.itl_ms.p99,
        s.e2e_ms.p50,
        peak_rss.map_or(String::new(), |m| format!(" | peak RSS {m:.0} MiB")),
    );
    for e in &s.error_samples {
        println!("             error: {e}");
    }
}

/// For each level run without and then with the long prompt: how much the long prompt
/// stretched the streams' inter-token latency.
fn print_interference(server: &str, reports: &[LoadReport]) {
    for pair in reports.chunks(2) {
        let [base, with] = pair else { continue };
        let Some(long) = &with.long_prompt else {
            println!(
                "{server:<16} {}: the long prompt was not sent",
                level_label(&with.arrival)
            );
            continue;
        };
        let (b, w) = (&base.summary.itl_ms, &with.summary.itl_ms);
        println!(
            "{server:<16} {}: long prompt ({} tokens) TTFT {:.0} ms{} | streams' ITL p99 {:.1} -> {:.1} ms ({:.2}x), p50 {:.1} -> {:.1} ms, max {:.0} ms",
            level_label(&with.arrival),
            long.prompt_tokens,
            long.ttft.unwrap_or(f64::NAN) * 1e3,
            long.error.as_ref().map_or(String::new(), |e| format!(" (failed: {e})")),
            b.p99,
            w.p99,
            w.p99 / b.p99.max(1e-9),
            b.p50,
            w.p50,
            with.requests
                .iter()
                .flat_map(|r| r.itl.iter().copied())
                .fold(0.0, f64::max)
                * 1e3,
        );
    }
}

/// Resident memory of a process in MiB (Linux `/proc`), if it can be read.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Samples a process's resident memory every 50 ms and keeps the peak.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<f64>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak: Option<f64> = None;
            loop {
                if let Some(m) = rss_mib(pid) {
                    peak = Some(peak.map_or(m, |p| p.max(m)));
                }
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { stop, thread }
    }

    fn stop(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

/// A server measured: its name and base URL.
type Target = (String, String);

/// A server's resident memory: idle, and its peak during each run (MiB; for servers started
/// here).
type Rss = (Option<f64>, Vec<Option<f64>>);

/// Runs `lastmile bench`.
pub fn run(a: LoadBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let wl = workload(&a);
    let (servers, targets) = start_servers(&a, &rt)?;
    let rounds = a.rounds as usize;
    // Per server, per round, its reports; and its resident memory (MiB, servers started here):
    // idle in the first round, and the highest peak of each level over the rounds.
    let mut runs: Vec<Vec<Vec<LoadReport>>> = vec![Vec::new(); targets.len()];
    let mut rss: Vec<Rss> = vec![(None, Vec::new()); targets.len()];
    rt.block_on(async {
        for round in 0..rounds {
            // Fresh text each round (no round finds an earlier one's prompts cached), the same
            // for every server; every other round the servers go in the opposite order.
            let round_wl = Workload {
                seed: wl.seed.wrapping_add(7_919 * round as u64),
                ..wl.clone()
            };
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            if rounds > 1 {
                eprintln!("round {} of {rounds}", round + 1);
            }
            for i in order {
                let (name, url) = &targets[i];
                let pid = servers.iter().find(|s| &s.url == url).map(|s| s.pid);
                let (reports, (idle, peaks)) = bench_server(&a, &round_wl, name, url, pid).await?;
                runs[i].push(reports);
                let (first_idle, max_peaks) = &mut rss[i];
                if round == 0 {
                    *first_idle = idle;
                }
                max_peaks.resize(peaks.len(), None);
                for (m, p) in max_peaks.iter_mut().zip(peaks) {
                    *m = match (*m, p) {
                        (Some(x), Some(y)) => Some(x.max(y)),
                        (x, y) => x.or(y),
                    };
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    drop(servers);
    let medians: Vec<(String, Vec<Measures>)> = targets
        .iter()
        .zip(&runs)
        .map(|((name, _), r)| (name.clone(), median_measures(r)))
        .collect();
    if rounds > 1 {
        print_rounds(&targets, &runs, &medians);
    }
    let labels: Vec<String> = runs[0][0].iter().map(run_label).collect();
    print_ratios(&labels, &medians, a.compare.is_some());
    // The JSON and the plot hold, per server and level, the round with the median throughput.
    let all: Vec<(String, Vec<LoadReport>)> = targets
        .iter()
        .zip(runs)
        .map(|((name, _), r)| (name.clone(), median_runs(r)))
        .collect();
    write_outputs(&a, &wl, &all, &rss)
}

/// What the ratios compare, per level: output tok/s, mean TTFT, p50 and p99 ITL (ms).
type Measures = [f64; 4];

fn measures(r: &LoadReport) -> Measures {
    let s = &r.summary;
    [s.output_tok_s, s.ttft_ms.mean, s.itl_ms.p50, s.itl_ms.p99]
}

/// The median (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Each level's median of each measure over the rounds (`rounds[round][level]`).
fn median_measures(rounds: &[Vec<LoadReport>]) -> Vec<Measures> {
    (0..rounds[0].len())
        .map(|l| {
            std::array::from_fn(|m| median(rounds.iter().map(|r| measures(&r[l])[m]).collect()))
        })
        .collect()
}

/// Each level's round with the median output tok/s (the lower middle one for an even count).
fn median_runs(rounds: Vec<Vec<LoadReport>>) -> Vec<LoadReport> {
    let mut by_level: Vec<Vec<LoadReport>> = (0..rounds[0].len()).map(|_| Vec::new()).collect();
    for round in rounds {
        for (l, r) in round.into_iter().enumerate() {
            by_level[l].push(r);
        }
    }
    by_level
        .into_iter()
        .map(|mut rs| {
            rs.sort_by(|x, y| x.summary.output_tok_s.total_cmp(&y.summary.output_tok_s));
            rs.swap_remove((rs.len() - 1) / 2)
        })
        .collect()
}

/// A level's label, with `+long` for its run with the long prompt.
fn run_label(r: &LoadReport) -> String {
    let long = if r.long_prompt.is_some() { "+long" } else { "" };
    format!("{}{long}", level_label(&r.arrival))
}

/// Every round's throughput and each measure's median, per server and level.
fn print_rounds(
    targets: &[Target],
    runs: &[Vec<Vec<LoadReport>>],
    medians: &[(String, Vec<Measures>)],
) {
    println!("\nmedians over {} rounds:", runs[0].len());
    for (((name, _), rounds), (_, med)) in targets.iter().zip(runs).zip(medians) {
        for (l, m) in med.iter().enumerate() {
            let each: Vec<String> = rounds
                .iter()
                .map(|r| format!("{:.1}", r[l].summary.output_tok_s))
                .collect();
            println!(
                "  {name:<16} {:<8} output tok/s {:.1} (rounds: {}) | mean TTFT {:.0} ms | p50 ITL {:.1} ms | p99 ITL {:.1} ms",
                run_label(&rounds[0][l]),
                m[0],
                each.join(", "),
                m[1],
                m[2],
                m[3],
            );
        }
    }
}

/// Every level of the workload against one server (after a warm-up request): its reports, its
/// idle resident memory and its peak during each run (MiB; only for servers started here).
async fn bench_server(
    a: &LoadBenchArgs,
    wl: &Workload,
    name: &str,
    url: &str,
    pid: Option<u32>,
) -> Result<(Vec<LoadReport>, Rss)> {
    wait_healthy(url, Duration::from_secs(300)).await?;
    let model = match &a.model_id {
        Some(m) => m.clone(),
        None => discover_model(url).await?,
    };
    warm_up(a, wl, url, &model).await;
    let idle_rss = pid.and_then(rss_mib);
    let mut reports = Vec::new();
    let mut peaks = Vec::new();
    for (level, arrival) in levels(a).into_iter().enumerate() {
        // Fresh text per level, so no level is served from an earlier level's cache
        // (the shared system prompt of `shared-prefix` stays shared within a level).
        let level_wl = Workload {
            seed: wl.seed.wrapping_add(1_000_003 * (level as u64 + 1)),
            ..wl.clone()
        };
        let runs = match a.long_prompt {
            // Without, then with the long prompt (fresh text, so the second run does
            // not find the first one's prompts cached).
            Some(n) => vec![None, Some(n)],
            None => vec![None],
        };
        for long_prompt in runs {
            let level_wl = Workload {
                seed: level_wl.seed ^ u64::from(long_prompt.is_some()) << 40,
                ..level_wl.clone()
            };
            eprintln!(
                "{name}: {}{} ({} requests)",
                level_label(&arrival),
                long_prompt.map_or(String::new(), |n| format!(" + one {n}-token prompt")),
                wl.total_requests()
            );
            let sampler = pid.map(RssSampler::start);
            let report = run_load(&LoadConfig {
                url: url.to_string(),
                model: model.clone(),
                arrival,
                workload: level_wl.clone(),
                timeout: Duration::from_secs(a.timeout),
                progress: true,
                long_prompt,
            })
            .await?;
            let peak = sampler.and_then(RssSampler::stop);
            print_report(name, &report, peak);
            reports.push(report);
            peaks.push(peak);
        }
    }
    if let Some(rss) = idle_rss {
        println!("{name:<16} idle RSS {rss:.0} MiB");
    }
    if a.long_prompt.is_some() {
        print_interference(name, &reports);
    }
    Ok((reports, (idle_rss, peaks)))
}

/// One request, so that first-touch costs do not land in the first level.
async fn warm_up(a: &LoadBenchArgs, wl: &Workload, url: &str, model: &str) {
    let warm = Workload {
        requests: 1,
        kind: WorkloadKind::Fixed,
        output_tokens: 4,
        seed: wl.seed ^ 0xDEAD_BEEF,
        ..wl.clone()
    };
    let _ = run_load(&LoadConfig {
        url: url.to_string(),
        model: model.to_string(),
        arrival: Arrival::Concurrency(1),
        workload: warm,
        timeout: Duration::from_secs(a.timeout),
        progress: false,
        long_prompt: None,
    })
    .await;
}

/// Where servers were compared (they come in pairs, tier by tier; see `plan_servers`), how the
/// first of each pair compares with the second at each level (each measure's median over the
/// rounds).
fn print_ratios(labels: &[String], medians: &[(String, Vec<Measures>)], compared: bool) {
    if !compared {
        return;
    }
    for pair in medians.chunks(2) {
        let [(a, x), (b, y)] = pair else { continue };
        println!("\nratios ({a} / {b}):");
        for ((label, x), y) in labels.iter().zip(x).zip(y) {
            println!(
                "  {label:<7} output tok/s {:.2}x | mean TTFT {:.2}x lower | p50 ITL {:.2}x lower | p99 ITL {:.2}x lower",
                x[0] / y[0].max(1e-9),
                y[1] / x[1].max(1e-9),
                y[2] / x[2].max(1e-9),
                y[3] / x[3].max(1e-9),
            );
        }
    }
}

/// The JSON report and the plot, where asked for.
fn write_outputs(
    a: &LoadBenchArgs,
    wl: &Workload,
    all: &[(String, Vec<LoadReport>)],
    rss: &[Rss],
) -> Result<()> {
    if let Some(path) = &a.json_out {
        let doc = serde_json::json!({
            "workload": wl,
            "servers": all.iter().zip(rss).map(|((n, r), (idle, peaks))| serde_json::json!({
                "name": n, "levels": r, "idle_rss_mib": idle, "peak_rss_mib": peaks,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        let series: Vec<(String, Vec<CurvePoint>)> = all
            .iter()
            .map(|(n, reps)| {
                (
                    n.clone(),
                    reps.iter()
                        .map(|r| {
                            (
                                r.summary.output_tok_s,
                                r.summary.itl_ms.p50,
                                level_label(&r.arrival),
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        let svg = latency_throughput_svg(
            "Latency vs throughput",
            "p50 inter-token latency (ms)",
            &series,
        );
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lastmile_bench::{Percentiles, Summary};

    fn report(tok_s: f64, ttft: f64, p99: f64) -> LoadReport {
        let pct = |v: f64| Percentiles {
            mean: v,
            p50: v,
            p99: v,
            ..Percentiles::default()
        };
        LoadReport {
            arrival: Arrival::Concurrency(16),
            summary: Summary {
                completed: 1,
                errors: 0,
                error_samples: Vec::new(),
                duration_s: 1.0,
                prompt_tokens: 0,
                output_tokens: 0,
                output_tok_s: tok_s,
                requests_s: 1.0,
                ttft_ms: pct(ttft),
                itl_ms: pct(p99),
                e2e_ms: pct(1.0),
            },
            requests: Vec::new(),
            long_prompt: None,
        }
    }

    /// Each measure's median is taken on its own (the round with the median throughput need
    /// not have the median latency), and the representative round is a real one.
    #[test]
    fn medians_over_rounds() {
        let rounds = vec![
            vec![report(300.0, 900.0, 70.0)],
            vec![report(250.0, 1500.0, 200.0)],
            vec![report(350.0, 1100.0, 90.0)],
        ];
        assert_eq!(median_measures(&rounds), vec![[300.0, 1100.0, 90.0, 90.0]]);
        let picked = median_runs(rounds);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].summary.output_tok_s, 300.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        // Two rounds: the lower of the two is the representative run.
        let two = vec![vec![report(10.0, 1.0, 1.0)], vec![report(20.0, 1.0, 1.0)]];
        assert_eq!(median_runs(two)[0].summary.output_tok_s, 10.0);
    }
}
