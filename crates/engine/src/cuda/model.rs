//! The llama forward pass on a CUDA device, under the contract of the CPU's
//! (`model::LlamaModel::forward`): one call runs a whole engine step, the tokens of every
//! scheduled sequence (decodes and prefill chunks) in one batch, each attending over its own
//! sequence's paged KV blocks, and the logits of the rows that asked for them come back to the
//! host for sampling (one copy per step).
//!
//! Weights are uploaded once: Q8_0, Q4_1 and Q4_0 matrices in their GGUF layout (multiplied as
//! they are), every other format dequantized to f32. The KV cache lives in device memory in
//! the CPU cache's layout (per layer, keys channel-major inside a block, values slot by slot,
//! f16), so a block read back or written in ([`KvBlocks`]) is the same bytes on either device:
//! the prefix cache, KV events, the disk tier and KV transfer work unchanged. Prefill runs
//! through the decode attention kernel with one query per token, each over the positions up to
//! its own (the chunk's keys are stored first), which is causal attention.
//!
//! Embedding rows, rotary tables, slots and block tables are built on the host and copied each
//! step (a few KB) into buffers at fixed addresses; everything else stays on the device. The
//! launches of the decoder blocks (9 a block) are captured per step shape (tokens, and the
//! attention scratch's stride, a power of two) into a CUDA graph the second time the shape
//! comes, and replayed as one launch after that: a small model's decode step is launch-bound, not bound by the GPU's work.
//! `LASTMILE_CUDA_GRAPHS=0` launches every kernel one by one instead; a capture the driver
//! refuses turns graphs off for the process, with a warning. `LASTMILE_CUDA_FUSED=0` runs each
//! operation as its own kernel (20 a block) instead of the fused ones.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};

use super::{driver_error, AttentionShape, CudaError, DeviceFormat, DeviceInfo, Kernels, Q8Buf};
use crate::kernels::{quantize_q8_0, QKind, QMatrix};
use crate::kv::KvBlocks;
use crate::model::{BatchSeq, LlamaModel};

/// One weight matrix in device memory.
struct Matrix {
    format: DeviceFormat,
    rows: usize,
    cols: usize,
    bytes: CudaSlice<u8>,
}

/// Quantizes `rows` rows of `width` of `x` into `xq` for the products over block formats (which
/// read activations as the CPU engine does: 8 bits per block of 32); widths that are not whole
/// blocks only meet f32 matrices, which read `x` itself.
fn quantize(
    k: &Kernels,
    xq: &mut Q8Buf,
    x: &CudaSlice<f32>,
    (rows, width): (usize, usize),
) -> Result<(), CudaError> {
    if width.is_multiple_of(32) {
        k.quantize(xq, x, rows * width)?;
    }
    Ok(())
}

/// One decoder block's weights in device memory.
struct Layer {
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    bias_qkv: Option<[CudaSlice<f32>; 3]>,
}

/// Activations and inputs of one step, sized for `tokens` rows (grown on demand, never shrunk).
/// A captured graph holds their addresses: growing any of them drops every graph.
struct Buffers {
    tokens: usize,
    /// Rotary tables, `[tokens, head_dim / 2]`.
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// Each token's KV slot, block table offset, and attended length.
    slots: CudaSlice<u32>,
    table_at: CudaSlice<u32>,
    lens: CudaSlice<u32>,
    /// Rows that want logits.
    rows: CudaSlice<u32>,
    /// The input of the next product over block formats, quantized to 8 bits.
    xq: Q8Buf,
    /// The step's block tables, one after another (grown apart from `tokens`).
    x: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    tables: CudaSlice<u32>,
    /// Attention scores, `queries * heads * score_stride` (grown apart from `tokens`).
    scores: CudaSlice<f32>,
}

/// A step's decoder-block launches, captured.
struct StepGraph(CudaGraph);

// SAFETY: a `StepGraph` is only launched or dropped through `&mut DeviceModel`, so never from two
// threads at once; the driver's graph objects only ask for that serialization.
unsafe impl Send for StepGraph {}

/// The most tokens a step may have to be captured as a graph (longer prefill chunks are bound
/// by the GPU's work, not by launches).
const GRAPH_MAX_TOKENS: usize = 256;

/// The most step shapes remembered, captured or seen once (all are forgotten when a new one
/// would pass it).
const GRAPH_CACHE: usize = 512;

