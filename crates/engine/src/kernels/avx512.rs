//! AVX-512 VNNI kernels over *packed* rows (see `pack.rs`): a row's block scales sit together at
//! its start and its quants follow contiguously, so one 64-byte load brings four Q4 blocks (or two
//! Q8_0 blocks) and `vpdpbusd` multiplies 64 u8 x i8 pairs into sixteen i32 lanes in one
//! instruction — about twice the work per instruction of the AVX2 path, with no per-block gathers.
//!
//! Lane bookkeeping: for Q4, lanes `4k..4k+4` of the accumulator hold block `k` of the group of
//! four (the activations come in `Q8Acts`' quad layout to match the nibble order); for Q8_0,
//! lanes `8k..8k+8` hold block `k` of the pair. Per-block float scales are spread over the same
//! lanes, so each group costs one int-to-float conversion and one fused multiply-add per token.
//! Offsets (Q4_1's minimum, Q4_0's `-8`, Q8_0's `-128` from the unsigned trick) are a separate
//! dot product of a per-block weight array with the activations' `d * sum(q)`.
//!
//! Each call handles a range of rows for `R` tokens and writes `out[t * stride + r]` itself, so
//! the feature dispatch happens once per range, not once per row.

#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use super::q8::Q8Row;
use super::{QKind, QK};

/// Where a kernel writes: token `t`, row `r` lands at `ptr[t * stride + r]`.
#[derive(Clone, Copy)]
pub struct OutPtr {
    /// Base pointer.
    pub ptr: *mut f32,
    /// Distance between tokens.
    pub stride: usize,
}

/// One call's work, as the per-format kernels take it.
#[derive(Clone, Copy)]
struct RowJob<'a, const R: usize> {
    w: &'a [u8],
    nb: usize,
    rb: usize,
    xq: &'a [Q8Row<'a>; R],
    r0: usize,
    r1: usize,
    out: OutPtr,
    prefetch: bool,
}

/// Products of packed rows `r0..r1` of `w` (`kind`, `cols` wide, `row_bytes` apart) with `R`
/// token rows; `prefetch` on the first pass over these rows (later token tiles find them cached).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI (see `has_vnni`); `w` must hold packed rows; every
/// `out` cell for `t < R`, `r0 <= r < r1` must be writable by this thread alone.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows<const R: usize>(
    kind: QKind,
    w: &[u8],
    cols: usize,
    xq: &[Q8Row<'_>; R],
    r0: usize,
    r1: usize,
    out: OutPtr,
    prefetch: bool,
) {
    let nb = cols / QK;
    let rb = kind.row_bytes(cols);
    assert!(r1 * rb <= w.len(), "row range outside the matrix");
    for x in xq {
        assert!(x.qs.len() >= nb * QK && x.s.len() >= nb);
        assert!(x.q4.len() >= nb.div_ceil(4) * 128 && x.d4.len() >= nb.div_ceil(4) * 16);
        assert!(x.d2.len() >= nb.div_ceil(2) * 16);
    }
    let job = RowJob {
        w,
        nb,
        rb,
        xq,
        r0,
        r1,
        out,
        prefetch,
    };
    // SAFETY: bounds checked above; features and output ownership are the caller's promise.
    unsafe {
        match kind {
            QKind::Q4_0 => x86::q4::<R, false>(&job),
            QKind::Q4_1 => x86::q4::<R, true>(&job),
            QKind::Q8_0 => x86::q8_0::<R>(&job),
            _ => unreachable!("only integer formats are packed"),
        }
    }
}

