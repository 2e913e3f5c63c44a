//! AVX2 + FMA + F16C kernels, in two families:
//!
//! - `groups`, over matrices packed at load into 8-row groups (`pack.rs`, `Packing::Avx2`): one
//!   ymm lane per weight row. Per block of 32 columns and token, each of the chunk's eight 32-byte
//!   k-rows (4 weights of each of the 8 rows) meets a broadcast of the token's 4 matching
//!   activation bytes in one `vpmaddubsw` (and, for Q8_0, one `vpmaddwd`), leaving every row's
//!   exact integer dot product in its lane: no horizontal sums, one scale product per block for
//!   all 8 rows, weights loaded once for several tokens (a register-blocked 8-row x `R`-token
//!   tile). Every block ends with the same float steps for every token, so a token's result does
//!   not depend on its batch. This is what models run on.
//! - `dot_rows`, over the file layout: one weight row against `R` activation rows, one block at a
//!   time, for float matrices and for quantized ones that were not packed (tests and tools
//!   compare the two layouts).
//!
//! Where the CPU has AVX-VNNI (and the tier allows it), the packed kernels take their integer dot
//! products from `vpdpbusd` instead (four u8 x i8 products added straight into i32): one
//! instruction where AVX2 needs `vpmaddubsw` + `vpmaddwd` + `vpaddd`, the same sums.
//!
//! Integer formats multiply 4/5/8-bit weights with 8-bit activations using `maddubs` (u8 x i8
//! pairs into i16), which saturates past 2^15: 4-bit weights (0..15) against |x| <= 127 give at
//! most 3,810 a pair, so eight pairs still fit; 5-bit ones (0..31, the fifth bit put back from its
//! bit plane) at most 7,874, so four do; Q8_0's signed weights go in as |w| with the sign moved
//! onto the activation (at most 2 * 128 * 127 a pair), and every pair is widened to i32 at once.

#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use super::pack::{GroupJob, Packing};
use super::q8::Q8Row;
use super::QKind;

/// Runs `job` (an AVX2-packed matrix) for `R` tokens.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (`has_avx2`); every output cell of these tokens and
/// rows must be this thread's alone.
#[cfg(target_arch = "x86_64")]
pub unsafe fn groups<const R: usize>(job: &GroupJob<'_>) {
    // SAFETY: forwarded; AVX-VNNI only where `has_avx_vnni` found it.
    unsafe { groups_variant::<R>(job, super::has_avx_vnni()) }
}

/// `groups`, with the integer dot products by AVX-VNNI's `vpdpbusd` (`vnni`) or by AVX2's
/// `vpmaddubsw` + `vpmaddwd`: the same sums either way.
///
/// # Safety
/// As `groups`; with `vnni`, the CPU must also support AVX-VNNI.
#[cfg(target_arch = "x86_64")]
pub unsafe fn groups_variant<const R: usize>(job: &GroupJob<'_>, vnni: bool) {
    assert_eq!(job.packing, Packing::Avx2, "not an AVX2-packed matrix");
    job.check(R);
    use super::pack::{format::*, format_index};
    // SAFETY: bounds checked; features and ownership are the caller's promise.
    unsafe {
        match (format_index(job.kind), vnni) {
            (Q4_0, false) => x86::groups::<R, Q4_0>(job),
            (Q4_1, false) => x86::groups::<R, Q4_1>(job),
            (Q8_0, false) => x86::groups::<R, Q8_0>(job),
            (Q5_0, false) => x86::groups::<R, Q5_0>(job),
            (_, false) => x86::groups::<R, Q5_1>(job),
            (Q4_0, true) => x86::groups_vnni::<R, Q4_0>(job),
            (Q4_1, true) => x86::groups_vnni::<R, Q4_1>(job),
            (Q8_0, true) => x86::groups_vnni::<R, Q8_0>(job),
            (Q5_0, true) => x86::groups_vnni::<R, Q5_0>(job),
            (_, true) => x86::groups_vnni::<R, Q5_1>(job),
        }
    }
}

