//! `ModelArgs`: the options of every command that loads a model (file, threads, KV cache,
//! batching, speculation, kernels' tier, device), and loading it into a running engine with a
//! progress spinner and the load's stage times.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lastmile_engine::kv_disk::KvDiskConfig;
use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_models::{ensure_default_model, DEFAULT_MODEL_ID};

use crate::StageTimes;

/// Options shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    /// Default: the embedded default model, fetched on first use into $LASTMILE_HOME.
    #[arg(long, env = "LASTMILE_MODEL")]
    pub model: Option<PathBuf>,
    /// Compute threads for the engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// KV cache memory in MiB (at least one full context is always kept).
    #[arg(long, default_value_t = 1024)]
    pub kv_cache_mib: usize,
    /// Most tokens computed in one engine step (decodes plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Most prompt tokens computed in a step that also decodes other streams (a hard cap; within
    /// it, chunks are sized from measured step times to meet --itl-target-ms).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Inter-token latency the decoding streams should keep while prompts are prefilled beside
    /// them, in ms: each step's prefill chunk is sized from the measured cost of decode steps and
    /// prompt tokens to fit it. Default: twice a decode-only step, at least 30 ms.
    #[arg(long, value_parser = positive_ms)]
    pub itl_target_ms: Option<f64>,
    /// Most requests queued before new ones get 503 (with Retry-After).
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Turn off the prefix cache (every prompt is computed from scratch).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// The highest instruction-set tier the kernels may use: auto (the best this CPU has),
    /// avx512 (AVX-512 VNNI, no AMX), avx-vnni (AVX2 with AVX-VNNI, as on an Alder Lake or later
    /// Intel client CPU), avx2 (what an AVX2-only CPU without VNNI runs) or scalar. For
    /// measuring what another machine would see; auto is always at least as fast.
    #[arg(long, value_enum, default_value_t = KernelTier::Auto, env = "LASTMILE_KERNELS")]
    pub kernels: KernelTier,
    /// Where the model runs and its KV cache lives: cpu, cuda (the first GPU) or cuda:N. CUDA
    /// needs a build with `--features cuda` and, on the machine, the NVIDIA driver and NVRTC
    /// 13.0 (the kernels are compiled for the GPU found at start); /health and /metrics report
    /// the device and its memory.
    #[arg(long, default_value = "cpu", env = "LASTMILE_DEVICE")]
    pub device: lastmile_engine::Device,
    /// Speculative decoding by prompt lookup, for requests that do not choose (the
    /// `speculative` request field): most draft tokens verified per step, 0 to 16; 0 turns it
    /// off. Drafts come from earlier text that the last tokens repeat (edits, rewrites, code,
    /// extraction decode 2x+ faster); the output is the same with or without them, greedy or
    /// sampled with a seed; a request whose drafts keep failing stops drafting, and
    /// nobody drafts while more than 8 sequences run.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub speculative_max_draft: u32,
    /// A draft model for speculative decoding: a smaller GGUF (or Hugging Face folder) with
    /// the same tokenizer as the served model (a 0.5B beside a 7B of one family, a 4-bit file
    /// beside a 16-bit one). It runs on the CPU beside the served model and guesses up to
    /// --speculative-max-draft tokens greedily for every request that does not choose (prompt
    /// lookup stays available per request: `"speculative": {"method": "prompt_lookup"}`); the
    /// output is the same as without it. Refused at start when the tokenizers differ.
    #[arg(long, env = "LASTMILE_DRAFT_MODEL")]
    pub draft_model: Option<PathBuf>,
    /// The longest suffix speculative decoding looks up (shorter ones follow, down to 2).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub speculative_ngram: u32,
    /// A KV tier on disk below the prefix cache: blocks evicted from memory are saved under
    /// this directory and read back on a prefix hit instead of being recomputed, and the blocks
    /// still in memory are saved when the server stops. The store outlives the process: a
    /// replica started again (after scale-to-zero) finds its prefixes. Each process takes its
    /// own slot inside, per model; give each machine's replicas the same directory.
    #[arg(long, env = "LASTMILE_KV_DISK_DIR")]
    pub kv_disk_dir: Option<PathBuf>,
    /// Most GiB of block files the disk tier keeps (per process), least recently used dropped
    /// first.
    #[arg(long, default_value_t = 8.0, requires = "kv_disk_dir", value_parser = positive_gib)]
    pub kv_disk_gib: f64,
}

/// `--kernels`: a cap on the kernels' instruction-set tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelTier {
    /// The best this CPU has.
    Auto,
    /// AVX-512 VNNI, no AMX.
    Avx512,
    /// AVX2 + FMA + F16C with AVX-VNNI (Intel client CPUs since Alder Lake, AMD since Zen 5).
    AvxVnni,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// No SIMD.
    Scalar,
}

