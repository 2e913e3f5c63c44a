//! Causal attention over the paged KV cache, for a group of queries at once: consecutive tokens
//! of one sequence times the query heads that share one KV head (grouped-query attention). Each
//! key and value is loaded and widened from f16 once per group instead of once per query.
//!
//! Keys are stored transposed inside each block (see [`crate::kv::KvCache`]): a block's channel
//! `c` holds its positions side by side, so with 16-token blocks one AVX-512 register holds one
//! channel of a whole block and a query's 16 scores accumulate lane-wise, without horizontal sums.
//!
//! Every query's arithmetic is the same whatever group it is computed in (same summation order,
//! positions past its own context weigh exactly zero), so results do not depend on batching.

/// One layer of the paged cache, as attention reads it.
pub struct PagedKv<'a> {
    /// Keys as f16 bits: block `b`, channel `c`, position `j` at `(b * kv_dim + c) * block_size + j`.
    pub k: &'a [u16],
    /// Values as f16 bits: slot `s`, channel `c` at `s * kv_dim + c`.
    pub v: &'a [u16],
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Tokens per block.
    pub block_size: usize,
    /// Channels per slot (all KV heads).
    pub kv_dim: usize,
}

/// The queries of `tokens` consecutive tokens of one sequence (batch rows `t0..`, positions
/// `pos0..`) for query heads `head0..head0 + heads`, which share KV head `kv_head`.
pub struct QueryGroup<'a> {
    /// The step's queries, `q_dim` floats per batch row.
    pub q: &'a [f32],
    /// Floats per batch row of `q`.
    pub q_dim: usize,
    /// First batch row.
    pub t0: usize,
    /// Consecutive rows (tokens) in the group.
    pub tokens: usize,
    /// Position of the first token.
    pub pos0: usize,
    /// First query head.
    pub head0: usize,
    /// Query heads in the group.
    pub heads: usize,
    /// Floats per head.
    pub head_dim: usize,
    /// The KV head they read.
    pub kv_head: usize,
}

impl QueryGroup<'_> {
    fn len(&self) -> usize {
        self.tokens * self.heads
    }

    /// Query `m` (token `m / heads`, head `m % heads`).
    fn query(&self, m: usize) -> &[f32] {
        let (t, h) = (self.t0 + m / self.heads, self.head0 + m % self.heads);
        let at = t * self.q_dim + h * self.head_dim;
        &self.q[at..at + self.head_dim]
    }

    /// Where queries `m0..m0 + N` start.
    #[cfg(target_arch = "x86_64")]
    fn queries<const N: usize>(&self, m0: usize) -> [*const f32; N] {
        std::array::from_fn(|i| self.query(m0 + i).as_ptr())
    }

    /// Keys query `m` attends over.
    fn ctx(&self, m: usize) -> usize {
        self.pos0 + m / self.heads + 1
    }
}

/// Computes `softmax(q·K * scale) V` for every query of `g` into `out` (query `m`'s head at
/// `m * head_dim`). `scratch` is reused between calls.
pub fn attend(
    g: &QueryGroup<'_>,
    kv: &PagedKv<'_>,
    scale: f32,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_on(
        Path::for_shape(kv.block_size, g.head_dim),
        g,
        kv,
        scale,
        scratch,
        out,
    );
}

