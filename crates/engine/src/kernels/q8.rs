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
    }

    /// Row `t`.
    #[inline]
    pub fn row(&self, t: usize) -> Q8Row<'_> {
        let nb = self.cols / QK;
        Q8Row {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * nb..(t + 1) * nb],
            s: &self.s[t * nb..(t + 1) * nb],
        }
    }
}
