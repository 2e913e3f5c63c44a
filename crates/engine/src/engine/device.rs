//! Where the engine's forward pass runs and its KV cache lives: the CPU (host memory, the
//! thread pool's kernels) or, in a build with the `cuda` feature, one GPU (the weights and the
//! cache in its memory, `cuda::DeviceModel`). The scheduler, the prefix cache, leases, imports
//! and the disk tier see only whole blocks ([`KvBlocks`]), in the same layout either way.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::kv::{KvBlocks, KvCache};
use crate::model::{BatchSeq, LlamaModel, Scratch};
use crate::parallel::ThreadPool;

/// A device to run on (`cpu`, `cuda` for the first GPU, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

/// What a worker reports about its device (`/health`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceReport {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name (`None` on the CPU).
    pub name: Option<String>,
    /// The GPU's memory, in bytes.
    pub memory_total_bytes: Option<u64>,
    /// Its memory in use once the weights and the KV cache were allocated, in bytes.
    pub memory_used_bytes: Option<u64>,
}

/// Where the KV cache lives (and so where the forward pass runs).
enum Store {
    /// Host memory; the CPU model's kernels.
    Host(KvCache),
    /// A GPU's memory, with the weights there.
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::cuda::DeviceModel>),
}

/// The forward pass and the KV cache, on the device chosen.
pub(super) struct Executor {
    store: Store,
    /// Tokens per block.
    pub(super) block_size: usize,
}

impl Executor {
    /// Sets up `num_blocks` blocks of KV cache on `device`, and the model there.
    pub(super) fn new(
        model: &LlamaModel,
        device: Device,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<(Self, DeviceReport)> {
        let (store, report) = match device {
            Device::Cpu => {
                let c = &model.config;
                let cache = KvCache::new(c.layers, num_blocks, block_size, c.kv_dim());
                let report = DeviceReport {
                    device: device.to_string(),
                    name: None,
                    memory_total_bytes: None,
                    memory_used_bytes: None,
                };
                (Store::Host(cache), report)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let fault =
                    |e: crate::cuda::CudaError| EngineError::Device(format!("{device}: {e}"));
                let gpu = crate::cuda::DeviceModel::new(model, ordinal, num_blocks, block_size)
                    .map_err(fault)?;
                let (free, total) = gpu.memory().map_err(fault)?;
                let report = DeviceReport {
                    device: device.to_string(),
                    name: Some(gpu.device().name.clone()),
                    memory_total_bytes: Some(total as u64),
                    memory_used_bytes: Some(total.saturating_sub(free) as u64),
                };
                tracing::info!(
                    "{device}: {} ({:.1} GiB), weights and {num_blocks} KV blocks loaded",
                    gpu.device().name,
                    total as f64 / (1u64 << 30) as f64
                );
                (Store::Gpu(Box::new(gpu)), report)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                return Err(EngineError::Device(format!(
                "{device}: this build has no CUDA support (build lastmile with `--features cuda`)"
            )))
            }
        };
        Ok((Self { store, block_size }, report))
    }

    /// The cache, block by block.
    pub(super) fn blocks(&self) -> &dyn KvBlocks {
        match &self.store {
            Store::Host(cache) => cache,
            #[cfg(feature = "cuda")]
            Store::Gpu(gpu) => gpu.as_ref(),
        }
    }

    /// The cache, block by block, to write.
    pub(super) fn blocks_mut(&mut self) -> &mut dyn KvBlocks {
        match &mut self.store {
            Store::Host(cache) => cache,
            #[cfg(feature = "cuda")]
            Store::Gpu(gpu) => gpu.as_mut(),
        }
    }

    /// Runs one step (see `LlamaModel::forward`); the logits land in `scratch.logits`. A device
    /// fault panics (the scheduler fails the requests in flight and goes on).
    pub(super) fn forward(
        &mut self,
        model: &LlamaModel,
        tokens: &[u32],
        batch: &[BatchSeq<'_>],
        scratch: &mut Scratch,
        pool: &ThreadPool,
    ) {
        match &mut self.store {
            Store::Host(cache) => {
                model.forward(tokens, batch, cache, scratch, pool);
            }
            #[cfg(feature = "cuda")]
            Store::Gpu(gpu) => {
                if let Err(e) = gpu.forward(model, tokens, batch, &mut scratch.logits) {
                    panic!("GPU step failed: {e}");
                }
                // Attention is not timed apart on the GPU: the pacer sees the whole step.
                scratch.attention_time = std::time::Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(s.parse::<Device>(), Ok(d));
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "CPU "] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains("is not a device"), "{bad}: {e}");
        }
    }
}