fn attend_on(
    path: Path,
    g: &QueryGroup<'_>,
    kv: &PagedKv<'_>,
    scale: f32,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, bs) = (g.head_dim, kv.block_size);
    let n = g.len();
    assert!(n > 0 && out.len() == n * hd, "attention output size");
    assert!((g.kv_head + 1) * hd <= kv.kv_dim, "KV head out of range");
    assert!(
        (g.t0 + g.tokens) * g.q_dim <= g.q.len() && (g.head0 + g.heads) * hd <= g.q_dim,
        "queries out of range"
    );
    let ctx_max = g.pos0 + g.tokens;
    let blocks = ctx_max.div_ceil(bs);
    assert!(
        kv.table.len() >= blocks,
        "block table too short for the context"
    );
    let block_len = bs * kv.kv_dim;
    let max_block = kv.table[..blocks].iter().copied().max().unwrap_or(0) as usize;
    assert!(
        kv.k.len() >= (max_block + 1) * block_len && kv.v.len() >= (max_block + 1) * block_len,
        "paged KV index out of range"
    );
    // One row of scores per query, padded to whole blocks.
    let row = blocks * bs;
    if scratch.len() < n * row {
        scratch.resize(n * row, 0.0);
    }
    let scores = &mut scratch[..n * row];

    match path {
        // SAFETY (both): the instructions were detected; every block read is below
        // `max_block`, checked above; `scores` holds `n * row` floats.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { avx512::scores(g, kv, scale, scores, row) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { avx2::scores(g, kv, scale, scores, row) },
        Path::Portable => portable_scores(g, kv, scale, scores, row),
    }
    for m in 0..n {
        let r = &mut scores[m * row..(m + 1) * row];
        let ctx = g.ctx(m);
        super::ops::softmax(&mut r[..ctx]);
        r[ctx..].fill(0.0);
    }
    match path {
        // SAFETY (both): as above; `out` holds `n * hd` floats.
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { avx512::values(g, kv, scores, row, ctx_max, out) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { avx2::values(g, kv, scores, row, ctx_max, out) },
        Path::Portable => portable_values(g, kv, scores, row, ctx_max, out),
    }
}

/// Which loops run attention here.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// 16-position blocks, heads of a multiple of 16 up to 128 floats.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// 16-position blocks, heads of a multiple of 8 up to 128 floats.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// The paths, fastest first.
#[cfg(target_arch = "x86_64")]
const FASTEST_FIRST: &[Path] = &[Path::Avx512, Path::Avx2, Path::Portable];
#[cfg(not(target_arch = "x86_64"))]
const FASTEST_FIRST: &[Path] = &[Path::Portable];

impl Path {
    /// Whether this path can run blocks of `block_size` and heads of `head_dim` on this CPU.
    fn runs(self, block_size: usize, head_dim: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        let wide = block_size == 16 && head_dim <= 128;
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => wide && head_dim.is_multiple_of(16) && crate::kernels::has_vnni(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => wide && head_dim.is_multiple_of(8) && crate::kernels::has_avx2(),
            Self::Portable => {
                let _ = (block_size, head_dim);
                true
            }
        }
    }

    /// The fastest path for this shape here.
    fn for_shape(block_size: usize, head_dim: usize) -> Self {
        FASTEST_FIRST
            .iter()
            .copied()
            .find(|p| p.runs(block_size, head_dim))
            .unwrap_or(Self::Portable)
    }

    /// Every path this CPU can run for this shape, fastest first (for tests).
    #[cfg(test)]
    fn all_for_shape(block_size: usize, head_dim: usize) -> Vec<Self> {
        FASTEST_FIRST
            .iter()
            .copied()
            .filter(|p| p.runs(block_size, head_dim))
            .collect()
    }
}

/// What a scores pass works on.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct ScoreJob<'a, 'b> {
    /// The queries.
    g: &'a QueryGroup<'b>,
    /// The cache.
    kv: &'a PagedKv<'b>,
    /// Applied to every score.
    scale: f32,
    /// Floats per query's row of scores (whole blocks).
    row: usize,
    /// The pass's first query.
    m0: usize,
}

/// A tier's scores pass: queries `m0..m0 + N` over blocks `b0..b0 + B`.
#[cfg(target_arch = "x86_64")]
trait ScorePass {
    /// # Safety
    /// The tier's instructions must be available; the rest as for the tier's `scores`.
    unsafe fn pass<const N: usize, const B: usize>(
        job: ScoreJob<'_, '_>,
        scores: &mut [f32],
        b0: usize,
    );
}

