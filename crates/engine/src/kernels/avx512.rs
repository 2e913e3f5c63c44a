//! AVX-512 VNNI kernels over packed matrices (see `pack.rs`): sixteen rows at a time, one zmm lane
//! per row. Per block of 32 columns, eight `vpdpbusd` each multiply a 64-byte k-row of the
//! chunk (4 weights of each of the 16 rows) by a broadcast of 4 activation bytes, leaving every
//! row's exact integer dot product in its lane — no horizontal sums. `finish_block` then scales
//! and offsets it in f32; the AMX kernel ends every block with the same function, so a token's
//! result is bit-identical whichever path and batch it ran in (which prefix caching, chunked
//! prefill and preemption rely on for identical greedy output). The kernel is compiled once per
//! format (a const parameter): with the format a run-time value, its branches sat in the inner
//! loop, and Q5's products ran 30% slower, Q4's and Q8_0's 4–10%.

#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

pub use super::pack::GroupJob;

/// Runs `job` for `R` tokens.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI (`has_vnni`); `job.w` must be packed for `job.kind`;
/// every output cell of these tokens and rows must be this thread's alone.
#[cfg(target_arch = "x86_64")]
pub unsafe fn groups<const R: usize>(job: &GroupJob<'_>) {
    assert_eq!(
        job.packing,
        super::pack::Packing::Vnni,
        "not a VNNI-packed matrix"
    );
    job.check(R);
    use super::pack::{format::*, format_index};
    // SAFETY: bounds checked; features and ownership are the caller's promise.
    unsafe {
        match format_index(job.kind) {
            Q4_0 => x86::groups::<R, Q4_0>(job),
            Q4_1 => x86::groups::<R, Q4_1>(job),
            Q8_0 => x86::groups::<R, Q8_0>(job),
            Q5_0 => x86::groups::<R, Q5_0>(job),
            _ => x86::groups::<R, Q5_1>(job),
        }
    }
}

