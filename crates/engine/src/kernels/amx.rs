//! Intel AMX int8 tiles for batched products (prefill chunks, many decoding sequences): one
//! `tdpbsud`/`tdpbssd` multiplies a 16-token x 32-byte activation tile by a 32 x 16-row weight
//! tile into 16 x 16 int32 sums — 8,192 multiply-adds in one instruction, against 64 for an
//! AVX-512 VNNI one. Per block of 32 the sums are scaled in f32 (`d_w * d_x`) and the block's
//! offset (`m_w * s_x`, or `-8 d_w * s_x` for Q4_0) added, sixteen tokens per zmm register.
//!
//! Tiles: tmm0 = sums (16 tokens x 16 rows of i32), tmm1 = activations (16 tokens x 32 signed
//! bytes, read straight from `Q8Acts`' rows), tmm2 = weights (8 rows x 64 bytes: the VNNI layout,
//! where row `k` holds bytes `4k..4k + 4` of each of the 16 weight rows), built per row tile from
//! the packed rows (nibbles unpacked to u8 for Q4, signed bytes as they are for Q8_0).
//!
//! Whole tiles of 16 tokens go through here; the rest of a batch takes the VNNI path. Linux makes
//! a process ask for the tile state once (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); each thread loads
//! the tile configuration before use and releases it after.

#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use super::q8::Q8Acts;
use super::{QKind, QK};
use std::sync::OnceLock;

/// Tokens per tile.
pub const TOKENS: usize = 16;
/// Weight rows per tile.
pub const ROWS: usize = 16;

/// Whether the AMX path is in use: the hardware and OS allow it (`amx_available`) and it was
/// asked for with `LASTMILE_AMX=1`. Off by default: its per-block float steps differ from the
/// AVX-512 path's, so a token's logits would depend (in the last bits, and through int8
/// rounding of activations, visibly after 30 layers) on whether it fell in a tile of 16 or in
/// the remainder, and greedy output would no longer be identical with and without the prefix
/// cache or across chunkings. The fix is one arithmetic for both paths (16-row interleaved
/// weights, lanes = rows, the same epilogue), noted as the next step.
pub fn has_amx() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("LASTMILE_AMX").is_some_and(|v| v == "1") && amx_available()
    })
}

/// Whether AMX int8 can run here: the CPU has it, the OS enables its state, and Linux granted
/// this process the tile data permission.
pub fn amx_available() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            super::has_vnni() && x86::enable()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

