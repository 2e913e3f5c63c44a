//! Loading a llama-family model's weights, by the names GGUF and Hugging Face give them.
//!
//! GGUF tensors in a format with a kernel (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) stay in
//! the memory map: loading touches no weight bytes. Q4_K is rewritten as Q4_1, Q5_K as Q5_1 and
//! Q6_K as Q8_0 (`kernels::kquant`); other GGUF formats (Q2_K, Q3_K, ...) are dequantized by
//! candle and re-quantized to Q8_0 at load. Rewriting runs on every core. Safetensors weights
//! are copied out of candle's map in their own float format.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels::{
    kquant, quantize_q8_0, zeroed_huge, Packing, QKind, QMatrix, WeightBytes, QK,
};

/// One decoder block's weights.
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// Query projection (`q_dim x hidden`).
    pub wq: QMatrix,
    /// Key projection (`kv_dim x hidden`).
    pub wk: QMatrix,
    /// Value projection (`kv_dim x hidden`).
    pub wv: QMatrix,
    /// Optional Q/K/V biases (Qwen2).
    pub bias_qkv: Option<[Vec<f32>; 3]>,
    /// Attention output projection (`hidden x q_dim`).
    pub wo: QMatrix,
    /// RMSNorm before the feed-forward.
    pub ffn_norm: Vec<f32>,
    /// SwiGLU gate (`ffn x hidden`).
    pub w_gate: QMatrix,
    /// SwiGLU up (`ffn x hidden`).
    pub w_up: QMatrix,
    /// Down projection (`hidden x ffn`).
    pub w_down: QMatrix,
}

/// All weights of a model.
pub struct Weights {
    /// Token embedding (`vocab x hidden`), rows dequantized on lookup.
    pub embed: QMatrix,
    /// Decoder blocks.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm.
    pub out_norm: Vec<f32>,
    /// Output projection (`vocab x hidden`); the embedding when tied.
    pub output: QMatrix,
    /// Llama 3.1-style per-frequency RoPE divisors, if the model has them.
    pub rope_freqs: Option<Vec<f32>>,
}

