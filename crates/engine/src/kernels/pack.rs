//! The packed layouts the SIMD kernels read: rows in groups (16 for AVX-512 and AMX, 8 for
//! AVX2: one zmm or ymm lane per row), and per group and block of 32 columns one *chunk*:
//!
//! - the group's f16 scales `d` (2 bytes a row), and for Q4_1 and Q5_1 their f16 minimums `m`;
//! - the quants as eight "k-rows" of 4 bytes per row: k-row `k` holds bytes `4k..4k + 4` of each
//!   row's block (row `i` at bytes `4i..4i + 4`). For AVX-512 that is the VNNI layout (AMX's
//!   `tdpbsud` B operand as it stands; `vpdpbusd` of a k-row with a broadcast of the activations'
//!   bytes `4k..4k + 4` adds one 4-term dot product to every row's lane); AVX2's `vpmaddubsw` +
//!   `vpmaddwd` do the same in two steps.
//!   Q4 stores two k-rows per part (k-row `2c` in the low nibbles of part `c`, `2c + 1` in the
//!   high ones). Q5 stores its low four bits as Q4 does, then (4 bytes a row) its fifth bits in
//!   the shape each packing's kernels add them back fastest (`high_bit_at`): the kernels
//!   multiply the unsigned 5-bit values, 0..31. Q8_0 stores each weight plus 128 as an unsigned byte for VNNI (whose `u8 x i8`
//!   products cannot saturate), and as the signed byte it is for AVX2 (whose `vpmaddubsw` pair
//!   sums could: the sign moves onto the activation instead).
//!
//! Chunks are stored group by group, block by block. Every kernel of one packing finishes every
//! block the same way for every token (lanes = rows): `acc = fma(cvt(sum), d_w * d_x, acc)` and
//! for Q4 and Q5 `acc = fma(off_w, s_x, acc)` (`off_w` the minimum, or `-8 d` / `-16 d` for
//! Q4_0 / Q5_0's values stored plus 8 / 16), so a token's result does not depend on the path or the
//! batch it ran in. Rows past the matrix's end (to fill the last group) are zero.

use super::q8::Q8Acts;
use super::{QKind, QK};

/// Rows per group of the AVX-512 / AMX packing.
pub const GROUP: usize = 16;
/// Rows per group of the AVX2 packing.
pub const AVX2_GROUP: usize = 8;

/// Which kernel family a packed matrix is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// 16-row groups, Q8_0 biased to unsigned: the AVX-512 VNNI and AMX kernels.
    Vnni,
    /// 8-row groups, Q8_0 signed: the AVX2 kernels.
    Avx2,
}

impl Packing {
    /// Rows per group.
    pub fn group(self) -> usize {
        match self {
            Self::Vnni => GROUP,
            Self::Avx2 => AVX2_GROUP,
        }
    }

    /// Whether this packing's kernels can run on this CPU.
    pub fn runs_here(self) -> bool {
        match self {
            Self::Vnni => super::has_vnni(),
            Self::Avx2 => super::has_avx2(),
        }
    }

    /// Bytes of one k-row (4 per row of the group).
    fn k_row(self) -> usize {
        4 * self.group()
    }

    /// Bytes of one chunk's eight k-rows unpacked to a byte per weight (`GroupJob::unpacked`).
    pub fn unpacked_chunk(self) -> usize {
        8 * self.k_row()
    }

    /// What Q8_0 weights are stored as: XORed with this byte.
    fn q8_flip(self) -> u8 {
        match self {
            Self::Vnni => 0x80,
            Self::Avx2 => 0,
        }
    }
}

/// A product of packed row groups `g0..g1` with tokens `t0..t0 + R`.
#[derive(Clone, Copy)]
pub struct GroupJob<'a> {
    /// Weight format.
    pub kind: QKind,
    /// The layout of `w`.
    pub packing: Packing,
    /// The packed matrix.
    pub w: &'a [u8],
    /// Its rows (the output stride between tokens).
    pub rows: usize,
    /// Its columns.
    pub cols: usize,
    /// The quantized activations.
    pub xq: &'a Q8Acts,
    /// First token.
    pub t0: usize,
    /// Row groups.
    pub g0: usize,
    /// End of the row groups.
    pub g1: usize,
    /// `out[t * rows + r]`.
    pub out: *mut f32,
    /// Prefetch the chunks ahead (on the first pass over these rows).
    pub prefetch: bool,
    /// The k-rows of groups `g0..g1` of a Q5 matrix already unpacked to one unsigned byte per
    /// weight (`unpacked_chunk` bytes per chunk, group by group, block by block), for the
    /// kernels to read instead of unpacking every chunk again for every few tokens: a batch of
    /// many tokens unpacks them once. Scales still come from `w`.
    pub unpacked: Option<&'a [u8]>,
}