#[cfg(target_arch = "x86_64")]
pub use x86::rows;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{Q8Acts, QKind, QK, ROWS, TOKENS};

    /// Checks CPUID and XCR0 and asks Linux for the tile data state.
    #[cfg(target_os = "linux")]
    pub fn enable() -> bool {
        // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512 (checked by the caller); XGETBV
        // is available where OSXSAVE is set, checked first.
        unsafe {
            let l7 = __cpuid_count(7, 0);
            let (tile, int8) = (l7.edx & (1 << 24) != 0, l7.edx & (1 << 25) != 0);
            let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
            if !(tile && int8 && osxsave) {
                return false;
            }
            let xcr0 = xgetbv0();
            if xcr0 & (0b11 << 17) != 0b11 << 17 {
                return false;
            }
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_ulong = 18;
        // SAFETY: a plain syscall with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// XCR0 (which register states the OS saves).
    ///
    /// # Safety
    /// OSXSAVE must be set.
    unsafe fn xgetbv0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0; the caller checked OSXSAVE.
        unsafe {
            asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        ((hi as u64) << 32) | lo as u64
    }

    /// The 64-byte tile configuration: palette 1; tmm0 16 x 64 bytes (i32 sums), tmm1 16 x 32
    /// (activations), tmm2 8 x 64 (weights, VNNI layout).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn config() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: u8, colsb: u16| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows;
        };
        set(0, 16, 64);
        set(1, 16, 32);
        set(2, 8, 64);
        TileConfig(c)
    }

    /// One row tile's weights, ready for the tiles: per block, the 8 x 64-byte VNNI tile and the
    /// sixteen rows' scales and offsets as floats (zero for rows past the matrix).
    struct WeightTile {
        tiles: Vec<u8>,
        d: Vec<f32>,
        off: Vec<f32>,
    }

    /// Unpacks rows `r0..r0 + n` (n <= 16) of a packed matrix.
    ///
    /// # Safety
    /// AVX2 must be available; the rows must lie inside `w`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn weight_tile(
        kind: QKind,
        w: &[u8],
        rb: usize,
        nb: usize,
        r0: usize,
        n: usize,
        wt: &mut WeightTile,
    ) {
        wt.tiles.clear();
        wt.tiles.resize(nb * 512, 0);
        wt.d.clear();
        wt.d.resize(nb * ROWS, 0.0);
        wt.off.clear();
        wt.off.resize(nb * ROWS, 0.0);
        let f16 = |p: &[u8]| half::f16::from_le_bytes([p[0], p[1]]).to_f32();
        // SAFETY: rows i < n are inside `w` (the caller's promise, and slicing checks it); tile
        // writes stay inside block b's 512 bytes (row k < 8, columns 4i..4i + 4 < 64).
        unsafe {
            for i in 0..n {
                let row = &w[(r0 + i) * rb..(r0 + i + 1) * rb];
                for b in 0..nb {
                    let d = f16(&row[2 * b..]);
                    let (off, q) = match kind {
                        QKind::Q4_1 => (
                            f16(&row[2 * (nb + b)..]),
                            &row[4 * nb + 16 * b..4 * nb + 16 * b + 16],
                        ),
                        QKind::Q4_0 => (-8.0 * d, &row[2 * nb + 16 * b..2 * nb + 16 * b + 16]),
                        _ => (0.0, &row[2 * nb + 32 * b..2 * nb + 32 * b + 32]),
                    };
                    wt.d[b * ROWS + i] = d;
                    wt.off[b * ROWS + i] = off;
                    let tile = wt.tiles.as_mut_ptr().add(b * 512 + 4 * i);
                    // Bytes 4k..4k + 4 of this row's block go to tile row k, column 4 * i.
                    let mut bytes = [0u8; 32];
                    if kind == QKind::Q8_0 {
                        bytes.copy_from_slice(q);
                    } else {
                        let v = _mm_loadu_si128(q.as_ptr() as *const __m128i);
                        let lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
                        _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, lo);
                        _mm_storeu_si128(bytes.as_mut_ptr().add(16) as *mut __m128i, hi);
                    }
                    for k in 0..8 {
                        std::ptr::copy_nonoverlapping(
                            bytes.as_ptr().add(4 * k),
                            tile.add(64 * k),
                            4,
                        );
                    }
                }
            }
        }
    }

    thread_local! {
        static SCRATCH: std::cell::RefCell<WeightTile> = const {
            std::cell::RefCell::new(WeightTile { tiles: Vec::new(), d: Vec::new(), off: Vec::new() })
        };
    }

    /// Products of packed rows `r0..r1` of `w` with tokens `t0..t0 + 16 * tiles` of `xq`,
    /// written to `out[t * rows + r]`.
    ///
    /// # Safety
    /// `amx_available()` must be true; `w` must be packed; this thread must own those output
    /// cells.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn rows(
        kind: QKind,
        w: &[u8],
        rows: usize,
        cols: usize,
        xq: &Q8Acts,
        t0: usize,
        tiles: usize,
        r0: usize,
        r1: usize,
        out: *mut f32,
    ) {
        let nb = cols / QK;
        let rb = kind.row_bytes(cols);
        assert!(
            r1 <= rows && r1 * rb <= w.len(),
            "row range outside the matrix"
        );
        assert!(
            (t0 + tiles * TOKENS) * cols <= xq.qs_all().len(),
            "token tiles outside the activations"
        );
        let cfg = config();
        let (qs, xd, xs) = (xq.qs_all(), xq.d_all(), xq.s_all());
        let c = if kind == QKind::Q8_0 { 0.0 } else { 1.0 };
        SCRATCH.with_borrow_mut(|wt| {
            // SAFETY: AMX permission was granted (`has_amx`); every tile load reads 16 rows of 32
            // bytes at stride `cols` from token rows < t0 + 16 * tiles (checked by the caller) or
            // the 512-byte weight tile; stores go to `sums` (1 KB) and to output cells this thread
            // owns (rows r0..r1, masked past r1).
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
                let mut sums = [0i32; TOKENS * ROWS];
                let mut r = r0;
                while r < r1 {
                    let n = (r1 - r).min(ROWS);
                    weight_tile(kind, w, rb, nb, r, n, wt);
                    let mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
                    for tile in 0..tiles {
                        let tt = t0 + tile * TOKENS;
                        let mut acc = [_mm512_setzero_ps(); TOKENS];
                        for b in 0..nb {
                            let a = qs.as_ptr().add(tt * cols + b * 32);
                            let wp = wt.tiles.as_ptr().add(b * 512);
                            asm!("tilezero tmm0", options(nomem, nostack));
                            asm!("tileloadd tmm1, [{a} + {sa}*1]", a = in(reg) a, sa = in(reg) cols,
                                options(nostack, readonly));
                            asm!("tileloadd tmm2, [{b} + {sb}*1]", b = in(reg) wp, sb = in(reg) 64usize,
                                options(nostack, readonly));
                            if kind == QKind::Q8_0 {
                                asm!("tdpbssd tmm0, tmm1, tmm2", options(nomem, nostack));
                            } else {
                                asm!("tdpbsud tmm0, tmm1, tmm2", options(nomem, nostack));
                            }
                            asm!("tilestored [{s} + {ss}*1], tmm0", s = in(reg) sums.as_mut_ptr(),
                                ss = in(reg) 64usize, options(nostack));
                            let dw = _mm512_loadu_ps(wt.d.as_ptr().add(b * ROWS));
                            let ow = _mm512_loadu_ps(wt.off.as_ptr().add(b * ROWS));
                            for (t, a) in acc.iter_mut().enumerate() {
                                let xi = (tt + t) * nb + b;
                                let p = _mm512_cvtepi32_ps(_mm512_loadu_si512(
                                    sums.as_ptr().add(t * ROWS) as *const __m512i,
                                ));
                                let sc = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.get_unchecked(xi)));
                                *a = _mm512_fmadd_ps(p, sc, *a);
                                *a = _mm512_fmadd_ps(ow, _mm512_set1_ps(c * *xs.get_unchecked(xi)), *a);
                            }
                        }
                        for (t, a) in acc.iter().enumerate() {
                            _mm512_mask_storeu_ps(out.add((tt + t) * rows + r), mask, *a);
                        }
                    }
                    r += n;
                }
                asm!("tilerelease", options(nomem, nostack));
            }
        });
    }
}