/// Never called off x86-64 (`has_vnni` is false there).
///
/// # Safety
/// Always safe; kept `unsafe` to match the x86-64 signature.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows<const R: usize>(
    _kind: QKind,
    _w: &[u8],
    _cols: usize,
    _xq: &[Q8Row<'_>; R],
    _r0: usize,
    _r1: usize,
    _out: OutPtr,
    _prefetch: bool,
) {
    unreachable!("AVX-512 kernels on a non-x86 target")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Q8Row, RowJob};

    /// How far ahead of the row being multiplied its successors are fetched: the hardware
    /// prefetcher alone leaves these short, barrier-separated row streams at about half the
    /// cache's bandwidth (measured: 7.2 ms -> 4.2 ms for the default model's layer matrices
    /// at one token, 2 threads, with 4-8 KB ahead).
    pub const PREFETCH_BYTES: usize = 6144;

    /// Asks for the cache lines of bytes `[at, at + len)` of `w` (those inside it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn prefetch_row(w: &[u8], at: usize, len: usize) {
        let end = (at + len).min(w.len());
        let mut p = at;
        while p < end {
            // SAFETY: `p < w.len()`; prefetching never faults anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(p) as *const i8) };
            p += 64;
        }
    }

    /// `sum_b a[b] * s[b]` for `nb` f16 values at `a` and the activations' block offsets `s`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn offset_dot<const R: usize>(a: *const u8, nb: usize, xq: &[Q8Row<'_>; R]) -> [f32; R] {
        let mut acc = [_mm512_setzero_ps(); R];
        // SAFETY: every read is masked to the first `nb` elements of `a` and of each `s`.
        unsafe {
            let mut b = 0;
            while b < nb {
                let k = (nb - b).min(16);
                let m = (1u32 << k) - 1;
                let av = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    m as u16,
                    a.add(b * 2) as *const i16,
                ));
                for r in 0..R {
                    let s = _mm512_maskz_loadu_ps(m as u16, xq[r].s.as_ptr().add(b));
                    acc[r] = _mm512_fmadd_ps(av, s, acc[r]);
                }
                b += 16;
            }
            std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
        }
    }

    /// Q4_0 (`MIN` = false: offset `-8 d` per block) and Q4_1 (`MIN`: offset `m` per block).
    /// Packed row: `d[nb]` (f16), for Q4_1 `m[nb]` (f16), then `nb * 16` nibble bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q4<const R: usize, const MIN: bool>(job: &RowJob<'_, R>) {
        let RowJob { w, nb, rb, xq, .. } = *job;
        let nq = nb.div_ceil(4);
        let qoff = if MIN { 4 * nb } else { 2 * nb };
        let nib = _mm512_set1_epi8(0x0F);
        // Lane l takes block l / 4 of the group's four scales.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        // SAFETY: rows r0..r1 lie inside `w` (checked by `rows`); within a row, group `g` reads
        // quant bytes [64g, 64g + 16 * blocks) and scales [2 * 4g, 2 * (4g + blocks)) with masks
        // that stop at `nb` blocks; activation reads are bounded by `rows`' asserts.
        unsafe {
            for r in job.r0..job.r1 {
                let row = w.as_ptr().add(r * rb);
                if job.prefetch {
                    prefetch_row(w, r * rb + PREFETCH_BYTES, rb);
                }
                let qs = row.add(qoff);
                let mut acc = [_mm512_setzero_ps(); R];
                for g in 0..nq {
                    let blocks = (nb - 4 * g).min(4);
                    let (qv, dw) = if blocks == 4 {
                        (
                            _mm512_loadu_si512(qs.add(64 * g) as *const __m512i),
                            _mm_loadl_epi64(row.add(8 * g) as *const __m128i),
                        )
                    } else {
                        let qm = (1u64 << (16 * blocks)) - 1;
                        let dm = (1u8 << blocks) - 1;
                        (
                            _mm512_maskz_loadu_epi8(qm, qs.add(64 * g) as *const i8),
                            _mm_maskz_loadu_epi16(dm, row.add(8 * g) as *const i16),
                        )
                    };
                    let lo = _mm512_and_si512(qv, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(qv, 4), nib);
                    let dw =
                        _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(dw)));
                    for t in 0..R {
                        let x = &xq[t];
                        let xp = x.q4.as_ptr().add(128 * g);
                        let xa = _mm512_loadu_si512(xp as *const __m512i);
                        let xb = _mm512_loadu_si512(xp.add(64) as *const __m512i);
                        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa);
                        let p = _mm512_dpbusd_epi32(p, hi, xb);
                        let sc = _mm512_mul_ps(dw, _mm512_loadu_ps(x.d4.as_ptr().add(16 * g)));
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[t]);
                    }
                }
                let off = offset_dot::<R>(if MIN { row.add(2 * nb) } else { row }, nb, xq);
                let c = if MIN { 1.0 } else { -8.0 };
                for t in 0..R {
                    *job.out.ptr.add(t * job.out.stride + r) =
                        _mm512_reduce_add_ps(acc[t]) + c * off[t];
                }
            }
        }
    }

    /// Q8_0. Packed row: `d[nb]` (f16), then `nb * 32` signed bytes. `vpdpbusd` wants one
    /// unsigned operand, so weights are biased by 128 (`xor 0x80`) and `128 * d * sum(x)` is
    /// taken back through the offset dot.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q8_0<const R: usize>(job: &RowJob<'_, R>) {
        let RowJob { w, nb, rb, xq, .. } = *job;
        let np = nb.div_ceil(2);
        let bias = _mm512_set1_epi8(-128);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        // SAFETY: as in `q4`: pair `p` reads quant bytes [64p, 64p + 32 * blocks) and scales
        // [4p, 4p + 2 * blocks) of the row, masked at `nb` blocks.
        unsafe {
            for r in job.r0..job.r1 {
                let row = w.as_ptr().add(r * rb);
                if job.prefetch {
                    prefetch_row(w, r * rb + PREFETCH_BYTES, rb);
                }
                let qs = row.add(2 * nb);
                let mut acc = [_mm512_setzero_ps(); R];
                for p in 0..np {
                    let blocks = (nb - 2 * p).min(2);
                    let qm = if blocks == 2 {
                        u64::MAX
                    } else {
                        (1u64 << 32) - 1
                    };
                    let dm = (1u8 << blocks) - 1;
                    let wv = _mm512_maskz_loadu_epi8(qm, qs.add(64 * p) as *const i8);
                    let wu = _mm512_xor_si512(wv, bias);
                    let dw = _mm_cvtph_ps(_mm_maskz_loadu_epi16(dm, row.add(4 * p) as *const i16));
                    let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dw));
                    for t in 0..R {
                        let x = &xq[t];
                        let xv = _mm512_maskz_loadu_epi8(qm, x.qs.as_ptr().add(64 * p));
                        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv);
                        let sc = _mm512_mul_ps(dw, _mm512_loadu_ps(x.d2.as_ptr().add(16 * p)));
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[t]);
                    }
                }
                let off = offset_dot::<R>(row, nb, xq);
                for t in 0..R {
                    *job.out.ptr.add(t * job.out.stride + r) =
                        _mm512_reduce_add_ps(acc[t]) - 128.0 * off[t];
                }
            }
        }
    }
}