/// Unpacks the k-rows of `job`'s row groups (an AVX2-packed Q5 matrix) into `dst` for
/// `GroupJob::unpacked`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (`has_avx2`).
#[cfg(target_arch = "x86_64")]
pub unsafe fn unpack(job: &GroupJob<'_>, dst: &mut [u8]) {
    assert_eq!(job.packing, Packing::Avx2, "not an AVX2-packed matrix");
    job.check(0);
    // SAFETY: bounds checked; the features are the caller's promise.
    unsafe { x86::unpack(job, dst) }
}

/// Dispatches to the kernel for `kind`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub unsafe fn dot_rows<const R: usize>(
    kind: QKind,
    w: &[u8],
    xf: [&[f32]; R],
    xq: Option<[Q8Row<'_>; R]>,
) -> [f32; R] {
    // SAFETY: forwarded from the caller: the CPU has the features these functions enable.
    unsafe {
        match (kind, xq) {
            (QKind::Q4_0, Some(xq)) => x86::q4::<R, 18, false>(w, &xq),
            (QKind::Q4_1, Some(xq)) => x86::q4::<R, 20, true>(w, &xq),
            (QKind::Q8_0, Some(xq)) => x86::q8_0::<R>(w, &xq),
            (QKind::F32, _) => x86::float_tile::<1, R, 0>(&[w], &xf).map(|v| v[0]),
            (QKind::F16, _) => x86::float_tile::<1, R, 1>(&[w], &xf).map(|v| v[0]),
            (QKind::BF16, _) => x86::float_tile::<1, R, 2>(&[w], &xf).map(|v| v[0]),
            _ => super::scalar::dot_rows::<R>(kind, w, xf, xq),
        }
    }
}

/// Never called off x86-64 (`has_avx2` is false there).
///
/// # Safety
/// Always safe; kept `unsafe` to match the x86-64 signature.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn dot_rows<const R: usize>(
    kind: QKind,
    w: &[u8],
    xf: [&[f32]; R],
    xq: Option<[Q8Row<'_>; R]>,
) -> [f32; R] {
    super::scalar::dot_rows::<R>(kind, w, xf, xq)
}

