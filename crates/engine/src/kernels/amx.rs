//! Intel AMX int8 tiles for batched products (prefill chunks, many decoding sequences): one
//! `tdpbsud` multiplies a 16-token x 32-byte activation tile by a 32 x 16-row weight tile into
//! 16 x 16 int32 sums — 8,192 multiply-adds in one instruction, against 1,024 for an AVX-512
//! VNNI one.
//!
//! Tiles: tmm0 = sums (16 tokens x 16 rows of i32), tmm1 = activations (16 tokens x 32 signed
//! bytes, read straight from `Q8Acts`' rows), tmm2 = weights: a packed chunk's eight k-rows (see
//! `pack.rs`), read in place for Q8_0 and unpacked from nibbles (and Q5's fifth bits) for Q4
//! and Q5. Each token's 16 row sums then go through the AVX-512 kernels' own `finish_block`, so
//! results are bit-identical to that path's.
//!
//! Whole tiles of 16 tokens go through here; the rest of a batch takes the VNNI path. Linux makes
//! a process ask for the tile state once (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); each thread loads
//! the tile configuration before use and releases it after.

#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use std::sync::OnceLock;

/// Tokens per tile.
pub const TOKENS: usize = 16;

/// Whether the AMX path is in use: the hardware and OS allow it (`amx_available`), the AVX-512
/// VNNI kernels it works beside are in use, the kernels are not capped below it
/// ([`super::cap_tier`]) and `LASTMILE_NO_AMX` is not set.
pub fn has_amx() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        super::has_vnni()
            && super::cap() >= super::Tier::Amx
            && std::env::var_os("LASTMILE_NO_AMX").is_none()
            && amx_available()
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
pub use x86::groups;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::super::avx512::x86::{chunk_scales, finish_block, k_rows, row_mask};
    use super::super::avx512::GroupJob;
    use super::super::pack::{chunk_bytes, Packing, GROUP};
    use super::super::{QKind, QK};
    use super::TOKENS;

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

    /// Whole 16-token tiles `job.t0 .. job.t0 + 16 * tiles` of the packed row groups
    /// `job.g0..job.g1`.
    ///
    /// # Safety
    /// `amx_available()` must be true; `job.w` must be packed; this thread must own those output
    /// cells.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn groups(job: &GroupJob<'_>, tiles: usize) {
        assert_eq!(job.packing, Packing::Vnni, "not a VNNI-packed matrix");
        job.check(tiles * TOKENS);
        let (kind, cols) = (job.kind, job.cols);
        let nb = cols / QK;
        let cb = chunk_bytes(kind, Packing::Vnni);
        let cfg = config();
        let qs = job.xq.qs_all();
        // SAFETY: AMX permission was granted (`amx_available`); `check` bounded every chunk and
        // every token row (tile loads read 16 rows of 32 bytes at stride `cols` from token rows
        // below t0 + 16 * tiles, or the 512-byte k-row tile); stores go to `sums` (1 KB), `kbuf`
        // (512 bytes) and to output cells this thread owns, masked to real rows.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            let mut sums = [0i32; TOKENS * GROUP];
            let mut kbuf = [0u8; 512];
            for g in job.g0..job.g1 {
                let mask = row_mask(job.rows, g);
                for tile in 0..tiles {
                    let tt = job.t0 + tile * TOKENS;
                    let mut acc = [_mm512_setzero_ps(); TOKENS];
                    for b in 0..nb {
                        let chunk = job.w.as_ptr().add((g * nb + b) * cb);
                        let scales = chunk_scales(kind, chunk);
                        let kp = if kind == QKind::Q8_0 {
                            chunk.add(32)
                        } else {
                            for (k, v) in k_rows(kind, chunk).iter().enumerate() {
                                _mm512_storeu_si512(
                                    kbuf.as_mut_ptr().add(64 * k) as *mut __m512i,
                                    *v,
                                );
                            }
                            kbuf.as_ptr()
                        };
                        let a = qs.as_ptr().add(tt * cols + b * QK);
                        asm!("tilezero tmm0", options(nomem, nostack));
                        asm!("tileloadd tmm1, [{a} + {sa}*1]", a = in(reg) a, sa = in(reg) cols,
                            options(nostack, readonly));
                        asm!("tileloadd tmm2, [{b} + {sb}*1]", b = in(reg) kp, sb = in(reg) 64usize,
                            options(nostack, readonly));
                        asm!("tdpbsud tmm0, tmm1, tmm2", options(nomem, nostack));
                        asm!("tilestored [{s} + {ss}*1], tmm0", s = in(reg) sums.as_mut_ptr(),
                            ss = in(reg) 64usize, options(nostack));
                        for (t, acc_t) in acc.iter_mut().enumerate() {
                            let isum =
                                _mm512_loadu_si512(sums.as_ptr().add(t * GROUP) as *const __m512i);
                            *acc_t =
                                finish_block(kind, *acc_t, isum, scales, job.xq, (tt + t) * nb + b);
                        }
                    }
                    for (t, a) in acc.iter().enumerate() {
                        let o = job.out.add((tt + t) * job.rows + g * GROUP);
                        _mm512_mask_storeu_ps(o, mask, *a);
                    }
                }
            }
            asm!("tilerelease", options(nomem, nostack));
        }
    }
}