/// Scores of queries `m0..m0 + N` over every block of the row, `B` blocks per pass while that
/// many are left, then one at a time: with few queries one block's chains are too few to hide
/// the multiply-add latency, so several blocks run side by side (each lane's sum is the same
/// whatever `B`).
///
/// # Safety
/// As for `P::pass`.
#[cfg(target_arch = "x86_64")]
unsafe fn block_runs<P: ScorePass, const N: usize, const B: usize>(
    job: ScoreJob<'_, '_>,
    scores: &mut [f32],
) {
    let blocks = job.row / 16;
    let mut b = 0;
    // SAFETY: forwarded from the caller; every pass stays below the row's blocks.
    unsafe {
        while b + B <= blocks {
            P::pass::<N, B>(job, scores, b);
            b += B;
        }
        while b < blocks {
            P::pass::<N, 1>(job, scores, b);
            b += 1;
        }
    }
}

impl PagedKv<'_> {
    /// Where the keys of channels `c0..` start in blocks `b0..b0 + B` of the block table (16
    /// positions per channel).
    ///
    /// # Safety
    /// Blocks `b0..b0 + B` must be in the table.
    #[cfg(target_arch = "x86_64")]
    unsafe fn head_keys<const B: usize>(&self, c0: usize, b0: usize) -> [*const u16; B] {
        std::array::from_fn(|j| {
            // SAFETY: the caller keeps `b0 + j` inside the table; the block is in range (checked
            // by `attend_on`), so the pointer stays inside `k`.
            unsafe {
                let blk = *self.table.get_unchecked(b0 + j) as usize;
                self.k.as_ptr().add((blk * self.kv_dim + c0) * 16)
            }
        })
    }
}

fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn portable_scores(
    g: &QueryGroup<'_>,
    kv: &PagedKv<'_>,
    scale: f32,
    scores: &mut [f32],
    row: usize,
) {
    let (hd, bs) = (g.head_dim, kv.block_size);
    for (b, &blk) in kv.table[..row / bs].iter().enumerate() {
        let base = (blk as usize * kv.kv_dim + g.kv_head * hd) * bs;
        for m in 0..g.len() {
            let q = g.query(m);
            for j in 0..bs {
                let s: f32 = (0..hd).map(|d| q[d] * f16(kv.k[base + d * bs + j])).sum();
                scores[m * row + b * bs + j] = s * scale;
            }
        }
    }
}