impl Weights {
    /// A fingerprint of the weights (every matrix's shape, layout and edges, every norm): two
    /// models whose keys and values could differ disagree on it. What the KV tier on disk
    /// names its blocks' model by.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher13::new();
        let floats = |h: &mut siphasher::sip::SipHasher13, v: &[f32]| {
            v.iter().for_each(|x| h.write_u32(x.to_bits()))
        };
        self.embed.fingerprint(&mut h);
        self.output.fingerprint(&mut h);
        floats(&mut h, &self.out_norm);
        floats(&mut h, self.rope_freqs.as_deref().unwrap_or_default());
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                m.fingerprint(&mut h);
            }
            floats(&mut h, &l.attn_norm);
            floats(&mut h, &l.ffn_norm);
            for b in l.bias_qkv.iter().flatten() {
                floats(&mut h, b);
            }
        }
        h.finish()
    }

    /// Bytes of weights read for one token's forward pass (every matrix once, embedding row aside).
    pub fn bytes_per_token(&self) -> usize {
        let layer: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.byte_len())
                    .sum::<usize>()
            })
            .sum();
        layer + self.output.byte_len()
    }

    /// Every matrix the forward pass multiplies, in the layout of this CPU's fastest kernels
    /// (`QMatrix::for_this_cpu`: repacked for AVX-512 or AVX2 where they run). The embedding
    /// stays as it is: it is only read a row at a time.
    ///
    /// The repacked matrices share one buffer on transparent huge pages, laid out in the order
    /// a step reads them (layer by layer, Q K V O gate up down, then the output): a decode step
    /// streams the whole buffer front to back, each matrix's bytes right after the previous
    /// one's, without a TLB miss every 4 KiB (separate allocations of the layer matrices, each
    /// under 2 MiB, never got huge pages).
    fn for_this_cpu(mut self) -> Self {
        let mut mats: Vec<&mut QMatrix> = Vec::new();
        for l in &mut self.layers {
            mats.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        mats.push(&mut self.output);
        // Where each repacked matrix goes: cache-line aligned, in forward order.
        const ALIGN: usize = 64;
        let mut at = 0;
        let plans: Vec<Option<(Packing, usize, usize)>> = mats
            .iter()
            .map(|m| {
                m.packing_plan().map(|(p, len)| {
                    let start = at;
                    at = (at + len).next_multiple_of(ALIGN);
                    (p, start, len)
                })
            })
            .collect();
        // A cache line more, so the first matrix (hence every one) can start on a line.
        let mut arena = zeroed_huge(at + ALIGN);
        let pad = arena.as_ptr().align_offset(ALIGN);
        let plans: Vec<Option<(Packing, usize, usize)>> = plans
            .into_iter()
            .map(|p| p.map(|(packing, start, len)| (packing, start + pad, len)))
            .collect();
        // Disjoint windows of the arena, one per repacked matrix.
        let mut windows: Vec<Option<&mut [u8]>> = Vec::with_capacity(mats.len());
        let mut rest: &mut [u8] = &mut arena;
        let mut consumed = 0;
        for plan in &plans {
            windows.push(plan.map(|(_, start, len)| {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - consumed);
                let (mine, tail) = tail.split_at_mut(len);
                rest = tail;
                consumed = start + len;
                mine
            }));
        }
        // Repacking reads and writes every weight byte once: spread it over the cores (it is
        // part of every cold start). Largest first, each to the least-loaded thread.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        type Job<'a> = (&'a QMatrix, Packing, &'a mut [u8]);
        let mut shares: Vec<(usize, Vec<Job<'_>>)> =
            (0..threads).map(|_| (0, Vec::new())).collect();
        let mut work: Vec<Job<'_>> = mats
            .iter()
            .zip(&plans)
            .zip(windows)
            .filter_map(|((m, plan), w)| Some((&**m, plan.as_ref()?.0, w?)))
            .collect();
        work.sort_by_key(|(_, _, w)| std::cmp::Reverse(w.len()));
        for job in work {
            let share = shares
                .iter_mut()
                .min_by_key(|s| s.0)
                .expect("at least one thread");
            share.0 += job.2.len();
            share.1.push(job);
        }
        std::thread::scope(|scope| {
            for (_, share) in shares {
                scope.spawn(move || {
                    for (m, packing, dst) in share {
                        m.pack_into(packing, dst);
                    }
                });
            }
        });
        let arena = Arc::new(arena);
        for (m, plan) in mats.into_iter().zip(plans) {
            if let Some((packing, start, len)) = plan {
                let bytes = WeightBytes::Shared {
                    buf: arena.clone(),
                    start,
                    len,
                };
                *m = m.with_packed(packing, bytes);
            }
        }
        self
    }

    /// Loads from a GGUF file.
    pub fn from_gguf(f: &GgufFile, cfg: &ModelConfig) -> Result<Self> {
        const LAYER_MATRICES: [&str; 7] = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        let tied = f.tensor("output.weight").is_none();
        let mut names = vec!["token_embd.weight".to_string()];
        if !tied {
            names.push("output.weight".to_string());
        }
        for i in 0..cfg.layers {
            names.extend(LAYER_MATRICES.iter().map(|m| format!("blk.{i}.{m}.weight")));
        }
        let mut mats = gguf_matrices(f, &names)?.into_iter();
        let mut next = || mats.next().expect("one matrix per name");
        let embed = next();
        let output = if tied { embed.clone() } else { next() };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias_qkv = if f.tensor(&n("attn_q.bias")).is_some() {
                Some([
                    gguf_vector(f, &n("attn_q.bias"))?,
                    gguf_vector(f, &n("attn_k.bias"))?,
                    gguf_vector(f, &n("attn_v.bias"))?,
                ])
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: gguf_vector(f, &n("attn_norm.weight"))?,
                wq: next(),
                wk: next(),
                wv: next(),
                bias_qkv,
                wo: next(),
                ffn_norm: gguf_vector(f, &n("ffn_norm.weight"))?,
                w_gate: next(),
                w_up: next(),
                w_down: next(),
            });
        }
        let rope_freqs = match f.tensor("rope_freqs.weight") {
            Some(_) => Some(gguf_vector(f, "rope_freqs.weight")?),
            None => None,
        };
        let w = Self {
            embed,
            layers,
            out_norm: gguf_vector(f, "output_norm.weight")?,
            output,
            rope_freqs,
        };
        w.check_shapes(cfg)?;
        Ok(w.for_this_cpu())
    }

    /// Loads from Hugging Face safetensors files.
    pub fn from_safetensors(files: &[std::path::PathBuf], cfg: &ModelConfig) -> Result<Self> {
        // SAFETY: the files are mapped read-only and not modified while mapped (memmap2's caveat).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| EngineError::InvalidModel(format!("reading safetensors: {e}")))?;
        let load = |name: &str| -> Result<Tensor> {
            st.load(name, &Device::Cpu)
                .map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))
        };
        let has = |name: &str| st.get(name).is_ok();
        let matrix = |name: &str| -> Result<QMatrix> { tensor_matrix(name, &load(name)?) };
        let vector = |name: &str| -> Result<Vec<f32>> {
            load(name)?
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))
        };
        let embed = matrix("model.embed_tokens.weight")?;
        let output = if has("lm_head.weight") {
            matrix("lm_head.weight")?
        } else {
            embed.clone()
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let bias_qkv = if has(&n("self_attn.q_proj.bias")) {
                Some([
                    vector(&n("self_attn.q_proj.bias"))?,
                    vector(&n("self_attn.k_proj.bias"))?,
                    vector(&n("self_attn.v_proj.bias"))?,
                ])
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: vector(&n("input_layernorm.weight"))?,
                wq: matrix(&n("self_attn.q_proj.weight"))?,
                wk: matrix(&n("self_attn.k_proj.weight"))?,
                wv: matrix(&n("self_attn.v_proj.weight"))?,
                bias_qkv,
                wo: matrix(&n("self_attn.o_proj.weight"))?,
                ffn_norm: vector(&n("post_attention_layernorm.weight"))?,
                w_gate: matrix(&n("mlp.gate_proj.weight"))?,
                w_up: matrix(&n("mlp.up_proj.weight"))?,
                w_down: matrix(&n("mlp.down_proj.weight"))?,
            });
        }
        let w = Self {
            embed,
            layers,
            out_norm: vector("model.norm.weight")?,
            output,
            rope_freqs: None,
        };
        w.check_shapes(cfg)?;
        Ok(w.for_this_cpu())
    }

    fn check_shapes(&self, cfg: &ModelConfig) -> Result<()> {
        let expect = |what: &str, m: &QMatrix, rows: usize, cols: usize| {
            if m.rows != rows || m.cols != cols {
                Err(EngineError::InvalidModel(format!(
                    "{what} is {}x{}, expected {rows}x{cols} from the model config",
                    m.rows, m.cols
                )))
            } else {
                Ok(())
            }
        };
        let (h, q, kv, ff) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_hidden);
        expect("embedding", &self.embed, cfg.vocab, h)?;
        expect("output", &self.output, cfg.vocab, h)?;
        for (i, l) in self.layers.iter().enumerate() {
            let w = |s: &str| format!("layer {i} {s}");
            expect(&w("q"), &l.wq, q, h)?;
            expect(&w("k"), &l.wk, kv, h)?;
            expect(&w("v"), &l.wv, kv, h)?;
            expect(&w("o"), &l.wo, h, q)?;
            expect(&w("gate"), &l.w_gate, ff, h)?;
            expect(&w("up"), &l.w_up, ff, h)?;
            expect(&w("down"), &l.w_down, h, ff)?;
            if l.attn_norm.len() != h || l.ffn_norm.len() != h {
                return Err(EngineError::InvalidModel(format!(
                    "layer {i} norm width mismatch"
                )));
            }
        }
        Ok(())
    }
}