impl GroupJob<'_> {
    /// Bounds every kernel relies on, checked once per call.
    pub(crate) fn check(&self, tokens: usize) {
        let nb = self.cols / QK;
        let group = self.packing.group();
        assert!(
            self.g1 * nb * chunk_bytes(self.kind, self.packing) <= self.w.len(),
            "row groups outside the matrix"
        );
        assert!(
            self.g0 == self.g1 || (self.g1 - 1) * group < self.rows,
            "row groups past the rows"
        );
        if let Some(u) = self.unpacked {
            assert!(
                matches!(self.kind, QKind::Q5_0 | QKind::Q5_1)
                    && (self.g1 - self.g0) * nb * self.packing.unpacked_chunk() <= u.len(),
                "unpacked k-rows are Q5 and cover the row groups"
            );
        }
        let end = self.t0 + tokens;
        assert!(
            end * self.cols <= self.xq.qs_all().len(),
            "tokens outside the activations"
        );
        for v in [
            self.xq.d_all().len(),
            self.xq.s_all().len(),
            self.xq.qsum_all().len(),
        ] {
            assert!(end * nb <= v, "tokens outside the activations");
        }
    }
}

/// How far ahead of the chunk being multiplied the next ones are fetched on a first pass over a
/// matrix's rows: the hardware prefetcher alone leaves these short, barrier-separated streams at
/// about half the cache's bandwidth (measured on the default model's layer matrices at one token,
/// 2 threads, AVX-512).
pub(crate) const PREFETCH_BYTES: usize = 6144;

/// Prefetches the cache lines of `w[at + PREFETCH_BYTES ..][..len]` into L2: called with each
/// chunk's offset and length, it keeps the next chunks in flight. Past the end of `w` it goes
/// on into whatever follows: a model's matrices share one buffer in the order a step reads them
/// (`WeightBytes::Shared`), so the last chunks of one product bring in the first of the next
/// instead of leaving that stream to start cold after the join (AVX2 tier, AMD EPYC, the layer
/// products at one token alternated in one process: 1.5–4% faster; AVX-512 level).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn prefetch_ahead(w: &[u8], at: usize, len: usize) {
    let start = at + PREFETCH_BYTES;
    prefetch_lines(w, start, start + len)
}

/// Prefetches the cache lines of `w[at..][..len]` (those inside `w`) into L2.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn prefetch_range(w: &[u8], at: usize, len: usize) {
    prefetch_lines(w, at, (at + len).min(w.len()))
}

/// Prefetches the cache lines from `from` to `to` bytes past the start of `w` (inside it or
/// not) into L2, not L1: the lines in flight to L1 are few (a core's fill buffers), and with
/// both cores streaming, a distance's worth of L1 prefetches left each core at about two thirds
/// of the bandwidth that L2 prefetches reach (measured on an AVX2-only tier, AMD EPYC; the
/// in-kernel prefetch runs a few KiB ahead, so the lines are in L2, not far, when the kernel
/// loads them).
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_lines(w: &[u8], from: usize, to: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let mut p = from;
    while p < to {
        // SAFETY: a prefetch is a hint: it never faults, at any address, and changes no data
        // the program sees; the pointer is formed by wrapping arithmetic and never dereferenced.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(p) as *const i8) };
        p += 64;
    }
}

/// No prefetch off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn prefetch_range(_: &[u8], _: usize, _: usize) {}

/// A packable format's block in the file layout: `scales` bytes of f16 fields (`d`, and `m` for
/// Q4_1 and Q5_1), then `high` bytes of fifth bits (Q5), then `quants` bytes of nibbles or
/// bytes. `None` for kinds that are not packed.
#[derive(Clone, Copy)]
struct Parts {
    scales: usize,
    high: usize,
    quants: usize,
}

impl Parts {
    fn of(kind: QKind) -> Option<Self> {
        let (scales, high, quants) = match kind {
            QKind::Q4_0 => (2, 0, 16),
            QKind::Q4_1 => (4, 0, 16),
            QKind::Q8_0 => (2, 0, 32),
            QKind::Q5_0 => (2, 4, 16),
            QKind::Q5_1 => (4, 4, 16),
            _ => return None,
        };
        Some(Self {
            scales,
            high,
            quants,
        })
    }

    fn block(self) -> usize {
        self.scales + self.high + self.quants
    }
}

fn parts(kind: QKind) -> Parts {
    Parts::of(kind).expect("packable kind")
}

/// The packed kinds as the const parameter (`F`) of the kernels generic over the format, so
/// each format's kernel is compiled without branches on the kind: indices into `PACKED_KINDS`.
pub(crate) mod format {
    /// Q4_0.
    pub const Q4_0: u8 = 0;
    /// Q4_1.
    pub const Q4_1: u8 = 1;
    /// Q8_0.
    pub const Q8_0: u8 = 2;
    /// Q5_0.
    pub const Q5_0: u8 = 3;
    /// Q5_1.
    pub const Q5_1: u8 = 4;
}

