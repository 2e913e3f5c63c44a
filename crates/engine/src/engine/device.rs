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

/// The forward pass and the KV cache, on the device chosen.
pub(super) struct Executor {
    /// The host cache (empty, zero blocks, when a GPU holds it).
    host: KvCache,
    #[cfg(feature = "cuda")]
    gpu: Option<Box<crate::cuda::DeviceModel>>,
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
        let c = &model.config;
        let (layers, kv_dim) = (c.layers, c.kv_dim());
        match device {
            Device::Cpu => Ok((
                Self {
                    host: KvCache::new(layers, num_blocks, block_size, kv_dim),
                    #[cfg(feature = "cuda")]
                    gpu: None,
                    block_size,
                },
                DeviceReport {
                    device: device.to_string(),
                    name: None,
                    memory_total_bytes: None,
                    memory_used_bytes: None,
                },
            )),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let gpu = crate::cuda::DeviceModel::new(model, ordinal, num_blocks, block_size)
                    .map_err(|e| EngineError::Device(format!("{device}: {e}")))?;
                let (free, total) = gpu
                    .memory()
                    .map_err(|e| EngineError::Device(format!("{device}: {e}")))?;
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
                Ok((
                    Self {
                        host: KvCache::new(layers, 0, block_size, kv_dim),
                        gpu: Some(Box::new(gpu)),
                        block_size,
                    },
                    report,
                ))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(EngineError::Device(format!(
                "{device}: this build has no CUDA support (build lastmile with `--features cuda`)"
            ))),
        }
    }

    /// The cache, block by block.
    pub(super) fn blocks(&self) -> &dyn KvBlocks {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.as_ref();
        }
        &self.host
    }

    /// The cache, block by block, to write.
    pub(super) fn blocks_mut(&mut self) -> &mut dyn KvBlocks {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu {
            return gpu.as_mut();
        }
        &mut self.host
    }

    /// Half floats one block holds across all layers.
    pub(super) fn block_values(&self) -> usize {
        self.blocks().block_values()
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
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu {
            if let Err(e) = gpu.forward(model, tokens, batch, &mut scratch.logits) {
                panic!("GPU step failed: {e}");
            }
            // Attention is not timed apart on the GPU: the pacer sees the whole step.
            scratch.attention_time = std::time::Duration::ZERO;
            return;
        }
        model.forward(tokens, batch, &mut self.host, scratch, pool);
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