fn portable_values(
    g: &QueryGroup<'_>,
    kv: &PagedKv<'_>,
    weights: &[f32],
    row: usize,
    ctx: usize,
    out: &mut [f32],
) {
    let (hd, bs) = (g.head_dim, kv.block_size);
    out.fill(0.0);
    for p in 0..ctx {
        let slot = kv.table[p / bs] as usize * bs + p % bs;
        let v = &kv.v[slot * kv.kv_dim + g.kv_head * hd..][..hd];
        for m in 0..g.len() {
            let w = weights[m * row + p];
            for (o, &x) in out[m * hd..(m + 1) * hd].iter_mut().zip(v) {
                *o += w * f16(x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{PagedKv, QueryGroup};

    /// Queries whose scores are computed in one pass over a block's keys.
    const SCORE_PASS: usize = 8;

    /// Widens 16 f16 values at `p`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: the caller guarantees 32 readable bytes at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// Scores of every query over every block (16 positions per block, one lane each).
    ///
    /// # Safety
    /// AVX-512F must be available, blocks of 16 tokens, every block in range (checked by the
    /// caller), `scores` `g.len() * row` floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        g: &QueryGroup<'_>,
        kv: &PagedKv<'_>,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        let mut m0 = 0;
        while m0 < g.len() {
            let n = (g.len() - m0).min(SCORE_PASS);
            let job = super::ScoreJob {
                g,
                kv,
                scale,
                row,
                m0,
            };
            // SAFETY: forwarded from the caller.
            unsafe {
                match n {
                    1 => super::block_runs::<Tier, 1, 4>(job, scores),
                    2 => super::block_runs::<Tier, 2, 2>(job, scores),
                    3 => super::block_runs::<Tier, 3, 2>(job, scores),
                    4 => super::block_runs::<Tier, 4, 2>(job, scores),
                    5 => super::block_runs::<Tier, 5, 1>(job, scores),
                    6 => super::block_runs::<Tier, 6, 1>(job, scores),
                    7 => super::block_runs::<Tier, 7, 1>(job, scores),
                    _ => super::block_runs::<Tier, 8, 1>(job, scores),
                }
            }
            m0 += n;
        }
    }

    /// This tier's scores pass.
    pub(super) struct Tier;

    impl super::ScorePass for Tier {
        /// Scores of queries `m0..m0 + N` over blocks `b0..b0 + B`: per block, each key channel is
        /// widened once and multiplied into every query's 16 lanes (even and odd channels in
        /// separate sums, for two independent chains; the order is the same for every query
        /// whatever `N` and `B`).
        #[target_feature(enable = "avx512f")]
        unsafe fn pass<const N: usize, const B: usize>(
            super::ScoreJob {
                g,
                kv,
                scale,
                row,
                m0,
            }: super::ScoreJob<'_, '_>,
            scores: &mut [f32],
            b0: usize,
        ) {
            let hd = g.head_dim;
            let qs = g.queries::<N>(m0);
            let vscale = _mm512_set1_ps(scale);
            // SAFETY: channels `kv_head * hd .. + hd` of blocks `b0..b0 + B` are in range (caller);
            // each query has `hd` floats; the scores windows are inside `scores`.
            unsafe {
                let kts: [*const u16; B] = kv.head_keys(g.kv_head * hd, b0);
                let mut even = [[_mm512_setzero_ps(); B]; N];
                let mut odd = [[_mm512_setzero_ps(); B]; N];
                let mut d = 0;
                while d < hd {
                    for j in 0..B {
                        let k0 = load16(kts[j].add(d * 16));
                        let k1 = load16(kts[j].add((d + 1) * 16));
                        for i in 0..N {
                            even[i][j] =
                                _mm512_fmadd_ps(_mm512_set1_ps(*qs[i].add(d)), k0, even[i][j]);
                            odd[i][j] =
                                _mm512_fmadd_ps(_mm512_set1_ps(*qs[i].add(d + 1)), k1, odd[i][j]);
                        }
                    }
                    d += 2;
                }
                for i in 0..N {
                    for j in 0..B {
                        let s = _mm512_mul_ps(_mm512_add_ps(even[i][j], odd[i][j]), vscale);
                        let at = (m0 + i) * row + (b0 + j) * 16;
                        _mm512_storeu_ps(scores.as_mut_ptr().add(at), s);
                    }
                }
            }
        }
    }

    /// `out[m] = sum_p weights[m][p] * V[p]` for every query.
    ///
    /// # Safety
    /// As for [`scores`]; `out` holds `g.len() * head_dim` floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values(
        g: &QueryGroup<'_>,
        kv: &PagedKv<'_>,
        weights: &[f32],
        row: usize,
        ctx: usize,
        out: &mut [f32],
    ) {
        let mut m0 = 0;
        while m0 < g.len() {
            let left = g.len() - m0;
            // SAFETY: forwarded from the caller.
            let n = unsafe {
                match (g.head_dim / 16, left) {
                    (1, _) => vpass::<1, 1>(g, kv, weights, row, ctx, out, m0),
                    (2, 1) => vpass::<2, 1>(g, kv, weights, row, ctx, out, m0),
                    (2, _) => vpass::<2, 2>(g, kv, weights, row, ctx, out, m0),
                    (3, _) => vpass::<3, 1>(g, kv, weights, row, ctx, out, m0),
                    (4, 1) => vpass::<4, 1>(g, kv, weights, row, ctx, out, m0),
                    (4, 2) => vpass::<4, 2>(g, kv, weights, row, ctx, out, m0),
                    (4, 3) => vpass::<4, 3>(g, kv, weights, row, ctx, out, m0),
                    (4, _) => vpass::<4, 4>(g, kv, weights, row, ctx, out, m0),
                    (5..=6, _) => vpass::<6, 1>(g, kv, weights, row, ctx, out, m0),
                    (_, 1) => vpass::<8, 1>(g, kv, weights, row, ctx, out, m0),
                    _ => vpass::<8, 2>(g, kv, weights, row, ctx, out, m0),
                }
            };
            m0 += n;
        }
    }

    /// Values for queries `m0..m0 + N` of a head of `16 * D` floats (at most the head's real
    /// width is read and written); returns `N`.
    #[target_feature(enable = "avx512f")]
    unsafe fn vpass<const D: usize, const N: usize>(
        g: &QueryGroup<'_>,
        kv: &PagedKv<'_>,
        weights: &[f32],
        row: usize,
        ctx: usize,
        out: &mut [f32],
        m0: usize,
    ) -> usize {
        let hd = g.head_dim;
        let chunks = hd / 16;
        debug_assert!(chunks <= D);
        let mut acc = [[_mm512_setzero_ps(); D]; N];
        // SAFETY: positions below `ctx` map to blocks in range (caller); `chunks * 16 == hd`
        // channels of the KV head are read; weights rows have `row >= ctx` floats.
        unsafe {
            let vp = kv.v.as_ptr();
            for p in 0..ctx {
                let slot = *kv.table.get_unchecked(p / 16) as usize * 16 + p % 16;
                let at = vp.add(slot * kv.kv_dim + g.kv_head * hd);
                let mut v = [_mm512_setzero_ps(); D];
                for (c, vc) in v.iter_mut().enumerate().take(chunks) {
                    *vc = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(16 * c) as *const __m256i));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*weights.get_unchecked((m0 + i) * row + p));
                    for c in 0..chunks {
                        a[c] = _mm512_fmadd_ps(w, v[c], a[c]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (c, ac) in a.iter().enumerate().take(chunks) {
                    _mm512_storeu_ps(out.as_mut_ptr().add((m0 + i) * hd + 16 * c), *ac);
                }
            }
        }
        N.min(g.len() - m0)
    }
}

/// The same loops eight lanes wide: a block's key channel is two registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PagedKv, QueryGroup};

    /// Widens 8 f16 values at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u16) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// Queries whose scores are computed in one pass over a block's keys (two accumulators
    /// each, with the block's two key registers: 14 of the 16 registers).
    const SCORE_PASS: usize = 6;

    /// Scores of every query over every 16-position block.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, blocks of 16 tokens, every block in range (checked
    /// by the caller), `scores` `g.len() * row` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores(
        g: &QueryGroup<'_>,
        kv: &PagedKv<'_>,
        scale: f32,
        scores: &mut [f32],
        row: usize,
    ) {
        let mut m0 = 0;
        while m0 < g.len() {
            let n = (g.len() - m0).min(SCORE_PASS);
            let job = super::ScoreJob {
                g,
                kv,
                scale,
                row,
                m0,
            };
            // SAFETY: forwarded from the caller.
            unsafe {
                match n {
                    1 => super::block_runs::<Tier, 1, 4>(job, scores),
                    2 => super::block_runs::<Tier, 2, 2>(job, scores),
                    3 => super::block_runs::<Tier, 3, 2>(job, scores),
                    4 => super::block_runs::<Tier, 4, 1>(job, scores),
                    5 => super::block_runs::<Tier, 5, 1>(job, scores),
                    _ => super::block_runs::<Tier, 6, 1>(job, scores),
                }
            }
            m0 += n;
        }
    }

    /// This tier's scores pass.
    pub(super) struct Tier;

    impl super::ScorePass for Tier {
        /// Scores of queries `m0..m0 + N` over blocks `b0..b0 + B`: per block, each key channel
        /// is widened once and multiplied into every query's 16 lanes (the same chain for every
        /// query whatever `N` and `B`).
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn pass<const N: usize, const B: usize>(
            super::ScoreJob {
                g,
                kv,
                scale,
                row,
                m0,
            }: super::ScoreJob<'_, '_>,
            scores: &mut [f32],
            b0: usize,
        ) {
            let hd = g.head_dim;
            let qs = g.queries::<N>(m0);
            let vscale = _mm256_set1_ps(scale);
            // SAFETY: channels of the KV head in blocks `b0..b0 + B` are in range (caller); each
            // query has `hd` floats; the scores windows are inside `scores`.
            unsafe {
                let kts: [*const u16; B] = kv.head_keys(g.kv_head * hd, b0);
                let mut lo = [[_mm256_setzero_ps(); B]; N];
                let mut hi = [[_mm256_setzero_ps(); B]; N];
                for d in 0..hd {
                    for j in 0..B {
                        let k0 = load8(kts[j].add(d * 16));
                        let k1 = load8(kts[j].add(d * 16 + 8));
                        for i in 0..N {
                            let q = _mm256_set1_ps(*qs[i].add(d));
                            lo[i][j] = _mm256_fmadd_ps(q, k0, lo[i][j]);
                            hi[i][j] = _mm256_fmadd_ps(q, k1, hi[i][j]);
                        }
                    }
                }
                for i in 0..N {
                    for j in 0..B {
                        let at = scores.as_mut_ptr().add((m0 + i) * row + (b0 + j) * 16);
                        _mm256_storeu_ps(at, _mm256_mul_ps(lo[i][j], vscale));
                        _mm256_storeu_ps(at.add(8), _mm256_mul_ps(hi[i][j], vscale));
                    }
                }
            }
        }
    }

    /// `out[m] = sum_p weights[m][p] * V[p]`: two queries at a time, over segments of up to 32
    /// channels (8 accumulators and 4 widened values in registers; a lone query takes 64 channels
    /// in one segment, for 8 independent chains), so each value is widened
    /// once per pair of queries.
    ///
    /// # Safety
    /// As for [`scores`]; `out` holds `g.len() * head_dim` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn values(
        g: &QueryGroup<'_>,
        kv: &PagedKv<'_>,
        weights: &[f32],
        row: usize,
        ctx: usize,
        out: &mut [f32],
    ) {
        let chunks = g.head_dim / 8;
        let mut m0 = 0;
        while m0 < g.len() {
            let n = (g.len() - m0).min(2);
            let mut c0 = 0;
            while c0 < chunks {
                // One query: all of a 64-float head in one pass (8 chains over positions).
                let h = (chunks - c0).min(if n == 1 { 8 } else { 4 });
                let job = (g, kv, weights, row, ctx, m0, c0);
                // SAFETY: forwarded from the caller; channels c0 * 8 .. (c0 + h) * 8 lie inside
                // the head; `out` holds every query's head.
                unsafe {
                    let o = out.as_mut_ptr();
                    match (n, h) {
                        (1, 1) => segment::<1, 1>(job, o),
                        (1, 2) => segment::<1, 2>(job, o),
                        (1, 3) => segment::<1, 3>(job, o),
                        (1, 4) => segment::<1, 4>(job, o),
                        (1, 5) => segment::<1, 5>(job, o),
                        (1, 6) => segment::<1, 6>(job, o),
                        (1, 7) => segment::<1, 7>(job, o),
                        (1, _) => segment::<1, 8>(job, o),
                        (_, 1) => segment::<2, 1>(job, o),
                        (_, 2) => segment::<2, 2>(job, o),
                        (_, 3) => segment::<2, 3>(job, o),
                        (_, _) => segment::<2, 4>(job, o),
                    }
                }
                c0 += h;
            }
            m0 += n;
        }
    }

    /// Values of queries `m0..m0 + N`, channels `8 * c0 .. 8 * (c0 + H)`: per position, the
    /// value chunks are widened once and added into every query's accumulators (per channel
    /// the same chain, positions in order, whatever `N`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::type_complexity)]
    unsafe fn segment<const N: usize, const H: usize>(
        (g, kv, weights, row, ctx, m0, c0): (
            &QueryGroup<'_>,
            &PagedKv<'_>,
            &[f32],
            usize,
            usize,
            usize,
            usize,
        ),
        out: *mut f32,
    ) {
        let hd = g.head_dim;
        let mut acc = [[_mm256_setzero_ps(); H]; N];
        // SAFETY: positions below `ctx` map to blocks in range (caller); channels
        // `8 * c0 .. 8 * (c0 + H)` of the KV head are inside it (caller); weights rows have
        // `row >= ctx` floats; `out` holds every query's head (caller).
        unsafe {
            let vp = kv.v.as_ptr();
            for p in 0..ctx {
                let slot = *kv.table.get_unchecked(p / 16) as usize * 16 + p % 16;
                let at = vp.add(slot * kv.kv_dim + g.kv_head * hd + 8 * c0);
                let v: [__m256; H] = std::array::from_fn(|c| load8(at.add(8 * c)));
                for (i, a) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*weights.get_unchecked((m0 + i) * row + p));
                    for c in 0..H {
                        a[c] = _mm256_fmadd_ps(w, v[c], a[c]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (c, ac) in a.iter().enumerate() {
                    _mm256_storeu_ps(out.add((m0 + i) * hd + 8 * (c0 + c)), *ac);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvCache;

    /// Dense reference for one query at `ctx` keys.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let mut w: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        super::super::ops::softmax(&mut w);
        let mut out = vec![0.0; q.len()];
        for (wi, v) in w.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += wi * x;
            }
        }
        out
    }

    #[test]
    fn grouped_paged_attention_matches_a_dense_reference() {
        for (hd, bs) in [
            (64usize, 16usize),
            (128, 16),
            (32, 16),
            (48, 16),
            (24, 16),
            (24, 4),
            (64, 8),
        ] {
            for path in Path::all_for_shape(bs, hd) {
                let (kv_heads, heads, blocks) = (2usize, 6usize, 8usize);
                let kv_dim = kv_heads * hd;
                let mut cache = KvCache::new(1, blocks, bs, kv_dim);
                let table = [5u32, 1, 7, 0, 2, 6, 3, 4];
                let ctx_max = 5 * bs + 3;
                let h16 = |x: f32| half::f16::from_f32(x).to_f32();
                let mut keys = Vec::new();
                let mut values = Vec::new();
                for p in 0..ctx_max {
                    let k: Vec<f32> = (0..kv_dim)
                        .map(|c| h16((((p * 31 + c * 7) % 13) as f32 - 6.0) * 0.05))
                        .collect();
                    let v: Vec<f32> = (0..kv_dim)
                        .map(|c| h16((((p * 17 + c * 5) % 11) as f32 - 5.0) * 0.1))
                        .collect();
                    cache.write(0, cache.slot(&table, p), &k, &v);
                    keys.push(k);
                    values.push(v);
                }
                let q_dim = heads * hd;
                let tokens = 5;
                let q: Vec<f32> = (0..tokens * q_dim)
                    .map(|i| (i as f32 * 0.37).sin())
                    .collect();
                let (k, v) = cache.layer(0);
                let kv = PagedKv {
                    k,
                    v,
                    table: &table,
                    block_size: bs,
                    kv_dim,
                };
                let pos0 = ctx_max - tokens;
                let kv_head = 1;
                let g = QueryGroup {
                    q: &q,
                    q_dim,
                    t0: 0,
                    tokens,
                    pos0,
                    head0: 3,
                    heads: 3,
                    head_dim: hd,
                    kv_head,
                };
                let mut scratch = Vec::new();
                let mut out = vec![0.0; tokens * 3 * hd];
                attend_on(path, &g, &kv, 0.125, &mut scratch, &mut out);
                let head_keys = |n: usize, of: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
                    of[..n]
                        .iter()
                        .map(|x| x[kv_head * hd..(kv_head + 1) * hd].to_vec())
                        .collect()
                };
                for m in 0..tokens * 3 {
                    let ctx = pos0 + m / 3 + 1;
                    let want = reference(
                        g.query(m),
                        &head_keys(ctx, &keys),
                        &head_keys(ctx, &values),
                        0.125,
                    );
                    for d in 0..hd {
                        let got = out[m * hd + d];
                        assert!(
                            (got - want[d]).abs() < 1e-4,
                            "{path:?} hd {hd} bs {bs} query {m} dim {d}: {got} vs {}",
                            want[d]
                        );
                    }
                }
                // Batch invariance: each query alone gives bit-identical results.
                for t in 0..tokens {
                    let alone = QueryGroup {
                        t0: t,
                        tokens: 1,
                        pos0: pos0 + t,
                        heads: 1,
                        head0: 3 + t % 3,
                        ..g
                    };
                    let mut one = vec![0.0; hd];
                    attend_on(path, &alone, &kv, 0.125, &mut scratch, &mut one);
                    let m = t * 3 + t % 3;
                    assert_eq!(one, out[m * hd..(m + 1) * hd], "{path:?} hd {hd} token {t}");
                }
            }
        }
    }
}
