//! The packed layout the AVX-512 and AMX kernels read: rows in groups of 16, and per group and
//! block of 32 columns one *chunk*:
//!
//! - the 16 rows' f16 scales `d` (32 bytes), and for Q4_1 their f16 minimums `m` (32 bytes);
//! - the quants in the VNNI layout, as eight 64-byte "k-rows": k-row `k` holds bytes `4k..4k + 4`
//!   of each of the 16 rows' block (row `i` at bytes `4i..4i + 4`). That is the B operand of
//!   AMX's `tdpbsud` as it stands, and for `vpdpbusd` a k-row times a broadcast of the
//!   activations' bytes `4k..4k + 4` adds one 4-term dot product to every row's lane.
//!   Q4 stores two k-rows per 64 bytes (k-row `2c` in the low nibbles of chunk part `c`, `2c + 1`
//!   in the high ones); Q8_0 stores each weight plus 128 as an unsigned byte.
//!
//! Chunks are stored group by group, block by block. Both kernel families then finish every block
//! the same way for every token (lanes = rows): `acc = fma(cvt(sum), d_w * d_x, acc)` and for
//! Q4 `acc = fma(off_w, s_x, acc)`, so a token's result does not depend on the path or the batch
//! it ran in. Rows past the matrix's end (to fill the last group) are zero.

use super::{QKind, QK};

/// Rows per group.
pub const GROUP: usize = 16;

/// Bytes of scale data per block in the file layout (`d`, and `m` for Q4_1), and quant bytes
/// per block there. `None` for kinds that are not packed.
fn parts(kind: QKind) -> Option<(usize, usize)> {
    match kind {
        QKind::Q4_0 => Some((2, 16)),
        QKind::Q4_1 => Some((4, 16)),
        QKind::Q8_0 => Some((2, 32)),
        _ => None,
    }
}

/// Whether `kind` has a packed layout.
pub fn packable(kind: QKind) -> bool {
    parts(kind).is_some()
}

/// Bytes of one chunk (16 rows x one block).
pub fn chunk_bytes(kind: QKind) -> usize {
    let (head, q) = parts(kind).expect("packable kind");
    GROUP * (head + q)
}

/// Bytes of a packed `rows` x `cols` matrix (the last group padded to 16 rows).
pub fn packed_len(kind: QKind, rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP) * (cols / QK) * chunk_bytes(kind)
}

/// Where weight `j` (0..32) of row `i` (0..16) of a chunk lives inside its quant bytes, and
/// whether it is the high nibble (Q4 only).
fn quant_at(kind: QKind, i: usize, j: usize) -> (usize, bool) {
    let (k, byte) = (j / 4, 4 * i + j % 4);
    if kind == QKind::Q8_0 {
        (64 * k + byte, false)
    } else {
        (64 * (k / 2) + byte, k % 2 == 1)
    }
}

/// `len` zero bytes, backed by transparent huge pages where the kernel offers them on request
/// (`madvise` mode): a model's packed matrices are ~100 MB, and faulting them in 4 KiB at a time
/// was a third of the load time.
fn zeroed_huge(len: usize) -> Vec<u8> {
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
pub fn pack(kind: QKind, rows: usize, cols: usize, src: &[u8]) -> Vec<u8> {
    let (head, q) = parts(kind).expect("packable kind");
    let (nb, rb, cb) = (cols / QK, kind.row_bytes(cols), chunk_bytes(kind));
    let mut dst = zeroed_huge(packed_len(kind, rows, cols));
    for r in 0..rows {
        let (g, i) = (r / GROUP, r % GROUP);
        for b in 0..nb {
            let blk = &src[r * rb + b * (head + q)..r * rb + (b + 1) * (head + q)];
            let chunk = &mut dst[(g * nb + b) * cb..(g * nb + b + 1) * cb];
            // Scale fields: field f (2 bytes) of row i goes to [32 f + 2 i].
            for f in 0..head / 2 {
                chunk[32 * f + 2 * i..32 * f + 2 * i + 2].copy_from_slice(&blk[2 * f..2 * f + 2]);
            }
            let quants = &mut chunk[16 * head..];
            let qs = &blk[head..];
            // The layout `quant_at` defines, written 4 bytes (one k-row slot) at a time.
            if kind == QKind::Q8_0 {
                for k in 0..8 {
                    for t in 0..4 {
                        quants[64 * k + 4 * i + t] = qs[4 * k + t] ^ 0x80;
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
                        quants[64 * m + 4 * i + t] = w(8 * m + t) | (w(8 * m + 4 + t) << 4);
                    }
                }
            }
        }
    }
    dst
}

/// Row `r` of a packed matrix, back in the file layout.
pub fn unpack_row(kind: QKind, cols: usize, packed: &[u8], r: usize, dst: &mut [u8]) {
    let (head, q) = parts(kind).expect("packable kind");
    let (nb, cb) = (cols / QK, chunk_bytes(kind));
    let (g, i) = (r / GROUP, r % GROUP);
    for b in 0..nb {
        let chunk = &packed[(g * nb + b) * cb..(g * nb + b + 1) * cb];
        let blk = &mut dst[b * (head + q)..(b + 1) * (head + q)];
        for f in 0..head / 2 {
            blk[2 * f..2 * f + 2].copy_from_slice(&chunk[32 * f + 2 * i..32 * f + 2 * i + 2]);
        }
        let quants = &chunk[16 * head..];
        let out = &mut blk[head..];
        out.fill(0);
        for j in 0..QK {
            let (at, high) = quant_at(kind, i, j);
            match kind {
                QKind::Q8_0 => out[j] = quants[at] ^ 0x80,
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
    fn pack_then_unpack_is_identity() {
        for kind in [QKind::Q4_0, QKind::Q4_1, QKind::Q8_0] {
            for rows in [3, 16, 21] {
                let cols = 96;
                let rb = kind.row_bytes(cols);
                let src: Vec<u8> = (0..rows * rb).map(|i| (i * 31 % 251) as u8).collect();
                let packed = pack(kind, rows, cols, &src);
                assert_eq!(packed.len(), rows.div_ceil(GROUP) * GROUP * rb);
                let mut back = vec![0; rb];
                for r in 0..rows {
                    unpack_row(kind, cols, &packed, r, &mut back);
                    assert_eq!(
                        back,
                        src[r * rb..(r + 1) * rb],
                        "{kind:?} row {r} of {rows}"
                    );
                }
            }
        }
    }
}