fn missing(name: &str) -> EngineError {
    EngineError::InvalidModel(format!("tensor {name} is missing"))
}

fn native_kind(d: GgmlDType) -> Option<QKind> {
    Some(match d {
        GgmlDType::F32 => QKind::F32,
        GgmlDType::F16 => QKind::F16,
        GgmlDType::BF16 => QKind::BF16,
        GgmlDType::Q4_0 => QKind::Q4_0,
        GgmlDType::Q4_1 => QKind::Q4_1,
        GgmlDType::Q8_0 => QKind::Q8_0,
        GgmlDType::Q5_0 => QKind::Q5_0,
        GgmlDType::Q5_1 => QKind::Q5_1,
        _ => return None,
    })
}

fn dequantize_gguf(f: &GgufFile, name: &str) -> Result<Vec<f32>> {
    let t = f.tensor(name).ok_or_else(|| missing(name))?;
    let bytes = f.tensor_bytes(t);
    let err = |e: candle_core::Error| {
        EngineError::InvalidModel(format!("tensor {name} ({:?}): {e}", t.dtype))
    };
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, t.dtype).map_err(err)?;
    QTensor::new(storage, t.dims.clone())
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(err)
}

/// A rewrite of whole k-quant data into another format's blocks.
type Rewrite = fn(&[u8]) -> Vec<u8>;