/// Every kind with a packed layout, at its `format` index.
pub(crate) const PACKED_KINDS: [QKind; 5] = [
    QKind::Q4_0,
    QKind::Q4_1,
    QKind::Q8_0,
    QKind::Q5_0,
    QKind::Q5_1,
];

/// `kind`'s `format` index.
pub(crate) fn format_index(kind: QKind) -> u8 {
    match kind {
        QKind::Q4_0 => format::Q4_0,
        QKind::Q4_1 => format::Q4_1,
        QKind::Q8_0 => format::Q8_0,
        QKind::Q5_0 => format::Q5_0,
        QKind::Q5_1 => format::Q5_1,
        other => panic!("{other:?} has no packed layout"),
    }
}

/// Whether `kind` has a packed layout.
pub fn packable(kind: QKind) -> bool {
    Parts::of(kind).is_some()
}

/// Bytes of one chunk (one group of rows x one block).
pub fn chunk_bytes(kind: QKind, packing: Packing) -> usize {
    packing.group() * parts(kind).block()
}

/// Where a chunk's fifth bits (Q5) start: after the scales and the nibbles.
pub fn high_bits_at(kind: QKind, packing: Packing) -> usize {
    let p = parts(kind);
    packing.group() * (p.scales + p.quants)
}

/// Bytes of a packed `rows` x `cols` matrix (the last group padded with zero rows).
pub fn packed_len(kind: QKind, packing: Packing, rows: usize, cols: usize) -> usize {
    rows.div_ceil(packing.group()) * (cols / QK) * chunk_bytes(kind, packing)
}

/// Where weight `j` (0..32) of row `i` of a chunk lives inside its quant bytes, and whether it
/// is the high nibble (Q4 only).
fn quant_at(kind: QKind, packing: Packing, i: usize, j: usize) -> (usize, bool) {
    let (k, byte, kr) = (j / 4, 4 * i + j % 4, packing.k_row());
    if kind == QKind::Q8_0 {
        (kr * k + byte, false)
    } else {
        (kr * (k / 2) + byte, k % 2 == 1)
    }
}

/// Where the fifth bit of weight `4k + t` of a chunk's row `i` (byte `4i + t` of k-row `k`)
/// lives in the chunk's Q5 section: byte and bit.
///
/// - VNNI: one 64-bit mask per k-row (bit `4i + t` for that byte), which AVX-512 loads into a
///   mask register and adds 16 under.
/// - AVX2: one bit plane per k-row, in a k-row-shaped section (byte `4i + t`, bit `k`), which
///   a 16-bit shift and a mask turn into 16 or 0 per byte.
fn high_bit_at(packing: Packing, i: usize, k: usize, t: usize) -> (usize, usize) {
    match packing {
        Packing::Vnni => (8 * k + (4 * i + t) / 8, (4 * i + t) % 8),
        Packing::Avx2 => (4 * i + t, k),
    }
}

/// `len` zero bytes, backed by transparent huge pages where the kernel offers them on request
/// (`madvise` mode): a model's packed matrices are ~100 MB, and faulting them in 4 KiB at a time
/// was a third of the load time; reading them 4 KiB page by page, every token, costs a TLB miss
/// per page.
pub(crate) fn zeroed_huge(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE);
        let end = (start + len) / HUGE * HUGE;
        if end > aligned {
            // SAFETY: advice on whole pages inside this vector's own allocation; it changes how
            // the pages are backed, never their contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    v.resize(len, 0);
    v
}

/// Packs a file-layout matrix.
pub fn pack(kind: QKind, packing: Packing, rows: usize, cols: usize, src: &[u8]) -> Vec<u8> {
    let mut dst = zeroed_huge(packed_len(kind, packing, rows, cols));
    pack_into(kind, packing, rows, cols, src, &mut dst);
    dst
}

