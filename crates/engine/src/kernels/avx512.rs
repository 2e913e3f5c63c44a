//! AVX-512 VNNI kernels over packed matrices (see `pack.rs`): sixteen rows at a time, one zmm lane
//! per row. Per block of 32 columns, eight `vpdpbusd` each multiply a 64-byte k-row of the
//! chunk (4 weights of each of the 16 rows) by a broadcast of 4 activation bytes, leaving every
//! row's exact integer dot product in its lane — no horizontal sums. `finish_block` then scales
//! and offsets it in f32; the AMX kernel ends every block with the same function, so a token's
//! result is bit-identical whichever path and batch it ran in (which prefix caching, chunked
//! prefill and preemption rely on for identical greedy output). The kernel is compiled once per
//! format (a const parameter): with the format a run-time value, its branches sat in the inner
//! loop, and Q5's products ran 30% slower, Q4's and Q8_0's 4–10%.
//!
//! Float matrices (F32, F16, BF16: every safetensors model) run `float_rows`: a register tile
//! of rows x tokens over 16-wide f32 blocks, with thirty-two registers room for a larger tile
//! than AVX2's. Where many tokens pass (prefill), 16-bit rows are widened to f32 once per row
//! tile into a scratch (`widen_rows`) so that the tile's inner loop is loads and FMAs only: a
//! 512-bit f16 or bf16 conversion takes the FMA ports on Intel cores.

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

/// Float weight rows (`kind` F32, F16 or BF16; `w` the rows' bytes, one after another) against
/// `T` tokens: row `i` for token `t` into `out[t][i]`, in register tiles of `R` rows (the rest
/// one row at a time). Every tile sums a row and token the same way (see `x86::float_tile`), so
/// a token's result is the same bits in any batch, and the same whether its 16-bit rows were
/// widened first (`widen_rows`: exact) or are converted in the loop.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL (`has_vnni` implies them; never true off x86-64).
pub unsafe fn float_rows<const R: usize, const T: usize>(
    kind: super::QKind,
    w: &[u8],
    xf: &[&[f32]; T],
    out: &mut [&mut [f32]; T],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; `float_tile` checks each row and token's length.
    unsafe {
        use super::QKind;
        match kind {
            QKind::F32 => x86::float_rows::<R, T, 0>(w, xf, out),
            QKind::F16 => x86::float_rows::<R, T, 1>(w, xf, out),
            QKind::BF16 => x86::float_rows::<R, T, 2>(w, xf, out),
            _ => panic!("float_rows: {kind:?} is not a float kind"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "AVX-512 float rows ({kind:?}, {} bytes) off x86-64",
        w.len()
    );
}

/// Widens 16-bit float weights (`kind` F16 or BF16) to f32, exactly: `dst[i]` is element `i`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL (`has_vnni` implies them; never true off x86-64).
pub unsafe fn widen_rows(kind: super::QKind, w: &[u8], dst: &mut [f32]) {
    assert_eq!(w.len(), dst.len() * 2, "two bytes an element");
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512 widening of {kind:?} off x86-64");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: lengths checked; the features are the caller's promise.
    unsafe {
        use super::QKind;
        match kind {
            QKind::F16 => x86::widen::<1>(w, dst),
            QKind::BF16 => x86::widen::<2>(w, dst),
            _ => panic!("widen_rows: {kind:?} is not a 16-bit float kind"),
        }
    }
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

    /// Lanes `0..n` of a 16-lane mask (`n` at most 16).
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// Elements `i..i + 16` (the lanes of `m`; the others zero, their bytes never read) of a
    /// float row of kind `F` (0 f32, 1 f16, 2 bf16) at `p`, as f32.
    ///
    /// # Safety
    /// The lanes of `m` must lie inside the row.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn float_block<const F: usize>(p: *const u8, i: usize, m: __mmask16) -> __m512 {
        // SAFETY: masked loads read (and may fault on) only the lanes of `m`.
        unsafe {
            match F {
                0 => _mm512_maskz_loadu_ps(m, p.add(i * 4) as *const f32),
                1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.add(i * 2) as *const i16)),
                _ => {
                    let h = _mm256_maskz_loadu_epi16(m, p.add(i * 2) as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                }
            }
        }
    }

    /// [`super::widen_rows`] for kind `F` (1 f16, 2 bf16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn widen<const F: usize>(w: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        // SAFETY: `lanes(n - i)` keeps every read inside `w` (2n bytes) and every write inside
        // `dst`.
        unsafe {
            while i < n {
                let m = lanes(n - i);
                _mm512_mask_storeu_ps(
                    dst.as_mut_ptr().add(i),
                    m,
                    float_block::<F>(w.as_ptr(), i, m),
                );
                i += 16;
            }
        }
    }

    /// [`super::float_rows`] for weights of kind `F` (as in [`float_tile`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
    /// Each (row, token) sum runs in two accumulators, the even 16-wide blocks into one and the
    /// odd ones into the other, in order (a last partial block masked, into the chain its index
    /// gives), then the two added and reduced: the same steps whatever the tile, so a token's
    /// result does not depend on which rows and tokens shared its loop. Two chains so that a
    /// lone row and token (a decode step) does not wait on the FMA's latency every block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn float_tile<const R: usize, const T: usize, const F: usize>(
        w: &[&[u8]; R],
        xf: &[&[f32]; T],
    ) -> [[f32; R]; T] {
        let n = super::super::float_tile_len::<F>(w, xf);
        let mut acc = [[[_mm512_setzero_ps(); R]; T]; 2];
        // SAFETY: every load is masked to lanes below `n`, inside each row and each `x`.
        unsafe {
            let wp: [*const u8; R] = std::array::from_fn(|r| w[r].as_ptr());
            let xp: [*const f32; T] = std::array::from_fn(|t| xf[t].as_ptr());
            let step = |acc: &mut [[__m512; R]; T], i: usize, m: __mmask16| {
                let wv: [__m512; R] = std::array::from_fn(|r| float_block::<F>(wp[r], i, m));
                for (t, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(m, xp[t].add(i));
                    for (r, a) in a.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(wv[r], xv, *a);
                    }
                }
            };
            let [even, odd] = &mut acc;
            let mut i = 0;
            while i + 32 <= n {
                step(even, i, u16::MAX);
                step(odd, i + 16, u16::MAX);
                i += 32;
            }
            if i < n {
                step(even, i, lanes(n - i));
                i += 16;
            }
            if i < n {
                step(odd, i, lanes(n - i));
            }
        }
        let mut out = [[0.0f32; R]; T];
        for t in 0..T {
            for r in 0..R {
                out[t][r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][t][r], acc[1][t][r]));
            }
        }
        out
    }
}