/// The k-quants rewritten straight from their blocks (`kernels::kquant`): into what kind, by what.
fn k_rewrite(d: GgmlDType) -> Option<(QKind, Rewrite)> {
    Some(match d {
        GgmlDType::Q4K => (QKind::Q4_1, kquant::q4k_to_q4_1),
        GgmlDType::Q5K => (QKind::Q5_1, kquant::q5k_to_q5_1),
        GgmlDType::Q6K => (QKind::Q8_0, kquant::q6k_to_q8_0),
        _ => return None,
    })
}

/// A 2-D GGUF tensor as a matrix (zero-copy when a kernel exists for its format).
pub fn gguf_matrix(f: &GgufFile, name: &str) -> Result<QMatrix> {
    let t = f.tensor(name).ok_or_else(|| missing(name))?;
    if t.dims.len() != 2 {
        return Err(EngineError::InvalidModel(format!(
            "tensor {name} has shape {:?}, expected 2-D",
            t.dims
        )));
    }
    let (rows, cols) = (t.dims[0], t.dims[1]);
    let bad = |e: String| EngineError::InvalidModel(format!("tensor {name}: {e}"));
    match native_kind(t.dtype) {
        Some(kind) => QMatrix::new(
            kind,
            rows,
            cols,
            WeightBytes::Mapped {
                mmap: f.mmap().clone(),
                start: t.start,
                len: t.len,
            },
        )
        .map_err(bad),
        None => {
            let whole = cols.is_multiple_of(kquant::Q4K_WEIGHTS);
            if let Some((kind, rewrite)) = k_rewrite(t.dtype).filter(|_| whole) {
                let bytes = &f.mmap()[t.start..t.start + t.len];
                let owned = WeightBytes::Owned(Arc::new(rewrite(bytes)));
                return QMatrix::new(kind, rows, cols, owned).map_err(bad);
            }
            let values = dequantize_gguf(f, name)?;
            let (kind, bytes) = if cols % QK == 0 {
                (QKind::Q8_0, quantize_q8_0(&values))
            } else {
                (
                    QKind::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            };
            QMatrix::new(kind, rows, cols, WeightBytes::Owned(Arc::new(bytes))).map_err(bad)
        }
    }
}

/// The 2-D GGUF tensors `names` as matrices, in order. Those in a format without a kernel are
/// rewritten (`gguf_matrix`), which reads and writes every weight: spread over the cores, as
/// the repacking after it is (it is part of every cold start of a k-quant file).
fn gguf_matrices(f: &GgufFile, names: &[String]) -> Result<Vec<QMatrix>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, Result<QMatrix>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.min(names.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(name) = names.get(i) else {
                            return mine;
                        };
                        mine.push((i, gguf_matrix(f, name)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, m)| m).collect()
}

/// A 1-D GGUF tensor as f32 values.
pub fn gguf_vector(f: &GgufFile, name: &str) -> Result<Vec<f32>> {
    let t = f.tensor(name).ok_or_else(|| missing(name))?;
    match native_kind(t.dtype) {
        Some(kind) if !kind.wants_q8() => {
            let n: usize = t.dims.iter().product();
            let m = QMatrix::new(
                kind,
                1,
                n,
                WeightBytes::Mapped {
                    mmap: f.mmap().clone(),
                    start: t.start,
                    len: t.len,
                },
            )
            .map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))?;
            let mut out = vec![0.0; n];
            m.dequantize_row(0, &mut out);
            Ok(out)
        }
        _ => dequantize_gguf(f, name),
    }
}

fn tensor_matrix(name: &str, t: &Tensor) -> Result<QMatrix> {
    let err = |e: String| EngineError::InvalidModel(format!("tensor {name}: {e}"));
    let dims = t.dims().to_vec();
    if dims.len() != 2 {
        return Err(err(format!("shape {dims:?}, expected 2-D")));
    }
    let ce = |e: candle_core::Error| err(e.to_string());
    let flat = t.flatten_all().map_err(ce)?;
    let (kind, bytes): (QKind, Vec<u8>) = match t.dtype() {
        DType::F16 => (
            QKind::F16,
            flat.to_vec1::<half::f16>()
                .map_err(ce)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            QKind::BF16,
            flat.to_vec1::<half::bf16>()
                .map_err(ce)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            QKind::F32,
            flat.to_dtype(DType::F32)
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(ce)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    QMatrix::new(kind, dims[0], dims[1], WeightBytes::Owned(Arc::new(bytes))).map_err(err)
}

/// Lists the `*.safetensors` files of a model folder, sorted.
pub fn safetensor_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(format!("reading {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::InvalidModel(format!(
            "{} has no *.safetensors files",
            dir.display()
        )));
    }
    Ok(files)
}
