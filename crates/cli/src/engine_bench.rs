//! `lastmile engine-bench`: prefill and decode throughput of the engine itself (no HTTP), in the
//! shape of llama.cpp's `llama-bench` (pp = prompt processing of N tokens, tg = generation of N
//! tokens), plus this machine's memory read bandwidth for the physical limit.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lastmile_engine::{EngineHandle, GenerateRequest, GenerationEvent, SamplingParams};

use crate::ModelArgs;

/// Options of `engine-bench`.
#[derive(Args)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Generated tokens for the decode measurement.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also decode this many streams at once (each --gen-tokens after a one-token prompt) and
    /// report their summed output tok/s: batched decode without HTTP in the way (0: skip).
    #[arg(long, default_value_t = 0)]
    streams: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Runs one request to the end; returns (time to first token, time of the rest, tokens generated).
fn time_request(
    engine: &EngineHandle,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Result<(f64, f64, usize)> {
    let start = Instant::now();
    let mut stream = engine.submit(GenerateRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        ignore_eos: true,
        logprobs: None,
        prompt_logprobs: None,
        grammar: None,
        // The engine as it is: no drafts, whatever the server default.
        speculation: Some(lastmile_engine::Speculation::OFF),
    })?;
    let mut first = None;
    let mut n = 0;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            GenerationEvent::Token { .. } => {
                n += 1;
                first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::PromptLogprobs(_) => {}
            GenerationEvent::Failed(e) => anyhow::bail!("{e}"),
        }
    }
    let total = start.elapsed().as_secs_f64();
    let first = first.unwrap_or(total);
    Ok((first, total - first, n))
}

/// Decodes `streams` requests at once, each `gen` tokens after a one-token prompt of its own;
/// returns their summed output tok/s (every token over the wall time from submission to the
/// last one finished).
fn batched_decode(engine: &EngineHandle, streams: usize, gen: usize, vocab: u32) -> Result<f64> {
    let start = Instant::now();
    let tokens = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams as u32)
            .map(|i| {
                let prompt = vec![1000 + (i * 7919) % (vocab - 2000)];
                s.spawn(move || time_request(engine, prompt, gen).map(|(_, _, n)| n))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a stream's thread panicked"))?
            })
            .sum::<Result<usize>>()
    })?;
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Reads a buffer larger than the caches with both cores; returns GB/s.
fn memory_read_bandwidth(buf: &[u64]) -> f64 {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(buf.len().div_ceil(threads))
                .map(|c| s.spawn(move || xor_all(c)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, |a, b| a ^ b)
        });
        std::hint::black_box(sum);
        best = best.max(std::mem::size_of_val(buf) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// XOR of every word, in eight independent lanes: about one vector instruction per 16 bytes
/// even without AVX, so the loop waits on memory, never on arithmetic (a plain widening sum
/// was compute-bound near 20 GB/s a core and made the limit look lower than it is).
fn xor_all(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (l, w) in lanes.iter_mut().zip(c) {
            *l ^= w;
        }
    }
    chunks
        .remainder()
        .iter()
        .fold(lanes.iter().fold(0, |a, b| a ^ b), |a, b| a ^ b)
}

/// This CPU's last-level (L3) cache in bytes, from sysfs (`None` where it says nothing).
fn l3_bytes() -> Option<u64> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.flatten().find_map(|e| {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
        if read("level")?.trim() != "3" {
            return None;
        }
        let size = read("size")?;
        let size = size.trim();
        let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let n: u64 = digits.parse().ok()?;
        match unit {
            "K" => Some(n << 10),
            "M" => Some(n << 20),
            _ => None,
        }
    })
}

/// Bytes read per bandwidth measurement: well past any last-level cache.
const BANDWIDTH_BYTES: usize = 512 << 20;

