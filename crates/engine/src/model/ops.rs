//! Small f32 operations of the forward pass (norms, rotary embedding, activation, attention
//! inner loops). Shared by every model; the vector loops use AVX2/FMA when the CPU has them.

use super::config::RopeStyle;
use crate::kernels::has_avx2;

/// `out = x / rms(x) * w`.
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let ss = dot(x, x) / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * scale * wv;
    }
}

/// `gate = silu(gate) * up`, elementwise.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Rotates the first `cos.len() * 2` dimensions of one head in place.
pub fn rope(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    match style {
        RopeStyle::Interleaved => {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        RopeStyle::Neox => {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Where one KV head's keys and values live: a layer's paged arrays, the sequence's block table,
/// and the head's offset within a slot.
pub struct PagedHead<'a> {
    /// The layer's keys as f16 bits, `slots * stride` of them.
    pub k: &'a [u16],
    /// The layer's values, same layout.
    pub v: &'a [u16],
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Tokens per block.
    pub block_size: usize,
    /// Floats per slot (all KV heads).
    pub stride: usize,
    /// This head's offset inside a slot.
    pub offset: usize,
}

impl PagedHead<'_> {
    #[inline]
    fn at(&self, p: usize) -> usize {
        (self.table[p / self.block_size] as usize * self.block_size + p % self.block_size)
            * self.stride
            + self.offset
    }
}

/// Softmax attention of one query head over positions `0..ctx`: `out = softmax(q·K * scale) V`.
/// `scores` needs `ctx` floats of room.
pub fn attend(
    q: &[f32],
    ctx: usize,
    h: &PagedHead<'_>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(ctx >= 1 && scores.len() >= ctx && out.len() == hd);
    assert!(
        h.table.len() * h.block_size >= ctx,
        "block table too short for the context"
    );
    let max_slot = h.table[..ctx.div_ceil(h.block_size)]
        .iter()
        .copied()
        .max()
        .unwrap_or(0) as usize;
    let end = (max_slot * h.block_size + h.block_size - 1) * h.stride + h.offset + hd;
    assert!(
        h.k.len() >= end && h.v.len() >= end,
        "paged KV index out of range"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd == 64 {
        // SAFETY: AVX2/FMA/F16C detected; every slot read lies below `end`, checked above.
        unsafe { x86::attend::<8>(q, ctx, h, scale, scores, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd == 128 {
        // SAFETY: as above.
        unsafe { x86::attend::<16>(q, ctx, h, scale, scores, out) };
        return;
    }
    let f = |b: u16| half::f16::from_bits(b).to_f32();
    for (p, sc) in scores[..ctx].iter_mut().enumerate() {
        let at = h.at(p);
        *sc = q
            .iter()
            .zip(&h.k[at..at + hd])
            .map(|(a, &b)| a * f(b))
            .sum::<f32>()
            * scale;
    }
    softmax(&mut scores[..ctx]);
    out.fill(0.0);
    for (p, &w) in scores[..ctx].iter().enumerate() {
        let at = h.at(p);
        for (o, &b) in out.iter_mut().zip(&h.v[at..at + hd]) {
            *o += w * f(b);
        }
    }
}

/// Dot product.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA detected at run time; lengths bounded by `n`.
        return unsafe { x86::dot(&a[..n], &b[..n]) };
    }
    a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum()
}

/// `out += alpha * x`.
#[inline]
pub fn axpy(out: &mut [f32], alpha: f32, x: &[f32]) {
    let n = out.len().min(x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA detected at run time; lengths bounded by `n`.
        unsafe { x86::axpy(&mut out[..n], alpha, &x[..n]) };
        return;
    }
    for (o, v) in out[..n].iter_mut().zip(&x[..n]) {
        *o += alpha * v;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::PagedHead;

    /// Eight accumulators to one vector of their eight sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps(u0, u1, 0x20),
            _mm256_permute2f128_ps(u0, u1, 0x31),
        )
    }

    /// Eight f16 values at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// `attend` for head dimension `8 * D8`: the query stays in registers, scores are computed
    /// eight positions at a time with one reduction, and the output accumulates in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend<const D8: usize>(
        q: &[f32],
        ctx: usize,
        h: &PagedHead<'_>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        // SAFETY: the caller checked every slot read is inside `h.k` / `h.v`, `q` and `out` have
        // `8 * D8` floats and `scores` has `ctx`.
        unsafe {
            let qv: [__m256; D8] = std::array::from_fn(|i| _mm256_loadu_ps(q.as_ptr().add(8 * i)));
            let (kp, vp) = (h.k.as_ptr(), h.v.as_ptr());
            let vscale = _mm256_set1_ps(scale);
            let mut p = 0;
            while p < ctx {
                let n = (ctx - p).min(8);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (j, a) in acc.iter_mut().enumerate().take(n) {
                    let k = kp.add(h.at(p + j));
                    let mut s = _mm256_mul_ps(qv[0], load_f16(k));
                    for (i, qi) in qv.iter().enumerate().skip(1) {
                        s = _mm256_fmadd_ps(*qi, load_f16(k.add(8 * i)), s);
                    }
                    *a = s;
                }
                let sums = _mm256_mul_ps(hsum8(&acc), vscale);
                let mut tmp = [0.0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), sums);
                scores[p..p + n].copy_from_slice(&tmp[..n]);
                p += 8;
            }
            super::softmax(&mut scores[..ctx]);
            let mut o = [_mm256_setzero_ps(); D8];
            for (p, &w) in scores[..ctx].iter().enumerate() {
                let v = vp.add(h.at(p));
                let wv = _mm256_set1_ps(w);
                for (i, oi) in o.iter_mut().enumerate() {
                    *oi = _mm256_fmadd_ps(wv, load_f16(v.add(8 * i)), *oi);
                }
            }
            for (i, oi) in o.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *oi);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        // SAFETY: every vector load is at `i + 8 <= n`, within both slices (equal length).
        unsafe {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= n {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                i += 8;
            }
            let v = _mm256_add_ps(acc0, acc1);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_hadd_ps(s, s);
            let s = _mm_hadd_ps(s, s);
            let mut sum = _mm_cvtss_f32(s);
            while i < n {
                sum += a[i] * b[i];
                i += 1;
            }
            sum
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(out: &mut [f32], alpha: f32, x: &[f32]) {
        let n = out.len();
        // SAFETY: every vector access is at `i + 8 <= n`, within both slices (equal length).
        unsafe {
            let a = _mm256_set1_ps(alpha);
            let mut i = 0;
            while i + 8 <= n {
                let o = out.as_mut_ptr().add(i);
                _mm256_storeu_ps(
                    o,
                    _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(o)),
                );
                i += 8;
            }
            while i < n {
                out[i] += alpha * x[i];
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_plain_loops() {
        let a: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        let mut o = b.clone();
        axpy(&mut o, 0.5, &a);
        for i in 0..67 {
            assert!((o[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_styles_rotate_the_right_pairs() {
        let mut h = vec![1.0, 0.0, 0.0, 1.0];
        rope(&mut h, &[0.0, 1.0], &[1.0, 0.0], RopeStyle::Interleaved);
        assert_eq!(h, vec![0.0, 1.0, 0.0, 1.0]);
        let mut h = vec![1.0, 0.0, 0.0, 1.0];
        rope(&mut h, &[0.0, 1.0], &[1.0, 0.0], RopeStyle::Neox);
        assert_eq!(h, vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn paged_attention_matches_a_dense_reference() {
        for hd in [64usize, 128, 24] {
            let (bs, kv_heads, blocks) = (4usize, 2usize, 6usize);
            let stride = kv_heads * hd;
            let n = blocks * bs * stride;
            let h16 = |x: f32| half::f16::from_f32(x);
            let k: Vec<half::f16> = (0..n)
                .map(|i| h16(((i * 7 % 13) as f32 - 6.0) * 0.05))
                .collect();
            let v: Vec<half::f16> = (0..n)
                .map(|i| h16(((i * 5 % 11) as f32 - 5.0) * 0.1))
                .collect();
            let kb: Vec<u16> = k.iter().map(|x| x.to_bits()).collect();
            let vb: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.3).sin()).collect();
            let table = [4u32, 1, 5, 0, 2];
            for ctx in [1usize, 7, 8, 9, 19] {
                let h = PagedHead {
                    k: &kb,
                    v: &vb,
                    table: &table,
                    block_size: bs,
                    stride,
                    offset: hd,
                };
                let mut scores = vec![0.0; ctx];
                let mut out = vec![0.0; hd];
                attend(&q, ctx, &h, 0.125, &mut scores, &mut out);
                // Dense reference.
                let mut w: Vec<f32> = (0..ctx)
                    .map(|p| {
                        let at = h.at(p);
                        q.iter()
                            .zip(&k[at..at + hd])
                            .map(|(a, b)| a * b.to_f32())
                            .sum::<f32>()
                            * 0.125
                    })
                    .collect();
                softmax(&mut w);
                for d in 0..hd {
                    let want: f32 = (0..ctx).map(|p| w[p] * v[h.at(p) + d].to_f32()).sum();
                    assert!(
                        (out[d] - want).abs() < 1e-4,
                        "hd {hd} ctx {ctx} d {d}: {} vs {want}",
                        out[d]
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0, -1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[3] == 0.0);
    }
}
