//! Activations quantized to 8 bits in blocks of 32, the input format of the integer kernels.
//! Per block: scale `d` (max |x| / 127), the int8 values, and `s = d * sum(q)` (which Q4_0 and
//! Q4_1 need for their offsets). Buffers are reused across calls: no allocation per token.

use super::QK;
use crate::parallel::SharedMut;

/// A batch of quantized activation rows.
#[derive(Default)]
pub struct Q8Acts {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    cols: usize,
    // Per block, the exact sum of its int8 values (the AVX-512 and AMX kernels' Q8_0 bias).
    qsum: Vec<i32>,
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
        self.shape(n, cols);
        quantize_blocks(
            &x[..n * cols],
            &mut self.qs,
            &mut self.d,
            &mut self.s,
            &mut self.qsum,
        );
    }

    fn shape(&mut self, n: usize, cols: usize) {
        let nb = n * cols / QK;
        self.cols = cols;
        self.qs.resize(n * cols, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.qsum.resize(nb, 0);
    }

    /// Shapes the buffers for `n` rows of `cols` values (a multiple of [`QK`]) and hands back
    /// a writer through which the pool's threads quantize disjoint blocks of them.
    pub(crate) fn writer(&mut self, n: usize, cols: usize) -> Q8Writer<'_> {
        assert!(cols.is_multiple_of(QK), "rows of whole blocks");
        self.shape(n, cols);
        Q8Writer {
            qs: SharedMut::new(&mut self.qs),
            d: SharedMut::new(&mut self.d),
            s: SharedMut::new(&mut self.s),
            qsum: SharedMut::new(&mut self.qsum),
            cols,
            _acts: std::marker::PhantomData,
        }
    }

    /// Every row's int8 values, token-major (`cols` per token).
    pub(crate) fn qs_all(&self) -> &[i8] {
        &self.qs
    }

    /// Every block's scale, token-major.
    pub(crate) fn d_all(&self) -> &[f32] {
        &self.d
    }

    /// Every block's `d * sum(q)`, token-major.
    pub(crate) fn s_all(&self) -> &[f32] {
        &self.s
    }

    /// Every block's exact int8 sum, token-major.
    pub(crate) fn qsum_all(&self) -> &[i32] {
        &self.qsum
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

/// Quantizes rows of [`Q8Acts`] shaped by [`Q8Acts::writer`], a few blocks at a time, from
/// the pool's threads.
pub(crate) struct Q8Writer<'a> {
    qs: SharedMut<i8>,
    d: SharedMut<f32>,
    s: SharedMut<f32>,
    qsum: SharedMut<i32>,
    cols: usize,
    _acts: std::marker::PhantomData<&'a mut Q8Acts>,
}

impl Q8Writer<'_> {
    /// Quantizes `x` (whole blocks) into row `t` from column `c0` (a multiple of [`QK`]), as
    /// [`Q8Acts::quantize`] would.
    ///
    /// # Safety
    /// No other thread may write or read those blocks while this runs.
    pub(crate) unsafe fn quantize(&self, t: usize, c0: usize, x: &[f32]) {
        assert!(
            c0.is_multiple_of(QK) && x.len().is_multiple_of(QK) && c0 + x.len() <= self.cols,
            "whole blocks inside the row"
        );
        let (at, b0, nb) = (t * self.cols + c0, (t * self.cols + c0) / QK, x.len() / QK);
        // SAFETY: the caller owns these blocks; `slice` checks the bounds.
        unsafe {
            quantize_blocks(
                x,
                self.qs.slice(at, x.len()),
                self.d.slice(b0, nb),
                self.s.slice(b0, nb),
                self.qsum.slice(b0, nb),
            );
        }
    }
}

/// Quantizes `x` block by block into the blocks' values, scales, `d * sum` and sums.
fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    let simd = super::has_avx2();
    for (b, chunk) in x.chunks_exact(QK).enumerate() {
        let (db, sum) = quantize_block_with(simd, chunk, &mut qs[b * QK..(b + 1) * QK]);
        d[b] = db;
        s[b] = db * sum as f32;
        qsum[b] = sum;
    }
}

/// `quantize_block`, with AVX2 when `simd` (which the caller has checked the CPU supports).
#[inline]
fn quantize_block_with(simd: bool, x: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller passes `simd` only where AVX2/FMA were detected.
        return unsafe { x86::quantize_block(x, q) };
    }
    let _ = simd;
    quantize_block(x, q)
}

/// One block to int8: `d = max|x| / 127`, `q = x / d` rounded half away from zero (as
/// `trunc(x / d + copysign(0.5))`, the same float steps as the SIMD path). Returns `d` and
/// the sum of `q`.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qv, &v) in q.iter_mut().zip(x) {
        let y = v * id;
        let r = (y + 0.5f32.copysign(y)) as i32;
        *qv = r as i8;
        sum += r;
    }
    (d, sum)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `quantize_block` for one 32-value block with AVX2.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `x` and `q` must hold at least 32 values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        assert!(x.len() >= 32 && q.len() >= 32);
        // SAFETY: four 8-float loads and one 32-byte store, inside the slices checked above.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &vi| {
                _mm256_max_ps(m, _mm256_andnot_ps(sign, vi))
            });
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            let d = _mm_cvtss_f32(m) / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let half = _mm256_set1_ps(0.5);
            let i: [__m256i; 4] = std::array::from_fn(|k| {
                let y = _mm256_mul_ps(v[k], id);
                let r = _mm256_add_ps(y, _mm256_or_ps(_mm256_and_ps(y, sign), half));
                _mm256_cvttps_epi32(r)
            });
            let p01 = _mm256_packs_epi32(i[0], i[1]);
            let p23 = _mm256_packs_epi32(i[2], i[3]);
            let b = _mm256_packs_epi16(p01, p23);
            let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
            let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            (d, _mm_cvtsi128_si32(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_quantization_agree_exactly() {
        if !super::super::has_avx2() {
            return;
        }
        let mut seed = 1u32;
        for scale in [0.0f32, 1e-3, 1.0, 300.0] {
            let x: Vec<f32> = (0..32)
                .map(|i| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    // Exact halves (ties) included: they must round away from zero both ways.
                    if i % 5 == 0 {
                        (i as f32 - 16.0) * 0.5 * scale
                    } else {
                        ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
                    }
                })
                .collect();
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let ra = quantize_block(&x, &mut a);
            // SAFETY: AVX2 checked above.
            let rb = unsafe { x86::quantize_block(&x, &mut b) };
            assert_eq!(ra, rb, "scale {scale}");
            assert_eq!(a, b, "scale {scale}");
        }
    }
}