/// Float weight rows (`kind` F32, F16 or BF16; `w` the rows' bytes, one after another)
/// against `T` tokens: row `i` for token `t` into `out[t][i]`, in register tiles of `R` rows
/// (the rest one row at a time; see `x86::float_tile`, which sums each row and token in the
/// same order in any tile). Off x86-64 (never called there: `has_avx2` is false), the scalar
/// kernel row by row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
pub unsafe fn float_rows<const R: usize, const T: usize>(
    kind: QKind,
    w: &[u8],
    xf: &[&[f32]; T],
    out: &mut [&mut [f32]; T],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; `float_tile` checks each row and token's length.
    unsafe {
        match kind {
            QKind::F32 => x86::float_rows::<R, T, 0>(w, xf, out),
            QKind::F16 => x86::float_rows::<R, T, 1>(w, xf, out),
            QKind::BF16 => x86::float_rows::<R, T, 2>(w, xf, out),
            _ => panic!("float_rows: {kind:?} is not a float kind"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let row =
            |ws: &[&[u8]; 1]| super::scalar::dot_rows::<T>(kind, ws[0], *xf, None).map(|v| [v]);
        super::float_row_tiles::<1, T>(w, out, row, row);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::lanes_below;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::pack::format::*;
    use super::super::pack::{
        chunk_bytes, high_bits_at, prefetch_ahead, Packing, AVX2_GROUP, PACKED_KINDS,
    };
    use super::super::{QKind, QK};
    use super::{GroupJob, Q8Row};

    /// Bytes of a chunk's k-rows unpacked.
    const UNPACKED: usize = 8 * 4 * AVX2_GROUP;

    /// Integer dot products of a Q8_0 chunk's 8 rows (lane = row) with `R` tokens' block, whose
    /// 32 bytes start at `x[t]`.
    ///
    /// # Safety
    /// `q` must point at the chunk's 256 quant bytes, each `x[t]` at 32 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_q8<const R: usize>(q: *const u8, x: &[*const i8; R]) -> [__m256i; R] {
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_si256(); R];
        // SAFETY: reads k-rows 0..8 of the chunk and bytes 0..32 of each token's block.
        unsafe {
            for k in 0..8 {
                let wk = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                // |w| as unsigned bytes (|-128| = 128 is right read unsigned).
                let aw = _mm256_abs_epi8(wk);
                for (s, &xt) in sums.iter_mut().zip(x) {
                    let xb =
                        _mm256_set1_epi32(std::ptr::read_unaligned(xt.add(4 * k) as *const i32));
                    let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb, wk));
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                }
            }
        }
        sums
    }

    /// `chunk_q8` for a Q4 chunk's 128 nibble bytes: pairs summed in i16 across all eight k-rows
    /// (at most 8 * 3,810 < 2^15), widened once.
    ///
    /// # Safety
    /// As `chunk_q8`, with 128 quant bytes at `q`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_q4<const R: usize>(q: *const u8, x: &[*const i8; R]) -> [__m256i; R] {
        let ones = _mm256_set1_epi16(1);
        let nib = _mm256_set1_epi8(0x0F);
        let mut sums = [_mm256_setzero_si256(); R];
        // SAFETY: reads parts 0..4 of the chunk and bytes 0..32 of each token's block.
        unsafe {
            for c in 0..4 {
                let v = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(v, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                for (s, &xt) in sums.iter_mut().zip(x) {
                    let x0 =
                        _mm256_set1_epi32(std::ptr::read_unaligned(xt.add(8 * c) as *const i32));
                    let x1 = _mm256_set1_epi32(std::ptr::read_unaligned(
                        xt.add(8 * c + 4) as *const i32
                    ));
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, x0),
                        _mm256_maddubs_epi16(hi, x1),
                    );
                    *s = _mm256_add_epi16(*s, p);
                }
            }
            for s in &mut sums {
                *s = _mm256_madd_epi16(*s, ones);
            }
        }
        sums
    }

    /// `chunk_q8` by AVX-VNNI: `vpdpbusd` adds each lane's four u8 x i8 products straight
    /// into i32 (no i16 step to saturate, no widening). Each token's sum is kept in several
    /// independent accumulators (four for one token, two for a tile), added at the end, so that
    /// `vpdpbusd`'s latency overlaps; integer sums are the same in any order.
    ///
    /// # Safety
    /// As `chunk_q8`; the CPU must support AVX-VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn chunk_q8_vnni<const R: usize>(q: *const u8, x: &[*const i8; R]) -> [__m256i; R] {
        let chains = if R == 1 { 4 } else { 2 };
        let mut acc = [[_mm256_setzero_si256(); R]; 4];
        // SAFETY: reads k-rows 0..8 of the chunk and bytes 0..32 of each token's block.
        unsafe {
            for k in 0..8 {
                let wk = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                let aw = _mm256_abs_epi8(wk);
                let chain = &mut acc[k % chains];
                for (s, &xt) in chain.iter_mut().zip(x) {
                    let xb =
                        _mm256_set1_epi32(std::ptr::read_unaligned(xt.add(4 * k) as *const i32));
                    *s = _mm256_dpbusd_avx_epi32(*s, aw, _mm256_sign_epi8(xb, wk));
                }
            }
        }
        join_chains(&acc, chains)
    }

    /// `chunk_q4` by AVX-VNNI (the nibbles are the unsigned operand as they are), accumulated
    /// as `chunk_q8_vnni` does.
    ///
    /// # Safety
    /// As `chunk_q4`; the CPU must support AVX-VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn chunk_q4_vnni<const R: usize>(q: *const u8, x: &[*const i8; R]) -> [__m256i; R] {
        let nib = _mm256_set1_epi8(0x0F);
        // SAFETY: reads parts 0..4 of the chunk and bytes 0..32 of each token's block.
        unsafe {
            parts_vnni(x, |c| {
                let v = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(v, nib);
                (lo, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib))
            })
        }
    }

    /// The integer dot products of a Q4 or Q5 chunk's four parts, each unpacked by `part` into
    /// k-rows `2c` and `2c + 1` as unsigned bytes, with `R` tokens' blocks at `x[t]`, by
    /// `vpdpbusd` in independent chains as `chunk_q8_vnni` does.
    ///
    /// # Safety
    /// Each `x[t]` must point at 32 readable bytes; the CPU must support AVX-VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn parts_vnni<const R: usize>(
        x: &[*const i8; R],
        part: impl Fn(usize) -> (__m256i, __m256i),
    ) -> [__m256i; R] {
        let chains = if R == 1 { 4 } else { 2 };
        let mut acc = [[_mm256_setzero_si256(); R]; 4];
        for c in 0..4 {
            let (lo, hi) = part(c);
            for (t, &xt) in x.iter().enumerate() {
                // SAFETY: bytes 8c..8c + 8 of each token's 32-byte block (the caller's promise).
                let (x0, x1) = unsafe {
                    (
                        _mm256_set1_epi32(std::ptr::read_unaligned(xt.add(8 * c) as *const i32)),
                        _mm256_set1_epi32(
                            std::ptr::read_unaligned(xt.add(8 * c + 4) as *const i32),
                        ),
                    )
                };
                let (a, b) = ((2 * c) % chains, (2 * c + 1) % chains);
                acc[a][t] = _mm256_dpbusd_avx_epi32(acc[a][t], lo, x0);
                acc[b][t] = _mm256_dpbusd_avx_epi32(acc[b][t], hi, x1);
            }
        }
        join_chains(&acc, chains)
    }

    /// Integer dot products of a Q5 chunk's eight k-rows already unpacked to unsigned bytes
    /// (0..31) at `u` (`GroupJob::unpacked`) with `R` tokens' blocks: i16 sums widened every
    /// four k-rows (see the module's saturation note).
    ///
    /// # Safety
    /// `u` must point at 256 readable bytes, each `x[t]` at 32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_u8<const R: usize>(u: *const u8, x: &[*const i8; R]) -> [__m256i; R] {
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_si256(); R];
        // SAFETY: reads k-rows 0..8 at `u` and bytes 0..32 of each token's block.
        unsafe {
            for k0 in [0, 4] {
                let mut p16 = [_mm256_setzero_si256(); R];
                for k in k0..k0 + 4 {
                    let wk = _mm256_loadu_si256(u.add(32 * k) as *const __m256i);
                    for (p, &xt) in p16.iter_mut().zip(x) {
                        let xb = _mm256_set1_epi32(std::ptr::read_unaligned(
                            xt.add(4 * k) as *const i32
                        ));
                        *p = _mm256_add_epi16(*p, _mm256_maddubs_epi16(wk, xb));
                    }
                }
                for (s, p) in sums.iter_mut().zip(p16) {
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                }
            }
        }
        sums
    }

    /// `chunk_u8` by AVX-VNNI.
    ///
    /// # Safety
    /// As `chunk_u8`; the CPU must support AVX-VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn chunk_u8_vnni<const R: usize>(u: *const u8, x: &[*const i8; R]) -> [__m256i; R] {
        // SAFETY: reads k-rows 0..8 at `u` and bytes 0..32 of each token's block.
        unsafe {
            parts_vnni(x, |c| {
                let lo = _mm256_loadu_si256(u.add(64 * c) as *const __m256i);
                (lo, _mm256_loadu_si256(u.add(64 * c + 32) as *const __m256i))
            })
        }
    }

    /// Unpacks `job`'s row groups into `dst` (see `super::unpack`).
    ///
    /// # Safety
    /// As `super::unpack`, which checked the job's bounds.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unpack(job: &GroupJob<'_>, dst: &mut [u8]) {
        let nb = job.cols / QK;
        let cb = chunk_bytes(job.kind, Packing::Avx2);
        assert!(
            matches!(job.kind, QKind::Q5_0 | QKind::Q5_1),
            "only Q5 is unpacked"
        );
        let unpacked = Packing::Avx2.unpacked_chunk();
        assert!(
            dst.len() >= (job.g1 - job.g0) * nb * unpacked,
            "unpack buffer"
        );
        let head = if job.kind == QKind::Q5_1 { 32 } else { 16 };
        let high = high_bits_at(job.kind, Packing::Avx2);
        // SAFETY: `check` bounded every chunk of groups < g1; `dst` holds every k-row written.
        unsafe {
            for (i, at) in (job.g0 * nb..job.g1 * nb).map(|c| c * cb).enumerate() {
                if job.prefetch {
                    prefetch_ahead(job.w, at, cb);
                }
                let chunk = job.w.as_ptr().add(at);
                let out = dst.as_mut_ptr().add(i * unpacked);
                let hb = _mm256_loadu_si256(chunk.add(high) as *const __m256i);
                for c in 0..4 {
                    let (lo, hi) = q5_part(chunk.add(head), hb, c);
                    _mm256_storeu_si256(out.add(64 * c) as *mut __m256i, lo);
                    _mm256_storeu_si256(out.add(64 * c + 32) as *mut __m256i, hi);
                }
            }
        }
    }

    /// K-row `k`'s fifth bits (bit plane `k` of a chunk's Q5 section, see `pack.rs`) moved to
    /// bit 4 of each byte, every other bit cleared: 16 where the weight has it, else 0. The
    /// 16-bit shifts move bit `k` within its own byte for every `k` in 0..8.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fifth_bits(hb: __m256i, k: usize) -> __m256i {
        let at4 = match k {
            0 => _mm256_slli_epi16::<4>(hb),
            1 => _mm256_slli_epi16::<3>(hb),
            2 => _mm256_slli_epi16::<2>(hb),
            3 => _mm256_slli_epi16::<1>(hb),
            4 => hb,
            5 => _mm256_srli_epi16::<1>(hb),
            6 => _mm256_srli_epi16::<2>(hb),
            _ => _mm256_srli_epi16::<3>(hb),
        };
        _mm256_and_si256(at4, _mm256_set1_epi8(0x10))
    }

    /// Part `c` (k-rows `2c` and `2c + 1`) of a Q5 chunk as unsigned 5-bit weights: the
    /// nibbles of the part's 32 bytes at `q`, with the fifth bits from `hb` (the chunk's bit
    /// planes) on top.
    ///
    /// # Safety
    /// `q` must point at the chunk's 128 nibble bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q5_part(q: *const u8, hb: __m256i, c: usize) -> (__m256i, __m256i) {
        let nib = _mm256_set1_epi8(0x0F);
        // SAFETY: part c < 4 lies inside the chunk's nibbles.
        let v = unsafe { _mm256_loadu_si256(q.add(32 * c) as *const __m256i) };
        let lo = _mm256_or_si256(_mm256_and_si256(v, nib), fifth_bits(hb, 2 * c));
        let hi = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(v, 4), nib),
            fifth_bits(hb, 2 * c + 1),
        );
        (lo, hi)
    }

    /// `chunk_q4` for a Q5 chunk: nibbles at `q`, bit planes at `h`. Weights reach 31, so a
    /// `vpmaddubsw` pair sums to at most 2 * 31 * 127 = 7,874 and four of them still fit in
    /// i16: each half of the chunk is widened once.
    ///
    /// # Safety
    /// As `chunk_q4`, with the chunk's 32 bytes of fifth bits at `h`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_q5<const R: usize>(
        q: *const u8,
        h: *const u8,
        x: &[*const i8; R],
    ) -> [__m256i; R] {
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_si256(); R];
        // SAFETY: reads the chunk's parts and bit planes and bytes 0..32 of each token's block.
        unsafe {
            let hb = _mm256_loadu_si256(h as *const __m256i);
            for half in 0..2 {
                let mut p16 = [_mm256_setzero_si256(); R];
                for c in 2 * half..2 * half + 2 {
                    let (lo, hi) = q5_part(q, hb, c);
                    for (p, &xt) in p16.iter_mut().zip(x) {
                        let x0 = _mm256_set1_epi32(std::ptr::read_unaligned(
                            xt.add(8 * c) as *const i32
                        ));
                        let x1 = _mm256_set1_epi32(std::ptr::read_unaligned(
                            xt.add(8 * c + 4) as *const i32
                        ));
                        let d = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, x0),
                            _mm256_maddubs_epi16(hi, x1),
                        );
                        *p = _mm256_add_epi16(*p, d);
                    }
                }
                for (s, p) in sums.iter_mut().zip(p16) {
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                }
            }
        }
        sums
    }

    /// `chunk_q5` by AVX-VNNI, accumulated as `chunk_q4_vnni` does.
    ///
    /// # Safety
    /// As `chunk_q5`; the CPU must support AVX-VNNI.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn chunk_q5_vnni<const R: usize>(
        q: *const u8,
        h: *const u8,
        x: &[*const i8; R],
    ) -> [__m256i; R] {
        // SAFETY: reads the chunk's parts and bit planes and bytes 0..32 of each token's block.
        unsafe {
            let hb = _mm256_loadu_si256(h as *const __m256i);
            parts_vnni(x, |c| q5_part(q, hb, c))
        }
    }

    /// The sum of the first `chains` accumulators of each token.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn join_chains<const R: usize>(acc: &[[__m256i; R]; 4], chains: usize) -> [__m256i; R] {
        std::array::from_fn(|t| {
            let mut s = acc[0][t];
            for chain in &acc[1..chains] {
                s = _mm256_add_epi32(s, chain[t]);
            }
            s
        })
    }

    /// Lanes below `n` (at most 8) set: a `maskload` / `maskstore` mask.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn lanes_below(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// Defines an AVX2-packed product (see `super::groups`) under `$features`, with `$q8` and
    /// `$q4` and `$q5` for the chunks' integer dot products; `F` is the format (`Q8_0`, `Q4_0`,
    /// `Q4_1`, `Q5_0`, `Q5_1`).
    macro_rules! packed_product {
        ($(#[$doc:meta])* $name:ident, $features:literal, $q8:ident, $q4:ident, $q5:ident,
         $u8:ident) => {
    $(#[$doc])*
    ///
    /// # Safety
    /// As `super::groups`, which checked the job's bounds; the CPU must have the features the
    /// function enables.
    #[target_feature(enable = $features)]
    pub unsafe fn $name<const R: usize, const F: u8>(job: &GroupJob<'_>) {
        let kind = PACKED_KINDS[F as usize];
        debug_assert_eq!(kind, job.kind);
        let (cols, rows) = (job.cols, job.rows);
        let nb = cols / QK;
        let cb = chunk_bytes(kind, Packing::Avx2);
        let high = if F == Q5_0 || F == Q5_1 {
            high_bits_at(kind, Packing::Avx2)
        } else {
            0
        };
        // Scale bytes ahead of the quants: 8 f16 `d`, and 8 f16 `m` for Q4_1 and Q5_1.
        let minimum = F == Q4_1 || F == Q5_1;
        let head = if minimum { 32 } else { 16 };
        let (qs, dx, sx) = (job.xq.qs_all(), job.xq.d_all(), job.xq.s_all());
        // SAFETY: `GroupJob::check` bounded every chunk (groups < g1), every token's values and
        // block scales (tokens < t0 + R); output cells are limited to real rows and owned by this
        // thread (the caller's promise).
        unsafe {
            for g in job.g0..job.g1 {
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    let at = (g * nb + b) * cb;
                    let chunk = job.w.as_ptr().add(at);
                    if job.prefetch {
                        prefetch_ahead(job.w, at, cb);
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(chunk as *const __m128i));
                    let off = match F {
                        _ if minimum => {
                            _mm256_cvtph_ps(_mm_loadu_si128(chunk.add(16) as *const __m128i))
                        }
                        Q4_0 => _mm256_mul_ps(dw, _mm256_set1_ps(-8.0)),
                        Q5_0 => _mm256_mul_ps(dw, _mm256_set1_ps(-16.0)),
                        _ => _mm256_setzero_ps(),
                    };
                    let x: [*const i8; R] =
                        std::array::from_fn(|t| qs.as_ptr().add((job.t0 + t) * cols + b * QK));
                    let isums = match (F, job.unpacked) {
                        (Q8_0, _) => $q8::<R>(chunk.add(head), &x),
                        (Q4_0 | Q4_1, _) => $q4::<R>(chunk.add(head), &x),
                        (_, Some(u)) => {
                            $u8::<R>(u.as_ptr().add(((g - job.g0) * nb + b) * UNPACKED), &x)
                        }
                        _ => $q5::<R>(chunk.add(head), chunk.add(high), &x),
                    };
                    for (t, (a, isum)) in acc.iter_mut().zip(isums).enumerate() {
                        let blk = (job.t0 + t) * nb + b;
                        let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*dx.get_unchecked(blk)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, *a);
                        if F != Q8_0 {
                            *a = _mm256_fmadd_ps(off, _mm256_set1_ps(*sx.get_unchecked(blk)), *a);
                        }
                    }
                }
                let live = (rows - g * AVX2_GROUP).min(AVX2_GROUP);
                for (t, a) in acc.iter().enumerate() {
                    let o = job.out.add((job.t0 + t) * rows + g * AVX2_GROUP);
                    if live == AVX2_GROUP {
                        _mm256_storeu_ps(o, *a);
                    } else {
                        _mm256_maskstore_ps(o, lanes_below(live), *a);
                    }
                }
            }
        }
    }
        };
    }

    packed_product!(
        /// The AVX2-packed product by AVX2 alone.
        groups,
        "avx2,fma,f16c",
        chunk_q8,
        chunk_q4,
        chunk_q5,
        chunk_u8
    );
    packed_product!(
        /// The AVX2-packed product with AVX-VNNI's dot products.
        groups_vnni,
        "avx2,fma,f16c,avxvnni",
        chunk_q8_vnni,
        chunk_q4_vnni,
        chunk_q5_vnni,
        chunk_u8_vnni
    );

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees two readable bytes at `p`.
        unsafe {
            let bits = std::ptr::read_unaligned(p as *const u16);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(s)
    }

    fn check_rows<const R: usize>(nb: usize, xq: &[Q8Row<'_>; R]) {
        for x in xq {
            assert!(x.qs.len() >= nb * 32 && x.d.len() >= nb && x.s.len() >= nb);
        }
    }

    /// Q4_0 (`BS` = 18, no minimum) and Q4_1 (`BS` = 20, `MIN` = true).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4<const R: usize, const BS: usize, const MIN: bool>(
        w: &[u8],
        xq: &[Q8Row<'_>; R],
    ) -> [f32; R] {
        let nb = w.len() / BS;
        check_rows(nb, xq);
        let qoff = if MIN { 4 } else { 2 };
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_off = [0.0f32; R];
        // SAFETY: `b < nb` keeps every weight read inside `w`; `check_rows` keeps every
        // activation read inside its row.
        unsafe {
            let wp = w.as_ptr();
            for b in 0..nb {
                let blk = wp.add(b * BS);
                let d = f16_at(blk);
                let off = if MIN { f16_at(blk.add(2)) } else { -8.0 * d };
                let q = _mm_loadu_si128(blk.add(qoff) as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let wv = _mm256_set_m128i(hi, lo);
                for r in 0..R {
                    let x = &xq[r];
                    let xv = _mm256_loadu_si256(x.qs.as_ptr().add(b * 32) as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
                    let scale = _mm256_set1_ps(d * *x.d.get_unchecked(b));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
                    acc_off[r] += off * *x.s.get_unchecked(b);
                }
            }
            let mut out = [0.0f32; R];
            for r in 0..R {
                out[r] = hsum(acc[r]) + acc_off[r];
            }
            out
        }
    }

    /// Q8_0: signed weights, so the sign moves onto the activation before `maddubs`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0<const R: usize>(w: &[u8], xq: &[Q8Row<'_>; R]) -> [f32; R] {
        let nb = w.len() / 34;
        check_rows(nb, xq);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY: as in `q4`: all reads are bounded by `nb` and `check_rows`.
        unsafe {
            let wp = w.as_ptr();
            for b in 0..nb {
                let blk = wp.add(b * 34);
                let d = f16_at(blk);
                let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                for r in 0..R {
                    let x = &xq[r];
                    let xv = _mm256_loadu_si256(x.qs.as_ptr().add(b * 32) as *const __m256i);
                    let sx = _mm256_sign_epi8(xv, wv);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                    let scale = _mm256_set1_ps(d * *x.d.get_unchecked(b));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
                }
            }
            let mut out = [0.0f32; R];
            for r in 0..R {
                out[r] = hsum(acc[r]);
            }
            out
        }
    }

    /// One 8-wide block of float weights at element `i` as f32 (`F` as in [`float_tile`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn float_block<const F: usize>(wp: *const u8, i: usize) -> __m256 {
        // SAFETY: the caller guarantees the block's bytes are readable.
        unsafe {
            match F {
                0 => _mm256_loadu_ps(wp.add(i * 4) as *const f32),
                1 => _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i * 2) as *const __m128i)),
                _ => {
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(wp.add(i * 2) as *const __m128i));
                    _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
                }
            }
        }
    }

    /// [`super::float_rows`] for weights of kind `F` (as in [`float_tile`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn float_rows<const R: usize, const T: usize, const F: usize>(
        w: &[u8],
        xf: &[&[f32]; T],
        out: &mut [&mut [f32]; T],
    ) {
        // SAFETY (both closures): the features are the caller's promise; `float_tile` checks
        // the lengths.
        super::super::float_row_tiles::<R, T>(
            w,
            out,
            |ws| unsafe { float_tile::<R, T, F>(ws, xf) },
            |ws| unsafe { float_tile::<1, T, F>(ws, xf) },
        );
    }

    /// `R` float weight rows (`F` = 0 for f32, 1 for f16, 2 for bf16) against `T` tokens' f32
    /// activations: `out[t][r]`.
    ///
    /// Each (row, token) sum runs in two accumulators, the even 8-wide blocks into one and the
    /// odd ones into the other, in order, joined, then the remainder one element at a time: a
    /// token's result is the same bits in any tile, which only decides which sums share a loop.
    /// Two chains, not one, so that a lone row and token (a decode step) does not wait on the
    /// FMA's latency every block while it reads its row as one sequential stream (several rows
    /// read side by side as short interleaved streams ran a decode step 20% slower on an
    /// AVX2-only AMD EPYC); each weight block is converted once for `T` tokens and each
    /// activation block loaded once for `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn float_tile<const R: usize, const T: usize, const F: usize>(
        w: &[&[u8]; R],
        xf: &[&[f32]; T],
    ) -> [[f32; R]; T] {
        let n = super::super::float_tile_len::<F>(w, xf);
        let mut acc = [[[_mm256_setzero_ps(); R]; T]; 2];
        let mut out = [[0.0f32; R]; T];
        // SAFETY: `i + 8 <= n` bounds every vector read of each row and each `x`, `i < n` every
        // scalar one.
        unsafe {
            let wp: [*const u8; R] = std::array::from_fn(|r| w[r].as_ptr());
            let xp: [*const f32; T] = std::array::from_fn(|t| xf[t].as_ptr());
            let step = |acc: &mut [[__m256; R]; T], i: usize| {
                let wv: [__m256; R] = std::array::from_fn(|r| float_block::<F>(wp[r], i));
                for (t, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(xp[t].add(i));
                    for (r, a) in a.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(wv[r], xv, *a);
                    }
                }
            };
            let [even, odd] = &mut acc;
            let mut i = 0;
            while i + 16 <= n {
                step(even, i);
                step(odd, i + 8);
                i += 16;
            }
            if i + 8 <= n {
                step(even, i);
                i += 8;
            }
            for t in 0..T {
                for r in 0..R {
                    out[t][r] = hsum(_mm256_add_ps(acc[0][t][r], acc[1][t][r]));
                }
            }
            while i < n {
                for r in 0..R {
                    let wv = match F {
                        0 => std::ptr::read_unaligned(wp[r].add(i * 4) as *const f32),
                        1 => half::f16::from_bits(std::ptr::read_unaligned(
                            wp[r].add(i * 2) as *const u16
                        ))
                        .to_f32(),
                        _ => half::bf16::from_bits(std::ptr::read_unaligned(
                            wp[r].add(i * 2) as *const u16
                        ))
                        .to_f32(),
                    };
                    for t in 0..T {
                        out[t][r] += wv * *xp[t].add(i);
                    }
                }
                i += 1;
            }
        }
        out
    }
}