/// Unpacks the k-rows of `job`'s row groups (a VNNI-packed Q5 matrix) into `dst` for
/// `GroupJob::unpacked`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI (`has_vnni`).
#[cfg(target_arch = "x86_64")]
pub unsafe fn unpack(job: &GroupJob<'_>, dst: &mut [u8]) {
    assert_eq!(
        job.packing,
        super::pack::Packing::Vnni,
        "not a VNNI-packed matrix"
    );
    job.check(0);
    // SAFETY: bounds checked; the features are the caller's promise.
    unsafe { x86::unpack(job, dst) }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::super::pack::{
        chunk_bytes, high_bits_at, prefetch_ahead, Packing, GROUP, PACKED_KINDS,
    };
    use super::super::q8::Q8Acts;
    use super::super::{QKind, QK};
    use super::GroupJob;

    /// The 16 rows' scales and per-block offsets of a chunk (offsets: Q4_1's and Q5_1's
    /// minimums; unused for the others, whose bias `finish_block` takes off the integer sum).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn chunk_scales(kind: QKind, chunk: *const u8) -> (__m512, __m512) {
        // SAFETY: a chunk starts with 32 bytes of scales (and 32 of minimums for Q4_1).
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(chunk as *const __m256i));
            let off = match kind {
                QKind::Q4_1 | QKind::Q5_1 => {
                    _mm512_cvtph_ps(_mm256_loadu_si256(chunk.add(32) as *const __m256i))
                }
                _ => _mm512_setzero_ps(),
            };
            (d, off)
        }
    }

    /// The chunk's eight k-rows as unsigned bytes (Q5's with their fifth bits: 0..31).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn k_rows(kind: QKind, chunk: *const u8) -> [__m512i; 8] {
        // SAFETY: the quants follow the scales: 256 bytes for Q4 and Q5 (then Q5's 64 bytes of
        // bit planes), 512 for Q8_0.
        unsafe {
            if kind == QKind::Q8_0 {
                let q = chunk.add(32);
                std::array::from_fn(|k| _mm512_loadu_si512(q.add(64 * k) as *const __m512i))
            } else {
                let minimum = matches!(kind, QKind::Q4_1 | QKind::Q5_1);
                let q = chunk.add(if minimum { 64 } else { 32 });
                let nib = _mm512_set1_epi8(0x0F);
                let parts: [__m512i; 4] =
                    std::array::from_fn(|c| _mm512_loadu_si512(q.add(64 * c) as *const __m512i));
                let mut rows: [__m512i; 8] = std::array::from_fn(|k| {
                    let v = parts[k / 2];
                    if k % 2 == 0 {
                        _mm512_and_si512(v, nib)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)
                    }
                });
                if matches!(kind, QKind::Q5_0 | QKind::Q5_1) {
                    // Mask k holds k-row k's fifth bits, a bit per byte: add 16 under it.
                    let masks = chunk.add(high_bits_at(kind, Packing::Vnni)) as *const u64;
                    let sixteen = _mm512_set1_epi8(16);
                    for (k, row) in rows.iter_mut().enumerate() {
                        let set = std::ptr::read_unaligned(masks.add(k));
                        *row = _mm512_mask_add_epi8(*row, set, *row, sixteen);
                    }
                }
                rows
            }
        }
    }

    /// One block's contribution to a token's 16 row sums: `isum` is the block's exact integer dot
    /// product per row of the stored values (for Q8_0, Q4_0 and Q5_0 still biased by 128, 8 or
    /// 16 times `sum(x)`), `blk` the token's block index in
    /// `xq` (scale, `d * sum(q)`, int sum). Every kernel family ends a block here, in this order.
    ///
    /// # Safety
    /// `blk` must be a block of `xq` (`GroupJob::check` bounds it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn finish_block(
        kind: QKind,
        acc: __m512,
        isum: __m512i,
        (dw, off): (__m512, __m512),
        xq: &Q8Acts,
        blk: usize,
    ) -> __m512 {
        // SAFETY: the caller keeps `blk` inside the activations.
        let (dx, sx, qsum) = unsafe {
            (
                *xq.d_all().get_unchecked(blk),
                *xq.s_all().get_unchecked(blk),
                *xq.qsum_all().get_unchecked(blk),
            )
        };
        // Formats stored with a fixed bias (Q8_0's +128 for the unsigned operand, Q4_0's +8,
        // Q5_0's +16) take it off the integer sum, exactly; Q4_1 and Q5_1 add their minimums.
        let bias = match kind {
            QKind::Q8_0 => 128,
            QKind::Q4_0 => 8,
            QKind::Q5_0 => 16,
            _ => 0,
        };
        let isum = if bias > 0 {
            _mm512_sub_epi32(isum, _mm512_set1_epi32(bias * qsum))
        } else {
            isum
        };
        let sc = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
        let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc);
        if bias > 0 {
            acc
        } else {
            _mm512_fmadd_ps(off, _mm512_set1_ps(sx), acc)
        }
    }

    /// Bytes of a chunk's k-rows unpacked.
    const UNPACKED: usize = 8 * 4 * GROUP;

    /// Unpacks the k-rows of `job`'s row groups (a Q5 matrix) into `dst`, in the layout
    /// `GroupJob::unpacked` reads.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/VNNI; `job` must have passed `GroupJob::check`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn unpack(job: &GroupJob<'_>, dst: &mut [u8]) {
        let nb = job.cols / QK;
        let cb = chunk_bytes(job.kind, Packing::Vnni);
        assert!(
            matches!(job.kind, QKind::Q5_0 | QKind::Q5_1),
            "only Q5 is unpacked"
        );
        assert!(
            dst.len() >= (job.g1 - job.g0) * nb * UNPACKED,
            "unpack buffer"
        );
        // SAFETY: `check` bounded every chunk of groups < g1; `dst` holds every k-row written.
        unsafe {
            for (i, at) in (job.g0 * nb..job.g1 * nb).map(|c| c * cb).enumerate() {
                if job.prefetch {
                    prefetch_ahead(job.w, at, cb);
                }
                let out = dst.as_mut_ptr().add(i * UNPACKED);
                for (k, row) in k_rows(job.kind, job.w.as_ptr().add(at)).iter().enumerate() {
                    _mm512_storeu_si512(out.add(64 * k) as *mut __m512i, *row);
                }
            }
        }
    }

    /// Lanes of group `g` that are real rows.
    #[inline]
    pub fn row_mask(rows: usize, g: usize) -> u16 {
        let n = (rows - g * GROUP).min(GROUP);
        if n == GROUP {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn groups<const R: usize, const F: u8>(job: &GroupJob<'_>) {
        let (kind, cols) = (PACKED_KINDS[F as usize], job.cols);
        debug_assert_eq!(kind, job.kind);
        let nb = cols / QK;
        let cb = chunk_bytes(kind, Packing::Vnni);
        let qs = job.xq.qs_all();
        // SAFETY: `GroupJob::check` bounded every chunk (groups < g1) and every token row read
        // (tokens < t0 + R); output cells are masked to real rows and owned by this thread.
        unsafe {
            for g in job.g0..job.g1 {
                let mut acc = [_mm512_setzero_ps(); R];
                for b in 0..nb {
                    let at = (g * nb + b) * cb;
                    let chunk = job.w.as_ptr().add(at);
                    if job.prefetch {
                        prefetch_ahead(job.w, at, cb);
                    }
                    let scales = chunk_scales(kind, chunk);
                    let wk = match job.unpacked {
                        Some(u) => {
                            let at = ((g - job.g0) * nb + b) * UNPACKED;
                            let k = u.as_ptr().add(at);
                            std::array::from_fn(|i| {
                                _mm512_loadu_si512(k.add(64 * i) as *const __m512i)
                            })
                        }
                        None => k_rows(kind, chunk),
                    };
                    for (t, a) in acc.iter_mut().enumerate() {
                        let tok = job.t0 + t;
                        let x = qs.as_ptr().add(tok * cols + b * QK);
                        let xk = |k: usize| {
                            _mm512_set1_epi32(std::ptr::read_unaligned(x.add(4 * k) as *const i32))
                        };
                        // Two independent chains; integer sums, so the split changes nothing.
                        let mut i0 = _mm512_setzero_si512();
                        let mut i1 = _mm512_setzero_si512();
                        for k in (0..8).step_by(2) {
                            i0 = _mm512_dpbusd_epi32(i0, wk[k], xk(k));
                            i1 = _mm512_dpbusd_epi32(i1, wk[k + 1], xk(k + 1));
                        }
                        let isum = _mm512_add_epi32(i0, i1);
                        *a = finish_block(kind, *a, isum, scales, job.xq, tok * nb + b);
                    }
                }
                let mask = row_mask(job.rows, g);
                for (t, a) in acc.iter().enumerate() {
                    let o = job.out.add((job.t0 + t) * job.rows + g * GROUP);
                    _mm512_mask_storeu_ps(o, mask, *a);
                }
            }
        }
    }
}
