//! The llama decoder ("LLaMA: Open and Efficient Foundation Language Models", Touvron et al.,
//! 2023): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU feed-forward.
//!
//! One call runs a whole engine step: the tokens of every scheduled sequence (decodes and prefill
//! chunks) are flattened into one batch so each weight matrix is streamed once per step, and each
//! token attends over its own sequence's paged KV blocks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::attention;
use super::config::ModelConfig;
use super::ops;
use super::weights::Weights;
use crate::kernels::{matmul, MatmulTask, Q8Acts, QK};
use crate::kv::KvCache;
use crate::parallel::{SharedMut, ThreadPool};

/// One sequence's slice of a batch.
pub struct BatchSeq<'a> {
    /// Index of its first token in the batch.
    pub start: usize,
    /// Number of its tokens in the batch.
    pub len: usize,
    /// Position of its first batch token in the sequence.
    pub pos0: usize,
    /// Its KV block table (covering every position up to `pos0 + len`).
    pub blocks: &'a [u32],
    /// How many of its last tokens get logits: 0 for none, 1 for the next-token logits, `len`
    /// for every position (prompt log probabilities). Rows are written in batch order.
    pub logit_rows: usize,
}

/// Reusable buffers of the forward pass (grown on demand, never shrunk: no allocation per token
/// once warm).
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: Q8Acts,
    last: Vec<f32>,
    /// Logits of the rows that asked for them, `vocab` floats each, in batch order.
    pub logits: Vec<f32>,
    /// Time the last step spent in attention (the rest is matrix products and small ops).
    pub attention_time: std::time::Duration,
    pos: Vec<usize>,
    seq_of: Vec<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Per thread: attention scores and one group's output heads.
    scores: Vec<Mutex<(Vec<f32>, Vec<f32>)>>,
    /// This layer's attention work items.
    attention_items: Vec<AttentionItem>,
}

/// One attention work item: a run of tokens of a sequence, and query heads `h0..h0 + heads` of
/// the group that shares KV head `kvh`.
#[derive(Clone, Copy)]
struct AttentionItem {
    seq: usize,
    j: usize,
    len: usize,
    kvh: usize,
    h0: usize,
    heads: usize,
}

/// Tokens of one sequence whose queries are computed together in attention.
const ATTENTION_TOKENS: usize = 8;

/// Most bytes of a layer's keys and values prefetched before its projections (see
/// `KvCache::prefetch`): what a core's L2 takes beside the weights streaming through it.
const KV_PREFETCH_BYTES: usize = 256 << 10;

/// Rows below which the per-row work between two products (norms, SwiGLU, quantizing) stays
/// on the calling thread: a pool join costs about as much as a few rows of it (a decode step's
/// norm and quantizing of one 576-wide row take well under a microsecond).
const PARALLEL_ROWS: usize = 8;

/// Calls `f(t)` for every row `t` in `0..n`, split across the pool in contiguous ranges where
/// there are enough rows (a 512-token prefill's norms and quantizing were several percent of
/// it on one thread while the others waited). Each row's arithmetic is the same wherever it
/// runs.
fn for_rows(pool: &ThreadPool, n: usize, f: &(dyn Fn(usize) + Sync)) {
    let threads = pool.threads();
    if n < PARALLEL_ROWS || threads == 1 {
        (0..n).for_each(f);
        return;
    }
    pool.run(&|tid| (n * tid / threads..n * (tid + 1) / threads).for_each(f));
}

/// Quantizes `n` rows of `cols` values of `x` into `acts`, across the pool where worthwhile;
/// nothing where the product that follows takes f32 inputs alone (`quantize` false).
fn quantize_rows(
    pool: &ThreadPool,
    acts: &mut Q8Acts,
    x: &[f32],
    n: usize,
    cols: usize,
    quantize: bool,
) {
    if !quantize {
        return;
    }
    if n < PARALLEL_ROWS || !cols.is_multiple_of(QK) {
        acts.quantize(x, n, cols);
        return;
    }
    let w = acts.writer(n, cols);
    // SAFETY: `for_rows` hands each row to one thread, which alone writes its blocks.
    for_rows(pool, n, &|t| unsafe {
        w.quantize(t, 0, &x[t * cols..(t + 1) * cols])
    });
}