/// Runs the benchmark.
pub fn run(mut args: EngineBenchArgs) -> Result<()> {
    // Every repetition sends the same prompt: measure computing it, not finding it cached.
    args.model.no_prefix_cache = true;
    let (engine, id) = args.model.start_engine()?;
    let vocab = engine.info().vocab_size as u32;
    // A deterministic pseudo-text prompt of ordinary tokens (as llama-bench uses random tokens).
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| 1000 + (i * 7919) % (vocab - 2000))
        .collect();
    // Warm-up: page the weights in and size every buffer.
    time_request(&engine, prompt.clone(), 2)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let bar = indicatif::ProgressBar::new(args.repeats as u64 * 2).with_message("engine-bench");
    // The memory read rate is measured in every round, right before and right after its decode
    // (the round's rate is the mean of the two): on a shared machine it drifts by a third within
    // minutes, so each decode is set against the rate of its own moment, taken on both sides of
    // it (the share reported is the median of those per-round shares).
    // On a GPU the host's memory is not what decode reads: no limit is measured there.
    let device = engine.info().device.clone();
    let on_cpu = device.device == "cpu";
    let bw_buf: Vec<u64> = if on_cpu {
        (0..BANDWIDTH_BYTES as u64 / 8).collect()
    } else {
        Vec::new()
    };
    let bytes = engine.info().weight_bytes_per_token as f64;
    let mut bws = Vec::new();
    let mut shares = Vec::new();
    for _ in 0..args.repeats {
        let (ttft, _, _) = time_request(&engine, prompt.clone(), 1)?;
        pp.push(args.prompt_tokens as f64 / ttft);
        bar.inc(1);
        let before = on_cpu.then(|| memory_read_bandwidth(&bw_buf));
        let (_, rest, n) = time_request(&engine, vec![prompt[0]], args.gen_tokens + 1)?;
        tg.push((n - 1) as f64 / rest);
        if let Some(before) = before {
            bws.push((before + memory_read_bandwidth(&bw_buf)) / 2.0);
            shares.push(tg[tg.len() - 1] / (bws[bws.len() - 1] * 1e9 / bytes));
        }
        bar.inc(1);
    }
    let mut batched = Vec::new();
    if args.streams > 0 {
        for _ in 0..args.repeats {
            batched.push(batched_decode(
                &engine,
                args.streams,
                args.gen_tokens,
                vocab,
            )?);
        }
    }
    bar.finish_and_clear();
    let batched_med = median(&mut batched.clone());
    // `None` on a GPU (nothing measured).
    let bw = on_cpu.then(|| median(&mut bws.clone()));
    let limit = bw.map(|bw| bw * 1e9 / bytes);
    let share = on_cpu.then(|| median(&mut shares));
    let (pp_med, tg_med) = (median(&mut pp.clone()), median(&mut tg.clone()));
    let kernels = if on_cpu {
        lastmile_engine::kernels::simd_name().to_string()
    } else {
        format!(
            "{} ({})",
            device.device,
            device.name.as_deref().unwrap_or("GPU")
        )
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": id, "threads": args.model.threads,
                "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                "prefill_tok_s": pp, "decode_tok_s": tg,
                "prefill_tok_s_median": pp_med, "decode_tok_s_median": tg_med,
                "mem_read_gb_s": bw, "mem_read_gb_s_rounds": bws,
                "weight_bytes_per_token": bytes, "decode_limit_tok_s": limit,
                "decode_share_of_limit": share,
                "l3_bytes": l3_bytes(),
                "kernels": kernels,
                "streams": args.streams, "streams_tok_s": batched,
                "streams_tok_s_median": batched_med,
            })
        );
    } else {
        println!(
            "model {id}: prefill {} tokens: {pp_med:.1} tok/s (median of {})",
            args.prompt_tokens, args.repeats
        );
        println!(
            "model {id}: decode {} tokens: {tg_med:.1} tok/s (median of {})",
            args.gen_tokens, args.repeats
        );
        if args.streams > 0 {
            println!(
                "model {id}: {} streams decoding {} tokens each: {batched_med:.1} output tok/s \
                 (median of {})",
                args.streams, args.gen_tokens, args.repeats
            );
        }
        match (bw, limit, share) {
            (Some(bw), Some(limit), Some(share)) => {
                println!(
                    "memory read {bw:.1} GB/s / {:.1} MB per token = decode limit {limit:.0} tok/s \
                     (medians; decode at {:.0}% of the limit measured around it in its own round; \
                     kernels: {kernels})",
                    bytes / 1e6,
                    100.0 * share
                );
                if let Some(l3) = l3_bytes().filter(|l3| *l3 as f64 >= bytes) {
                    println!(
                        "the weights read per token fit in this CPU's L3 cache ({} MiB): decode \
                         can run past a limit set by memory",
                        l3 >> 20
                    );
                }
            }
            _ => println!(
                "device {kernels}: {:.1} MB of weights per token (the host's memory read rate \
                 is no limit on a GPU, so none is measured)",
                bytes / 1e6
            ),
        }
    }
    Ok(())
}
