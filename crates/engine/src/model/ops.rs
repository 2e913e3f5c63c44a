//! Small f32 operations of the forward pass (norms, rotary embedding, activation, softmax).
//! Shared by every model; the vector loops use AVX2/FMA when the CPU has them.

use super::config::RopeStyle;
use crate::kernels::{has_avx2, has_vnni};

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
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        let n = gate.len().min(up.len());
        // SAFETY: AVX-512F detected; both slices cut to `n`.
        unsafe { avx512::swiglu(&mut gate[..n], &up[..n]) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let n = gate.len().min(up.len());
        // SAFETY: AVX2/FMA detected; both slices cut to `n`.
        unsafe { avx2::swiglu(&mut gate[..n], &up[..n]) };
        return;
    }
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
    #[cfg(target_arch = "x86_64")]
    if has_vnni() && !x.is_empty() {
        // SAFETY: AVX-512F detected.
        unsafe { avx512::softmax(x) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && !x.is_empty() {
        // SAFETY: AVX2/FMA detected.
        unsafe { avx2::softmax(x) };
        return;
    }
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

/// ln 2 in two parts for the vector exps' range reduction, so that `n * LN2_HI` is exact.
#[cfg(target_arch = "x86_64")]
const LN2_HI: f32 = 0.693_145_75;
#[cfg(target_arch = "x86_64")]
const LN2_LO: f32 = 1.428_606_8e-6;
/// `e^r` for `|r| <= ln2 / 2`: the degree-7 Taylor polynomial, highest coefficient first.
#[cfg(target_arch = "x86_64")]
const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// Sixteen-lane exp and the loops built on it (softmax, SwiGLU).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `e^x` in every lane (about 2 ulp): `x = n ln2 + r` with `|r| <= ln2 / 2`, `e^r` by a
    /// degree-7 Taylor polynomial, then `2^n` applied by `vscalefps` (which takes underflow to
    /// zero and overflow to infinity).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(100.0)),
            _mm512_set1_ps(-110.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_TAYLOR[0]);
        for c in &super::EXP_TAYLOR[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(p, n)
    }

    fn tail(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// In-place softmax of a non-empty slice.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax(x: &mut [f32]) {
        let n = x.len();
        let full = n / 16 * 16;
        let p = x.as_mut_ptr();
        // SAFETY: full vectors below `full`, the masked tail covers `full..n`.
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < full {
                m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
                i += 16;
            }
            let rest = tail(n - full);
            m = _mm512_mask_max_ps(m, rest, m, _mm512_maskz_loadu_ps(rest, p.add(full)));
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < full {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
                _mm512_storeu_ps(p.add(i), e);
                sum = _mm512_add_ps(sum, e);
                i += 16;
            }
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, p.add(full)), max));
            _mm512_mask_storeu_ps(p.add(full), rest, e);
            sum = _mm512_mask_add_ps(sum, rest, sum, e);
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            let mut i = 0;
            while i < full {
                _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
                i += 16;
            }
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(rest, p.add(full)), inv);
            _mm512_mask_storeu_ps(p.add(full), rest, v);
        }
    }

    /// `gate = gate / (1 + e^-gate) * up` over equal-length slices.
    ///
    /// # Safety
    /// AVX-512F must be available; `gate.len() == up.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        // SAFETY: every access is below `n` (masked for the tail).
        unsafe {
            while i < n {
                let k = tail((n - i).min(16));
                let gv = _mm512_maskz_loadu_ps(k, g.add(i));
                let uv = _mm512_maskz_loadu_ps(k, u.add(i));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(g.add(i), k, _mm512_mul_ps(s, uv));
                i += 16;
            }
        }
    }
}