/// `gate = silu(gate) * up` over `n` rows of `width`, each row then quantized into `acts` for
/// the down projection (none where it takes f32 inputs alone); rows split across the pool where
/// worthwhile.
fn swiglu_and_quantize(
    pool: &ThreadPool,
    gate: &mut [f32],
    up: &[f32],
    n: usize,
    width: usize,
    acts: Option<&mut Q8Acts>,
) {
    let acts = match acts {
        Some(acts) if !width.is_multiple_of(QK) => {
            ops::swiglu(&mut gate[..n * width], &up[..n * width]);
            acts.quantize(gate, n, width);
            return;
        }
        acts => acts.map(|a| a.writer(n, width)),
    };
    let g = SharedMut::new(&mut gate[..n * width]);
    for_rows(pool, n, &|t| {
        // SAFETY: `for_rows` hands row `t` to one thread alone, which alone touches it and
        // its blocks of `acts`.
        unsafe {
            let row = g.slice(t * width, width);
            ops::swiglu(row, &up[t * width..(t + 1) * width]);
            if let Some(acts) = &acts {
                acts.quantize(t, 0, row);
            }
        }
    });
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// A loaded llama-family model.
pub struct LlamaModel {
    /// Its shape.
    pub config: ModelConfig,
    /// Its weights.
    pub weights: Weights,
    inv_freq: Vec<f32>,
}

impl LlamaModel {
    /// Wraps config and weights.
    pub fn new(config: ModelConfig, weights: Weights) -> Self {
        let half = config.rope_dims / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = 1.0
                    / config
                        .rope_base
                        .powf(2.0 * i as f32 / config.rope_dims as f32);
                match &weights.rope_freqs {
                    Some(div) if i < div.len() => f / div[i],
                    _ => f,
                }
            })
            .collect();
        Self {
            config,
            weights,
            inv_freq,
        }
    }

    /// The rotary frequencies (per pair of dimensions, `rope_freqs` divisors applied).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Runs one step over `tokens` (grouped by `seqs`), writing their keys and values into `kv`
    /// and the logits of the last `logit_rows` tokens of every sequence into `s.logits`, in batch
    /// order. Returns how many logit rows were produced.
    pub fn forward(
        &self,
        tokens: &[u32],
        seqs: &[BatchSeq<'_>],
        kv: &mut KvCache,
        s: &mut Scratch,
        pool: &ThreadPool,
    ) -> usize {
        let n = tokens.len();
        self.prepare(tokens, seqs, s, pool);
        s.attention_time = std::time::Duration::ZERO;
        for li in 0..self.weights.layers.len() {
            self.attention_block(li, n, seqs, kv, s, pool);
            self.feed_forward(li, n, s, pool);
        }
        self.logits(seqs, s, pool)
    }

    /// Sizes the buffers for `tokens`, maps each token to its sequence and position, fills this
    /// step's rotary tables, and embeds the tokens into `s.x`.
    fn prepare(&self, tokens: &[u32], seqs: &[BatchSeq<'_>], s: &mut Scratch, pool: &ThreadPool) {
        let c = &self.config;
        let n = tokens.len();
        let (h, qd, kvd, ff) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn_hidden);
        grow(&mut s.x, n * h);
        grow(&mut s.xn, n * h);
        grow(&mut s.q, n * qd);
        grow(&mut s.k, n * kvd);
        grow(&mut s.v, n * kvd);
        grow(&mut s.att, n * qd);
        grow(&mut s.gate, n * ff);
        grow(&mut s.up, n * ff);
        while s.scores.len() < pool.threads() {
            s.scores.push(Mutex::new((Vec::new(), Vec::new())));
        }
        s.pos.clear();
        s.seq_of.clear();
        s.pos.resize(n, 0);
        s.seq_of.resize(n, 0);
        for (si, sq) in seqs.iter().enumerate() {
            for j in 0..sq.len {
                s.pos[sq.start + j] = sq.pos0 + j;
                s.seq_of[sq.start + j] = si;
            }
        }
        let half = self.inv_freq.len();
        grow(&mut s.cos, n * half);
        grow(&mut s.sin, n * half);
        for t in 0..n {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (sn, cs) = (s.pos[t] as f32 * f).sin_cos();
                s.cos[t * half + i] = cs;
                s.sin[t * half + i] = sn;
            }
        }
        for (t, &tok) in tokens.iter().enumerate() {
            self.weights
                .embed
                .dequantize_row(tok as usize, &mut s.x[t * h..(t + 1) * h]);
        }
    }

    /// Layer `li`'s attention half: norm, the Q/K/V projections (with their biases), rotary
    /// embeddings, the new keys and values into the cache, attention, the output projection, and
    /// the residual add into `s.x`.
    fn attention_block(
        &self,
        li: usize,
        n: usize,
        seqs: &[BatchSeq<'_>],
        kv: &mut KvCache,
        s: &mut Scratch,
        pool: &ThreadPool,
    ) {
        let c = &self.config;
        let l = &self.weights.layers[li];
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        // The previous layer's feed-forward output joins the residual stream here.
        let quantize = [&l.wq, &l.wk, &l.wv].iter().any(|w| w.kind.wants_q8());
        self.norm_and_quantize(n, s, &l.attn_norm, li > 0, quantize, pool);
        let mut budget = KV_PREFETCH_BYTES;
        for sq in seqs {
            kv.prefetch(li, sq.blocks, sq.pos0 + sq.len, &mut budget);
        }
        let mut qkv = [
            MatmulTask {
                w: &l.wq,
                out: &mut s.q,
            },
            MatmulTask {
                w: &l.wk,
                out: &mut s.k,
            },
            MatmulTask {
                w: &l.wv,
                out: &mut s.v,
            },
        ];
        matmul(pool, &mut qkv, &s.xn, &s.acts, n);
        if let Some([bq, bk, bv]) = &l.bias_qkv {
            for t in 0..n {
                ops::axpy(&mut s.q[t * qd..(t + 1) * qd], 1.0, bq);
                ops::axpy(&mut s.k[t * kvd..(t + 1) * kvd], 1.0, bk);
                ops::axpy(&mut s.v[t * kvd..(t + 1) * kvd], 1.0, bv);
            }
        }
        self.rope_and_cache(li, n, seqs, kv, s);
        let started = std::time::Instant::now();
        self.attention(li, n, seqs, kv, s, pool);
        s.attention_time += started.elapsed();
        quantize_rows(pool, &mut s.acts, &s.att, n, qd, l.wo.kind.wants_q8());
        let mut wo = [MatmulTask {
            w: &l.wo,
            out: &mut s.xn,
        }];
        // Its output joins the residual stream in the feed-forward's norm.
        matmul(pool, &mut wo, &s.att, &s.acts, n);
    }

    /// The residual add of the last projection's output (`s.xn`) into `s.x` where `residual`,
    /// then RMSNorm of each of the `n` rows of `s.x` under `weight` into `s.xn`, quantized into
    /// `s.acts` for the projections that follow; rows split across the pool where worthwhile.
    fn norm_and_quantize(
        &self,
        n: usize,
        s: &mut Scratch,
        weight: &[f32],
        residual: bool,
        quantize: bool,
        pool: &ThreadPool,
    ) {
        let (h, eps) = (self.config.hidden, self.config.rms_eps);
        let (x, xn) = (
            SharedMut::new(&mut s.x[..n * h]),
            SharedMut::new(&mut s.xn[..n * h]),
        );
        let whole_blocks = h.is_multiple_of(QK);
        let acts = (whole_blocks && quantize).then(|| s.acts.writer(n, h));
        for_rows(pool, n, &|t| {
            // SAFETY: `for_rows` hands row `t` to one thread alone, which alone touches it and
            // its blocks of `acts`.
            unsafe {
                let (x, xn) = (x.slice(t * h, h), xn.slice(t * h, h));
                if residual {
                    x.iter_mut().zip(xn.iter()).for_each(|(a, b)| *a += b);
                }
                ops::rmsnorm(xn, x, weight, eps);
                if let Some(acts) = &acts {
                    acts.quantize(t, 0, xn);
                }
            }
        });
        if !whole_blocks && quantize {
            // Records the width (f32-input kernels take the rows as they are).
            s.acts.quantize(&s.xn, n, h);
        }
    }

    /// Rotates every token's query and key heads by its position, and stores its key and value
    /// in its sequence's slot of layer `li`'s cache.
    fn rope_and_cache(
        &self,
        li: usize,
        n: usize,
        seqs: &[BatchSeq<'_>],
        kv: &mut KvCache,
        s: &mut Scratch,
    ) {
        let c = &self.config;
        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let half = self.inv_freq.len();
        for t in 0..n {
            let (cs, sn) = (
                &s.cos[t * half..(t + 1) * half],
                &s.sin[t * half..(t + 1) * half],
            );
            for hh in 0..c.heads {
                let at = t * qd + hh * hd;
                ops::rope(&mut s.q[at..at + hd], cs, sn, c.rope_style);
            }
            for hh in 0..c.kv_heads {
                let at = t * kvd + hh * hd;
                ops::rope(&mut s.k[at..at + hd], cs, sn, c.rope_style);
            }
            let sq = &seqs[s.seq_of[t]];
            let slot = kv.slot(sq.blocks, s.pos[t]);
            kv.write(
                li,
                slot,
                &s.k[t * kvd..(t + 1) * kvd],
                &s.v[t * kvd..(t + 1) * kvd],
            );
        }
    }

    /// Layer `li`'s feed-forward half: norm, the gate and up projections, SwiGLU, the down
    /// projection, and the residual add into `s.x`.
    fn feed_forward(&self, li: usize, n: usize, s: &mut Scratch, pool: &ThreadPool) {
        let c = &self.config;
        let l = &self.weights.layers[li];
        let ff = c.ffn_hidden;
        let quantize = [&l.w_gate, &l.w_up].iter().any(|w| w.kind.wants_q8());
        self.norm_and_quantize(n, s, &l.ffn_norm, true, quantize, pool);
        let mut gate_up = [
            MatmulTask {
                w: &l.w_gate,
                out: &mut s.gate,
            },
            MatmulTask {
                w: &l.w_up,
                out: &mut s.up,
            },
        ];
        matmul(pool, &mut gate_up, &s.xn, &s.acts, n);
        let acts = l.w_down.kind.wants_q8().then_some(&mut s.acts);
        swiglu_and_quantize(pool, &mut s.gate, &s.up, n, ff, acts);
        let mut down = [MatmulTask {
            w: &l.w_down,
            out: &mut s.xn,
        }];
        // Its output joins the residual stream in the next layer's norm (or the final one).
        matmul(pool, &mut down, &s.gate, &s.acts, n);
    }

    /// The final norm and the output projection of the rows that asked for logits, into
    /// `s.logits` in batch order; returns how many rows.
    fn logits(&self, seqs: &[BatchSeq<'_>], s: &mut Scratch, pool: &ThreadPool) -> usize {
        let c = &self.config;
        let w = &self.weights;
        let h = c.hidden;
        let rows: Vec<usize> = seqs
            .iter()
            .flat_map(|q| q.start + q.len - q.logit_rows.min(q.len)..q.start + q.len)
            .collect();
        let m = rows.len();
        if m == 0 {
            return 0;
        }
        grow(&mut s.last, m * h);
        for (j, &t) in rows.iter().enumerate() {
            // The last layer's feed-forward output joins the residual stream (only the rows
            // that need it).
            let x = &mut s.x[t * h..(t + 1) * h];
            x.iter_mut()
                .zip(&s.xn[t * h..(t + 1) * h])
                .for_each(|(a, b)| *a += b);
            ops::rmsnorm(&mut s.last[j * h..(j + 1) * h], x, &w.out_norm, c.rms_eps);
        }
        quantize_rows(pool, &mut s.acts, &s.last, m, h, w.output.kind.wants_q8());
        grow(&mut s.logits, m * c.vocab);
        let mut output = [MatmulTask {
            w: &w.output,
            out: &mut s.logits,
        }];
        matmul(pool, &mut output, &s.last, &s.acts, m);
        m
    }

    /// Causal attention of every batch token over its sequence's cached positions. Work items
    /// are (sequence, KV head, run of up to `ATTENTION_TOKENS` tokens): the query heads sharing a
    /// KV head, over consecutive tokens, read each key and value once (or one query head each
    /// where there are too few items for the threads). Items are handed out dynamically (later
    /// positions cost more).
    fn attention(
        &self,
        layer: usize,
        n: usize,
        seqs: &[BatchSeq<'_>],
        kv: &KvCache,
        s: &mut Scratch,
        pool: &ThreadPool,
    ) {
        let c = &self.config;
        let (qd, hd) = (c.q_dim(), c.head_dim);
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        s.attention_items.clear();
        for (si, sq) in seqs.iter().enumerate() {
            let mut j = 0;
            while j < sq.len {
                let len = (sq.len - j).min(ATTENTION_TOKENS);
                for kvh in 0..c.kv_heads {
                    s.attention_items.push(AttentionItem {
                        seq: si,
                        j,
                        len,
                        kvh,
                        h0: 0,
                        heads: group,
                    });
                }
                j += len;
            }
        }
        // Too few items to keep every thread busy (a decode step of one sequence: as many as
        // KV heads, 3 for 2 threads): one query head each instead, which rereads the group's
        // keys and values (from cache) but splits the work evenly. Each query's arithmetic is
        // the same in any group.
        if s.attention_items.len() < 2 * pool.threads() && group > 1 {
            // In place (the vector keeps its capacity: no allocation per layer).
            let whole = s.attention_items.len();
            for i in 0..whole {
                let it = s.attention_items[i];
                for h0 in 0..group {
                    s.attention_items.push(AttentionItem { h0, heads: 1, ..it });
                }
            }
            s.attention_items.drain(..whole);
        }
        // Most expensive (furthest position) first, so the last items to finish are short.
        s.attention_items.sort_unstable_by_key(|it| {
            std::cmp::Reverse((seqs[it.seq].pos0 + it.j + it.len) * it.len * it.heads)
        });
        let next = AtomicUsize::new(0);
        let out = SharedMut::new(&mut s.att[..n * qd]);
        let (q, items, scratch) = (&s.q, &s.attention_items, &s.scores);
        let (k, v) = kv.layer(layer);
        pool.run(&|tid| {
            let mut buf = scratch[tid].lock().unwrap_or_else(|e| e.into_inner());
            let (scores, heads_out) = &mut *buf;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&AttentionItem {
                    seq: si,
                    j,
                    len,
                    kvh,
                    h0,
                    heads,
                }) = items.get(i)
                else {
                    break;
                };
                let sq = &seqs[si];
                let g = attention::QueryGroup {
                    q,
                    q_dim: qd,
                    t0: sq.start + j,
                    tokens: len,
                    pos0: sq.pos0 + j,
                    head0: kvh * group + h0,
                    heads,
                    head_dim: hd,
                    kv_head: kvh,
                };
                let paged = attention::PagedKv {
                    k,
                    v,
                    table: sq.blocks,
                    block_size: kv.block_size,
                    kv_dim: kv.kv_dim(),
                };
                heads_out.clear();
                heads_out.resize(len * heads * hd, 0.0);
                attention::attend(&g, &paged, scale, scores, heads_out);
                let w = heads * hd;
                for t in 0..len {
                    let at = (sq.start + j + t) * qd + (kvh * group + h0) * hd;
                    // SAFETY: item (sequence run, KV head, query heads) is taken by exactly one
                    // thread, and owns the output of its tokens' query heads.
                    let o = unsafe { out.slice(at, w) };
                    o.copy_from_slice(&heads_out[t * w..(t + 1) * w]);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_and_quantize_split_across_the_pool_match_one_thread() {
        let width = 1536;
        for rows in [1usize, 7, 8, 37] {
            let gate: Vec<f32> = (0..rows * width)
                .map(|i| (i as f32 * 0.013).sin() * 6.0)
                .collect();
            let up: Vec<f32> = (0..rows * width)
                .map(|i| (i as f32 * 0.007).cos())
                .collect();
            let mut alone = gate.clone();
            ops::swiglu(&mut alone, &up);
            let mut want = Q8Acts::default();
            want.quantize(&alone, rows, width);
            for threads in [1, 2, 3] {
                let mut split = gate.clone();
                let mut acts = Q8Acts::default();
                let pool = ThreadPool::new(threads);
                swiglu_and_quantize(&pool, &mut split, &up, rows, width, Some(&mut acts));
                assert_eq!(split, alone, "{rows} rows, {threads} threads");
                // For a float down projection: the same SwiGLU, nothing quantized.
                let mut unquantized = gate.clone();
                swiglu_and_quantize(&pool, &mut unquantized, &up, rows, width, None);
                assert_eq!(
                    unquantized, alone,
                    "{rows} rows, {threads} threads, f32 only"
                );
                for t in 0..rows {
                    let (g, w) = (acts.row(t), want.row(t));
                    assert_eq!((g.qs, g.d, g.s), (w.qs, w.d, w.s), "row {t}");
                }
                // Quantizing alone, split the same way.
                let mut again = Q8Acts::default();
                quantize_rows(&pool, &mut again, &alone, rows, width, true);
                for t in 0..rows {
                    let (g, w) = (again.row(t), want.row(t));
                    assert_eq!((g.qs, g.d, g.s), (w.qs, w.d, w.s), "row {t}");
                }
            }
        }
        // A width of partial blocks: SwiGLU still done, the quantized width recorded.
        let (mut g, u) = (vec![1.5f32; 40], vec![2.0f32; 40]);
        let mut acts = Q8Acts::default();
        swiglu_and_quantize(&ThreadPool::new(2), &mut g, &u, 1, 40, Some(&mut acts));
        let mut want = vec![1.5f32; 40];
        ops::swiglu(&mut want, &u);
        assert_eq!(g, want);
    }
}