impl KernelTier {
    /// Caps the engine's kernels (before any model loads); an error if they were already chosen
    /// at another tier.
    fn apply(self) -> Result<()> {
        use lastmile_engine::kernels::{cap_tier, Tier};
        let tier = match self {
            Self::Auto => return Ok(()),
            Self::Avx512 => Tier::Avx512,
            Self::AvxVnni => Tier::AvxVnni,
            Self::Avx2 => Tier::Avx2,
            Self::Scalar => Tier::Scalar,
        };
        anyhow::ensure!(
            cap_tier(tier),
            "--kernels {self:?}: the kernels were already chosen in this process"
        );
        Ok(())
    }
}

fn positive_ms(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!(
            "expected a positive number of milliseconds, got {s:?}"
        )),
    }
}

/// `--kv-disk-gib`: a positive size in GiB.
fn positive_gib(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number of GiB, got {s:?}")),
    }
}

impl ModelArgs {
    /// Loads the model and starts its engine.
    pub fn start_engine(&self) -> Result<(EngineHandle, String)> {
        self.start_engine_timed()
            .map(|(engine, id, _)| (engine, id))
    }

    /// Loads the model and starts its engine; also returns how long each stage took (ms).
    pub fn start_engine_timed(&self) -> Result<(EngineHandle, String, StageTimes)> {
        self.kernels.apply()?;
        let (path, id) = match &self.model {
            Some(p) => (p.clone(), model_id_from_path(p)),
            None => (ensure_default_model()?, DEFAULT_MODEL_ID.to_string()),
        };
        let bar = indicatif::ProgressBar::new_spinner()
            .with_message(format!("loading {}", path.display()));
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        let loaded =
            LoadedModel::load(&path).with_context(|| format!("loading {}", path.display()));
        bar.finish_and_clear();
        let loaded = loaded?;
        let stages: Vec<String> = loaded
            .load_breakdown
            .iter()
            .map(|(stage, s)| format!("{stage} {:.0} ms", s * 1e3))
            .collect();
        tracing::info!(
            "loaded in {:.0} ms: {} (kernels: {})",
            loaded.load_seconds * 1e3,
            stages.join(", "),
            lastmile_engine::kernels::simd_name()
        );
        let mut config = EngineConfig {
            kv_cache_mib: self.kv_cache_mib,
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            kv_cache_tokens: None,
            prefix_cache: !self.no_prefix_cache,
            max_waiting: self.max_waiting,
            prefill_chunk_while_decoding: self.prefill_chunk,
            itl_target_ms: self.itl_target_ms,
            speculation: lastmile_engine::Speculation {
                ngram: self.speculative_ngram as usize,
                max_draft: self.speculative_max_draft as usize,
                // The draft model when there is one, else prompt lookup.
                source: lastmile_engine::DraftSource::Default,
            },
            kv_disk: self.kv_disk_dir.as_ref().map(|dir| KvDiskConfig {
                dir: dir.clone(),
                capacity_bytes: (self.kv_disk_gib * (1u64 << 30) as f64) as u64,
            }),
            device: self.device,
            ..EngineConfig::default()
        };
        if let Some(t) = self.threads {
            config.threads = t;
        }
        let mut timings: Vec<(String, f64)> = loaded
            .load_breakdown
            .iter()
            .map(|(stage, s)| (stage.to_string(), s * 1e3))
            .collect();
        timings.push(("load".into(), loaded.load_seconds * 1e3));
        let draft = match &self.draft_model {
            Some(p) => {
                let d = LoadedModel::load(p)
                    .with_context(|| format!("loading the draft model {}", p.display()))?;
                timings.push(("draft model load".into(), d.load_seconds * 1e3));
                tracing::info!(
                    "draft model {} loaded in {:.0} ms",
                    p.display(),
                    d.load_seconds * 1e3
                );
                Some(d)
            }
            None => None,
        };
        let started = std::time::Instant::now();
        let engine = EngineHandle::start_with_draft(loaded, draft, config)?;
        let engine_ms = started.elapsed().as_secs_f64() * 1e3;
        timings.push(("engine start".into(), engine_ms));
        tracing::info!(
            model = %id,
            load_s = engine.info().load_seconds,
            engine_start_ms = engine_ms,
            "model loaded"
        );
        Ok((engine, id, timings))
    }
}

pub(crate) fn model_id_from_path(p: &std::path::Path) -> String {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").unwrap_or(&name).to_lowercase()
}