/// The smallest stride of the attention scratch (so that decode steps change graph only when
/// the longest context passes a power of two).
const MIN_SCORE_STRIDE: usize = 256;

/// A model's weights and KV cache on one CUDA device, and the step that runs over them.
pub struct DeviceModel {
    kernels: Kernels,
    layers: Vec<Layer>,
    out_norm: CudaSlice<f32>,
    output: Matrix,
    k_cache: Vec<CudaSlice<u16>>,
    v_cache: Vec<CudaSlice<u16>>,
    block_size: usize,
    kv_dim: usize,
    buffers: Option<Buffers>,
    /// Captured steps by (tokens, score stride), and shapes seen once (`None`); `None` when
    /// graphs are off.
    graphs: Option<HashMap<(usize, usize), Option<StepGraph>>>,
    /// Fused kernels (Q/K/V, RoPE with the KV store, add with RMSNorm, the feed-forward with
    /// SwiGLU); `LASTMILE_CUDA_FUSED=0` launches each operation on its own (for checking one
    /// against the other on a GPU).
    fused: bool,
}

fn to_device<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> Result<CudaSlice<T>, CudaError> {
    stream.clone_htod(host).map_err(driver_error)
}

fn zeros(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<f32>, CudaError> {
    stream.alloc_zeros::<f32>(n.max(1)).map_err(driver_error)
}

/// Uploads one matrix: block formats with a kernel as their GGUF bytes, Q5 ones (no device
/// kernel yet) re-quantized to Q8_0, others as f32.
fn upload(stream: &Arc<CudaStream>, m: &QMatrix) -> Result<Matrix, CudaError> {
    let format = match m.kind {
        QKind::Q8_0 | QKind::Q5_0 | QKind::Q5_1 => DeviceFormat::Q8_0,
        QKind::Q4_1 => DeviceFormat::Q4_1,
        QKind::Q4_0 => DeviceFormat::Q4_0,
        QKind::F32 | QKind::F16 | QKind::BF16 => DeviceFormat::F32,
    };
    let rows_f32 = || {
        let mut row = vec![0f32; m.cols];
        let mut all = Vec::with_capacity(m.rows * m.cols);
        for r in 0..m.rows {
            m.dequantize_row(r, &mut row);
            all.extend_from_slice(&row);
        }
        all
    };
    let bytes = match m.kind {
        _ if format == DeviceFormat::F32 => {
            let all: Vec<u8> = rows_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
            to_device(stream, &all)?
        }
        QKind::Q5_0 | QKind::Q5_1 => to_device(stream, &quantize_q8_0(&rows_f32()))?,
        // The CPU may hold it repacked for its kernels: the file layout is what ours read.
        _ => to_device(stream, m.file_layout().bytes())?,
    };
    Ok(Matrix {
        format,
        rows: m.rows,
        cols: m.cols,
        bytes,
    })
}

impl DeviceModel {
    /// Loads the kernels on device `ordinal`, uploads `model`'s weights and allocates a KV cache
    /// of `num_blocks` blocks of `block_size` tokens there.
    pub fn new(
        model: &LlamaModel,
        ordinal: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, CudaError> {
        let c = &model.config;
        if c.rope_dims != c.head_dim {
            return Err(CudaError::Unsupported(format!(
                "rotary embeddings over {} of {} dimensions per head",
                c.rope_dims, c.head_dim
            )));
        }
        if c.head_dim > 256 || !c.head_dim.is_multiple_of(2) {
            return Err(CudaError::Unsupported(format!("head size {}", c.head_dim)));
        }
        let kernels = Kernels::load(ordinal)?;
        let stream = kernels.stream().clone();
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: to_device(&stream, &l.attn_norm)?,
                    ffn_norm: to_device(&stream, &l.ffn_norm)?,
                    wq: upload(&stream, &l.wq)?,
                    wk: upload(&stream, &l.wk)?,
                    wv: upload(&stream, &l.wv)?,
                    wo: upload(&stream, &l.wo)?,
                    gate: upload(&stream, &l.w_gate)?,
                    up: upload(&stream, &l.w_up)?,
                    down: upload(&stream, &l.w_down)?,
                    bias_qkv: match &l.bias_qkv {
                        Some([q, k, v]) => Some([
                            to_device(&stream, q)?,
                            to_device(&stream, k)?,
                            to_device(&stream, v)?,
                        ]),
                        None => None,
                    },
                })
            })
            .collect::<Result<Vec<_>, CudaError>>()?;
        let kv_dim = c.kv_dim();
        let per_layer = num_blocks * block_size * kv_dim;
        let cache = || {
            (0..c.layers)
                .map(|_| stream.alloc_zeros::<u16>(per_layer.max(1)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(driver_error)
        };
        let (k_cache, v_cache) = (cache()?, cache()?);
        let out = Self {
            out_norm: to_device(&stream, &w.out_norm)?,
            output: upload(&stream, &w.output)?,
            layers,
            k_cache,
            v_cache,
            block_size,
            kv_dim,
            buffers: None,
            graphs: (std::env::var("LASTMILE_CUDA_GRAPHS").as_deref() != Ok("0"))
                .then(HashMap::new),
            fused: std::env::var("LASTMILE_CUDA_FUSED").as_deref() != Ok("0"),
            kernels,
        };
        stream.synchronize().map_err(driver_error)?;
        Ok(out)
    }

    /// The device it runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.kernels.device
    }

    /// The device's free and total memory, in bytes.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        self.kernels
            .stream()
            .context()
            .mem_get_info()
            .map_err(driver_error)
    }

    /// Sizes the step buffers for `tokens` rows, `tables` block table entries and `scores`
    /// attention scores; drops every graph when one moves.
    fn buffers(
        &mut self,
        model: &LlamaModel,
        tokens: usize,
        tables: usize,
        scores: usize,
    ) -> Result<(), CudaError> {
        let s = self.kernels.stream().clone();
        let mut moved = false;
        if self.buffers.as_ref().is_none_or(|b| b.tokens < tokens) {
            let c = &model.config;
            let n = tokens.next_power_of_two();
            let (h, qd, kvd, ff) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn_hidden);
            let half = c.head_dim / 2;
            let u32s = |len: usize| s.alloc_zeros::<u32>(len.max(1)).map_err(driver_error);
            // The block tables and the scores are sized by the contexts, not the tokens.
            let (tables, scores) = match self.buffers.take() {
                Some(b) => (b.tables, b.scores),
                None => (u32s(1)?, zeros(&s, 1)?),
            };
            self.buffers = Some(Buffers {
                tokens: n,
                cos: zeros(&s, n * half)?,
                sin: zeros(&s, n * half)?,
                slots: u32s(n)?,
                table_at: u32s(n)?,
                lens: u32s(n)?,
                rows: u32s(n)?,
                xq: Q8Buf::new(&s, n * h.max(qd).max(ff))?,
                x: zeros(&s, n * h)?,
                xn: zeros(&s, n * h)?,
                q: zeros(&s, n * qd)?,
                k: zeros(&s, n * kvd)?,
                v: zeros(&s, n * kvd)?,
                att: zeros(&s, n * qd)?,
                gate: zeros(&s, n * ff)?,
                up: zeros(&s, n * ff)?,
                tmp: zeros(&s, n * h.max(qd))?,
                logits: zeros(&s, n * c.vocab)?,
                tables,
                scores,
            });
            moved = true;
        }
        let b = self.buffers.as_mut().expect("sized above");
        if b.tables.len() < tables {
            b.tables = s
                .alloc_zeros::<u32>(tables.next_power_of_two())
                .map_err(driver_error)?;
            moved = true;
        }
        if b.scores.len() < scores {
            b.scores = zeros(&s, scores.next_power_of_two())?;
            moved = true;
        }
        if moved {
            if let Some(g) = &mut self.graphs {
                g.clear();
            }
        }
        Ok(())
    }

    /// Runs one step over `tokens` (grouped by `seqs`, as for the CPU model), storing their keys
    /// and values in the device cache and writing the logits of the rows that asked for them into
    /// `logits`, in batch order. Returns how many logit rows were produced.
    pub fn forward(
        &mut self,
        model: &LlamaModel,
        tokens: &[u32],
        seqs: &[BatchSeq<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<usize, CudaError> {
        let c = &model.config;
        let n = tokens.len();
        if n == 0 {
            return Ok(0);
        }
        let h = c.hidden;
        let bs = self.block_size;
        // The step's host-side tables.
        let inv_freq = model.inv_freq();
        let half = inv_freq.len();
        let mut x = vec![0f32; n * h];
        let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
        let mut slots = Vec::with_capacity(n);
        let mut tables = Vec::new();
        let (mut table_at, mut lens) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut rows = Vec::new();
        for sq in seqs {
            let at = tables.len() as u32;
            let covered = (sq.pos0 + sq.len).div_ceil(bs);
            tables.extend_from_slice(&sq.blocks[..covered]);
            for j in 0..sq.len {
                let (t, pos) = (sq.start + j, sq.pos0 + j);
                model
                    .weights
                    .embed
                    .dequantize_row(tokens[t] as usize, &mut x[t * h..(t + 1) * h]);
                for (i, f) in inv_freq.iter().enumerate() {
                    let (sn, cs) = (pos as f32 * f).sin_cos();
                    cos[t * half + i] = cs;
                    sin[t * half + i] = sn;
                }
                slots.push(sq.blocks[pos / bs] * bs as u32 + (pos % bs) as u32);
                table_at.push(at);
                lens.push(pos as u32 + 1);
            }
            let first_row = sq.start + sq.len - sq.logit_rows.min(sq.len);
            rows.extend((first_row..sq.start + sq.len).map(|r| r as u32));
        }
        let max_len = lens.iter().copied().max().unwrap_or(1) as usize;
        let stride = max_len.next_power_of_two().max(MIN_SCORE_STRIDE);
        self.buffers(model, n, tables.len(), n * c.heads * stride)?;
        let s = self.kernels.stream().clone();
        let e = driver_error;
        {
            let b = self.buffers.as_mut().expect("sized above");
            s.memcpy_htod(&x, &mut b.x).map_err(e)?;
            s.memcpy_htod(&cos, &mut b.cos).map_err(e)?;
            s.memcpy_htod(&sin, &mut b.sin).map_err(e)?;
            s.memcpy_htod(&slots, &mut b.slots).map_err(e)?;
            s.memcpy_htod(&tables, &mut b.tables).map_err(e)?;
            s.memcpy_htod(&table_at, &mut b.table_at).map_err(e)?;
            s.memcpy_htod(&lens, &mut b.lens).map_err(e)?;
            if !rows.is_empty() {
                s.memcpy_htod(&rows, &mut b.rows).map_err(e)?;
            }
        }
        self.run_blocks(model, n, stride)?;
        let (k, b) = (&self.kernels, self.buffers.as_mut().expect("sized above"));
        let m = rows.len();
        if m > 0 {
            k.gather_rows(&mut b.xn, &b.x, &b.rows.slice(0..m), h)?;
            k.rmsnorm(&mut b.tmp, &b.xn, &self.out_norm, m, c.rms_eps)?;
            quantize(k, &mut b.xq, &b.tmp, (m, h))?;
            let o = &self.output;
            k.matmul(
                &mut b.logits,
                &o.bytes,
                (&b.tmp, &b.xq),
                (o.rows, o.cols, m),
                o.format,
            )?;
            let want = m * c.vocab;
            if logits.len() < want {
                logits.resize(want, 0.0);
            }
            s.memcpy_dtoh(&b.logits.slice(0..want), &mut logits[..want])
                .map_err(e)?;
        }
        s.synchronize().map_err(e)?;
        Ok(m)
    }

    /// The decoder blocks over the step's `n` tokens (inputs already in the buffers): replayed
    /// from the graph of this shape, captured first if there is none, or launched one by one.
    fn run_blocks(&mut self, model: &LlamaModel, n: usize, stride: usize) -> Result<(), CudaError> {
        let key = (n, stride);
        let Some(graphs) = self.graphs.as_mut().filter(|_| n <= GRAPH_MAX_TOKENS) else {
            return self.launch_blocks(model, n, stride);
        };
        match graphs.get(&key) {
            Some(Some(g)) => return g.0.launch().map_err(driver_error),
            // Seen before: worth capturing now.
            Some(None) => {}
            // A shape seen once (a prefill chunk's, say) may never come back: capturing costs
            // more than launching it once, so only its second step is captured.
            None => {
                if graphs.len() >= GRAPH_CACHE {
                    graphs.clear();
                }
                graphs.insert(key, None);
                return self.launch_blocks(model, n, stride);
            }
        }
        let s = self.kernels.stream().clone();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(driver_error)?;
        let launched = self.launch_blocks(model, n, stride);
        // End the capture whatever happened, so that the stream takes launches again.
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        match (launched, graph) {
            (Ok(()), Ok(Some(g))) => {
                g.launch().map_err(driver_error)?;
                if let Some(graphs) = &mut self.graphs {
                    graphs.insert(key, Some(StepGraph(g)));
                }
                Ok(())
            }
            (launched, graph) => {
                // Nothing captured ran: launch the step directly, and never capture again.
                tracing::warn!(
                    "CUDA graph capture failed ({:?}, {:?}): launching kernels one by one",
                    launched.err(),
                    graph.err()
                );
                self.graphs = None;
                self.launch_blocks(model, n, stride)
            }
        }
    }

    /// Queues every decoder block's launches over the step's `n` tokens.
    fn launch_blocks(
        &mut self,
        model: &LlamaModel,
        n: usize,
        stride: usize,
    ) -> Result<(), CudaError> {
        let c = &model.config;
        let (h, qd, ff, hd) = (c.hidden, c.q_dim(), c.ffn_hidden, c.head_dim);
        let bs = self.block_size;
        let k = &self.kernels;
        let b = self.buffers.as_mut().expect("sized by forward");
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: hd,
            block_size: bs,
        };
        let (cos, sin) = (&b.cos, &b.sin);
        let (slots, lens) = (b.slots.slice(0..n), b.lens.slice(0..n));
        let fuse = self.fused;
        // The first block's norm; with fused kernels every later one goes with the residual
        // add before it.
        if let Some(first) = self.layers.first() {
            k.rmsnorm(&mut b.xn, &b.x, &first.attn_norm, n, c.rms_eps)?;
        }
        for (li, l) in self.layers.iter().enumerate() {
            if li > 0 && !fuse {
                k.rmsnorm(&mut b.xn, &b.x, &l.attn_norm, n, c.rms_eps)?;
            }
            if li == 0 || !fuse {
                // Fused, the add + norm before this block quantized it already.
                quantize(k, &mut b.xq, &b.xn, (n, h))?;
            }
            let (wq, wk, wv) = (&l.wq, &l.wk, &l.wv);
            let qkv_fused = fuse
                && wq.format.qkv_kernel().is_some()
                && [wk, wv]
                    .iter()
                    .all(|m| m.format == wq.format && m.cols == wq.cols && m.rows == wk.rows);
            if qkv_fused {
                k.matmul_qkv(
                    (&mut b.q, &mut b.k, &mut b.v),
                    (&wq.bytes, &wk.bytes, &wv.bytes),
                    &b.xq,
                    (wq.rows, wk.rows, wq.cols, n),
                    wq.format,
                )?;
            } else {
                for (out, m) in [(&mut b.q, wq), (&mut b.k, wk), (&mut b.v, wv)] {
                    k.matmul(out, &m.bytes, (&b.xn, &b.xq), (m.rows, m.cols, n), m.format)?;
                }
            }
            if let Some([bq, bk, bv]) = &l.bias_qkv {
                k.bias_add(&mut b.q, bq, n)?;
                k.bias_add(&mut b.k, bk, n)?;
                k.bias_add(&mut b.v, bv, n)?;
            }
            let (kc, vc) = (&mut self.k_cache[li], &mut self.v_cache[li]);
            if fuse {
                let qkv = (&mut b.q, &mut b.k, &b.v);
                k.rope_store(qkv, (cos, sin), (kc, vc), &slots, shape, c.rope_style)?;
            } else {
                k.rope(&mut b.q, cos, sin, (n, c.heads, hd), c.rope_style)?;
                k.rope(&mut b.k, cos, sin, (n, c.kv_heads, hd), c.rope_style)?;
                k.kv_store(kc, vc, &b.k, &b.v, &slots, c.kv_dim(), bs)?;
            }
            k.attention_decode(
                &mut b.att,
                &b.q,
                (&self.k_cache[li], &self.v_cache[li]),
                (&b.tables, &b.table_at, &lens),
                &mut b.scores,
                shape,
                stride,
                (fuse && hd.is_multiple_of(32)).then_some(&mut b.xq),
            )?;
            if !(fuse && hd.is_multiple_of(32)) {
                quantize(k, &mut b.xq, &b.att, (n, qd))?;
            }
            let att = (&b.att, &b.xq);
            k.matmul(&mut b.tmp, &l.wo.bytes, att, (h, qd, n), l.wo.format)?;
            if fuse {
                let (x, xq) = ((&mut b.x, &b.tmp), Some(&mut b.xq));
                k.add_rmsnorm(x, &mut b.xn, xq, &l.ffn_norm, n, c.rms_eps)?;
            } else {
                k.add(&mut b.x, &b.tmp, n * h)?;
                k.rmsnorm(&mut b.xn, &b.x, &l.ffn_norm, n, c.rms_eps)?;
                quantize(k, &mut b.xq, &b.xn, (n, h))?;
            }
            let ffn_fused = fuse
                && l.gate.format == l.up.format
                && l.gate.cols == l.up.cols
                && l.gate.format.swiglu_kernel().is_some();
            if ffn_fused {
                let w = (&l.gate.bytes, &l.up.bytes);
                k.matmul_swiglu(&mut b.gate, w, &b.xq, (ff, h, n), l.gate.format)?;
            } else {
                let xn = (&b.xn, &b.xq);
                k.matmul(&mut b.gate, &l.gate.bytes, xn, (ff, h, n), l.gate.format)?;
                k.matmul(&mut b.up, &l.up.bytes, xn, (ff, h, n), l.up.format)?;
                k.swiglu(&mut b.gate, &b.up, n * ff)?;
            }
            quantize(k, &mut b.xq, &b.gate, (n, ff))?;
            k.matmul(
                &mut b.tmp,
                &l.down.bytes,
                (&b.gate, &b.xq),
                (h, ff, n),
                l.down.format,
            )?;
            match self.layers.get(li + 1) {
                Some(next) if fuse => {
                    let (x, xq) = ((&mut b.x, &b.tmp), Some(&mut b.xq));
                    k.add_rmsnorm(x, &mut b.xn, xq, &next.attn_norm, n, c.rms_eps)?
                }
                // The final norm runs on the rows that want logits only.
                _ => k.add(&mut b.x, &b.tmp, n * h)?,
            }
        }
        Ok(())
    }

    fn block_span(&self, block: u32) -> std::ops::Range<usize> {
        let n = self.block_size * self.kv_dim;
        let at = block as usize * n;
        at..at + n
    }

    fn try_read_block(&self, block: u32, out: &mut Vec<u16>) -> Result<(), CudaError> {
        let span = self.block_span(block);
        let s = self.kernels.stream();
        let mut staging = vec![0u16; span.len()];
        for (k, v) in self.k_cache.iter().zip(&self.v_cache) {
            for half in [k, v] {
                s.memcpy_dtoh(&half.slice(span.clone()), &mut staging[..])
                    .map_err(driver_error)?;
                s.synchronize().map_err(driver_error)?;
                out.extend_from_slice(&staging);
            }
        }
        Ok(())
    }

    fn try_write_block(&mut self, block: u32, data: &[u16]) -> Result<(), CudaError> {
        let span = self.block_span(block);
        let n = span.len();
        let s = self.kernels.stream().clone();
        for ((k, v), layer) in self
            .k_cache
            .iter_mut()
            .zip(&mut self.v_cache)
            .zip(data.chunks_exact(2 * n))
        {
            s.memcpy_htod(&layer[..n], &mut k.slice_mut(span.clone()))
                .map_err(driver_error)?;
            s.memcpy_htod(&layer[n..], &mut v.slice_mut(span.clone()))
                .map_err(driver_error)?;
        }
        s.synchronize().map_err(driver_error)
    }
}

/// Blocks copied between the device cache and the host, in the CPU cache's layout. A failed
/// copy is a device fault the engine cannot continue from: it panics with the driver's error.
impl KvBlocks for DeviceModel {
    fn block_values(&self) -> usize {
        self.k_cache.len() * 2 * self.block_size * self.kv_dim
    }

    fn read_block(&self, block: u32, out: &mut Vec<u16>) {
        if let Err(e) = self.try_read_block(block, out) {
            panic!("reading KV block {block} from the GPU: {e}");
        }
    }

    fn write_block(&mut self, block: u32, data: &[u16]) {
        if let Err(e) = self.try_write_block(block, data) {
            panic!("writing KV block {block} to the GPU: {e}");
        }
    }
}