/// Packs a file-layout matrix into `dst`: `packed_len` bytes, zero (the last group's padding
/// rows are not written).
pub fn pack_into(
    kind: QKind,
    packing: Packing,
    rows: usize,
    cols: usize,
    src: &[u8],
    dst: &mut [u8],
) {
    let p = parts(kind);
    let (nb, rb, cb) = (cols / QK, kind.row_bytes(cols), chunk_bytes(kind, packing));
    let (group, kr, flip) = (packing.group(), packing.k_row(), packing.q8_flip());
    let high_at = high_bits_at(kind, packing);
    assert_eq!(
        dst.len(),
        packed_len(kind, packing, rows, cols),
        "packed size"
    );
    for r in 0..rows {
        let (g, i) = (r / group, r % group);
        for b in 0..nb {
            let blk = &src[r * rb + b * p.block()..r * rb + (b + 1) * p.block()];
            let chunk = &mut dst[(g * nb + b) * cb..(g * nb + b + 1) * cb];
            // Scale fields: field f (2 bytes) of row i goes to [2 group f + 2 i].
            for f in 0..p.scales / 2 {
                let at = 2 * group * f + 2 * i;
                chunk[at..at + 2].copy_from_slice(&blk[2 * f..2 * f + 2]);
            }
            let qs = &blk[p.scales + p.high..];
            if p.high > 0 {
                let h = &blk[p.scales..p.scales + 4];
                let qh = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                for k in 0..8 {
                    for t in 0..4 {
                        let (byte, bit) = high_bit_at(packing, i, k, t);
                        chunk[high_at + byte] |= (((qh >> (4 * k + t)) & 1) as u8) << bit;
                    }
                }
            }
            let quants = &mut chunk[group * p.scales..];
            // The layout `quant_at` defines, written 4 bytes (one k-row slot) at a time.
            if kind == QKind::Q8_0 {
                for k in 0..8 {
                    for t in 0..4 {
                        quants[kr * k + 4 * i + t] = qs[4 * k + t] ^ flip;
                    }
                }
            } else {
                // Byte (m, t) holds weight 8m + t in its low nibble and 8m + 4 + t in its high.
                let w = |j: usize| {
                    if j < 16 {
                        qs[j] & 0x0F
                    } else {
                        qs[j - 16] >> 4
                    }
                };
                for m in 0..4 {
                    for t in 0..4 {
                        quants[kr * m + 4 * i + t] = w(8 * m + t) | (w(8 * m + 4 + t) << 4);
                    }
                }
            }
        }
    }
}

/// Row `r` of a packed matrix, back in the file layout.
pub fn unpack_row(
    kind: QKind,
    packing: Packing,
    cols: usize,
    packed: &[u8],
    r: usize,
    dst: &mut [u8],
) {
    let p = parts(kind);
    let (nb, cb) = (cols / QK, chunk_bytes(kind, packing));
    let group = packing.group();
    let high_at = high_bits_at(kind, packing);
    let (g, i) = (r / group, r % group);
    for b in 0..nb {
        let chunk = &packed[(g * nb + b) * cb..(g * nb + b + 1) * cb];
        let blk = &mut dst[b * p.block()..(b + 1) * p.block()];
        for f in 0..p.scales / 2 {
            let at = 2 * group * f + 2 * i;
            blk[2 * f..2 * f + 2].copy_from_slice(&chunk[at..at + 2]);
        }
        if p.high > 0 {
            let mut qh = 0u32;
            for j in 0..QK {
                let (byte, bit) = high_bit_at(packing, i, j / 4, j % 4);
                qh |= (((chunk[high_at + byte] >> bit) & 1) as u32) << j;
            }
            blk[p.scales..p.scales + 4].copy_from_slice(&qh.to_le_bytes());
        }
        let quants = &chunk[group * p.scales..];
        let out = &mut blk[p.scales + p.high..];
        out.fill(0);
        for j in 0..QK {
            let (at, high) = quant_at(kind, packing, i, j);
            match kind {
                QKind::Q8_0 => out[j] = quants[at] ^ packing.q8_flip(),
                _ => {
                    let v = if high {
                        quants[at] >> 4
                    } else {
                        quants[at] & 0x0F
                    };
                    if j < 16 {
                        out[j] |= v;
                    } else {
                        out[j - 16] |= v << 4;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_indices_name_their_kinds() {
        for (i, kind) in PACKED_KINDS.into_iter().enumerate() {
            assert_eq!(format_index(kind) as usize, i, "{kind:?}");
            assert!(packable(kind));
        }
    }

    #[test]
    fn pack_then_unpack_is_identity() {
        for packing in [Packing::Vnni, Packing::Avx2] {
            let group = packing.group();
            for kind in PACKED_KINDS {
                for rows in [3, 8, 16, 21] {
                    let cols = 96;
                    let rb = kind.row_bytes(cols);
                    let src: Vec<u8> = (0..rows * rb).map(|i| (i * 31 % 251) as u8).collect();
                    let packed = pack(kind, packing, rows, cols, &src);
                    assert_eq!(packed.len(), rows.div_ceil(group) * group * rb);
                    let mut back = vec![0; rb];
                    for r in 0..rows {
                        unpack_row(kind, packing, cols, &packed, r, &mut back);
                        assert_eq!(
                            back,
                            src[r * rb..(r + 1) * rb],
                            "{packing:?} {kind:?} row {r} of {rows}"
                        );
                    }
                }
            }
        }
    }
}
