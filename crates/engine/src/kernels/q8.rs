//! Activations quantized to 8 bits in blocks of 32, the input format of the integer kernels.
//! Per block: scale `d` (max |x| / 127), the int8 values, and `s = d * sum(q)` (which Q4_0 and
//! Q4_1 need for their offsets). Buffers are reused across calls: no allocation per token.

use super::QK;

/// A batch of quantized activation rows.
#[derive(Default)]
pub struct Q8Acts {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    cols: usize,
    // The same values laid out for kernels that take two weight blocks per step: per pair of
    // blocks (b0, b1), 32 bytes `b0[0..16] ++ b1[0..16]`, 32 bytes `b0[16..32] ++ b1[16..32]`,
    // scales `[d0; 4] ++ [d1; 4]`, and offsets `[0, s0, 0, s1]`.
    pq: Vec<i8>,
    pd: Vec<f32>,
    ps: Vec<f32>,
}

/// One quantized row.
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    /// int8 values, `cols` of them.
    pub qs: &'a [i8],
    /// Per-block scales.
    pub d: &'a [f32],
    /// Per-block `d * sum(q)`.
    pub s: &'a [f32],
    /// Pair layout: values (64 bytes per pair of blocks).
    pub pq: &'a [i8],
    /// Pair layout: scales (8 per pair).
    pub pd: &'a [f32],
    /// Pair layout: offsets (4 per pair).
    pub ps: &'a [f32],
}

impl Q8Acts {
    /// Quantizes `n` rows of `cols` values (a no-op shape for non-multiple-of-32 widths, which
    /// only f32-input kernels use).
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        self.cols = cols;
        if !cols.is_multiple_of(QK) {
            return;
        }
        let nb = n * cols / QK;
        self.qs.resize(n * cols, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        for (b, chunk) in x[..n * cols].chunks_exact(QK).enumerate() {
            let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            let q = &mut self.qs[b * QK..(b + 1) * QK];
            for (qv, &v) in q.iter_mut().zip(chunk) {
                let r = (v * id).round() as i32;
                *qv = r as i8;
                sum += r;
            }
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
        let per_row_pairs = cols / QK / 2;
        let pairs = n * per_row_pairs;
        self.pq.resize(pairs * 64, 0);
        self.pd.resize(pairs * 8, 0.0);
        self.ps.resize(pairs * 4, 0.0);
        let nb = cols / QK;
        for t in 0..n {
            for p in 0..per_row_pairs {
                let (b0, b1) = (t * nb + 2 * p, t * nb + 2 * p + 1);
                let at = (t * per_row_pairs + p) * 64;
                let dst = &mut self.pq[at..at + 64];
                dst[0..16].copy_from_slice(&self.qs[b0 * QK..b0 * QK + 16]);
                dst[16..32].copy_from_slice(&self.qs[b1 * QK..b1 * QK + 16]);
                dst[32..48].copy_from_slice(&self.qs[b0 * QK + 16..b0 * QK + 32]);
                dst[48..64].copy_from_slice(&self.qs[b1 * QK + 16..b1 * QK + 32]);
                let pi = t * per_row_pairs + p;
                self.pd[pi * 8..pi * 8 + 4].fill(self.d[b0]);
                self.pd[pi * 8 + 4..pi * 8 + 8].fill(self.d[b1]);
                self.ps[pi * 4..pi * 4 + 4].copy_from_slice(&[0.0, self.s[b0], 0.0, self.s[b1]]);
            }
        }
    }

    /// Row `t`.
    #[inline]
    pub fn row(&self, t: usize) -> Q8Row<'_> {
        let nb = self.cols / QK;
        let np = nb / 2;
        Q8Row {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * nb..(t + 1) * nb],
            s: &self.s[t * nb..(t + 1) * nb],
            pq: &self.pq[t * np * 64..(t + 1) * np * 64],
            pd: &self.pd[t * np * 8..(t + 1) * np * 8],
            ps: &self.ps[t * np * 4..(t + 1) * np * 4],
        }
    }
}