/// The same exp, softmax and SwiGLU eight lanes wide, for CPUs with AVX2 and FMA but no AVX-512.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::kernels::lanes_below as tail;

    /// `e^x` in every lane: as the AVX-512 one (same reduction and polynomial), with `2^n`
    /// built in the exponent bits, so `x` is clamped to [-87, 88] where `2^n` is a normal
    /// float; below -87 the result is 0 (instead of at most 1.7e-38).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp(x: __m256) -> __m256 {
        let live = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::EXP_TAYLOR[0]);
        for c in &super::EXP_TAYLOR[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), live)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// In-place softmax of a non-empty slice.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax(x: &mut [f32]) {
        let n = x.len();
        let full = n / 8 * 8;
        let p = x.as_mut_ptr();
        let rest = tail(n - full);
        // SAFETY: full vectors below `full`, the masked tail covers `full..n`.
        unsafe {
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < full {
                m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
                i += 8;
            }
            let mut max = hmax(m);
            for &v in &x[full..] {
                max = max.max(v);
            }
            let vmax = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            let mut i = 0;
            while i < full {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
                _mm256_storeu_ps(p.add(i), e);
                sum = _mm256_add_ps(sum, e);
                i += 8;
            }
            let e = exp(_mm256_sub_ps(_mm256_maskload_ps(p.add(full), rest), vmax));
            let e = _mm256_and_ps(e, _mm256_castsi256_ps(rest));
            _mm256_maskstore_ps(p.add(full), rest, e);
            sum = _mm256_add_ps(sum, e);
            let inv = _mm256_set1_ps(1.0 / hsum(sum));
            let mut i = 0;
            while i < full {
                _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
                i += 8;
            }
            let v = _mm256_mul_ps(_mm256_maskload_ps(p.add(full), rest), inv);
            _mm256_maskstore_ps(p.add(full), rest, v);
        }
    }

    /// `gate = gate / (1 + e^-gate) * up` over equal-length slices.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        // SAFETY: every access is below `n` (masked for the tail).
        unsafe {
            while i < n {
                let k = tail((n - i).min(8));
                let gv = _mm256_maskload_ps(g.add(i), k);
                let uv = _mm256_maskload_ps(u.add(i), k);
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
                _mm256_maskstore_ps(g.add(i), k, _mm256_mul_ps(s, uv));
                i += 8;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

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

    /// Every softmax and SwiGLU this CPU can run: the dispatching ones, and the AVX2 ones that
    /// CPUs without AVX-512 run.
    #[allow(clippy::type_complexity)]
    fn every_impl() -> Vec<(&'static str, fn(&mut [f32]), fn(&mut [f32], &[f32]))> {
        let mut impls: Vec<(&'static str, fn(&mut [f32]), fn(&mut [f32], &[f32]))> =
            vec![("best", softmax, swiglu)];
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY (both): AVX2 and FMA detected just above.
            impls.push((
                "avx2",
                |x| unsafe { avx2::softmax(x) },
                |g, u| unsafe { avx2::swiglu(g, u) },
            ));
        }
        impls
    }

    #[test]
    fn vector_exp_softmax_and_swiglu_match_libm() {
        for (name, softmax, swiglu) in every_impl() {
            check_softmax_and_swiglu(name, softmax, swiglu);
        }
    }

    fn check_softmax_and_swiglu(
        name: &str,
        softmax: fn(&mut [f32]),
        swiglu: fn(&mut [f32], &[f32]),
    ) {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.13).collect();
        for len in [1usize, 5, 16, 17, 100, 1000] {
            let mut a = xs[..len].to_vec();
            let mut b = a.clone();
            softmax(&mut a);
            let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = b.iter().map(|&v| ((v - max) as f64).exp()).sum();
            for v in b.iter_mut() {
                *v = (((*v - max) as f64).exp() / sum) as f32;
            }
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 2e-6 * y.abs() + 1e-30,
                    "{name} {len}: {x} vs {y}"
                );
            }
        }
        let mut g = xs.clone();
        let up: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).cos()).collect();
        swiglu(&mut g, &up);
        for ((got, &x), &u) in g.iter().zip(&xs).zip(&up) {
            let want = (x as f64 / (1.0 + (-x as f64).exp()) * u as f64) as f32;
            assert!(
                (got - want).abs() <= 1e-5 * want.abs() + 1e-30,
                "{name} {x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        for (name, softmax, _) in every_impl() {
            let mut x = vec![1.0, 2.0, 3.0, -1000.0, 1.0, 2.0, 3.0, -50.0, 7.0];
            softmax(&mut x);
            assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{name}");
            assert!(x[2] > x[1] && x[3] == 0.0 && x[7] > 0.0, "{name}: {x:?}");
        }
    }
}
