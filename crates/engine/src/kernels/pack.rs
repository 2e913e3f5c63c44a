//! The packed row layout the AVX-512 kernels read: per row, the blocks' f16 scales first (and
//! Q4_1's f16 minimums), then every block's quant bytes back to back. Same size as the file layout
//! (ggml interleaves scale and quants block by block), so a packed matrix is a permutation of the
//! file's bytes within each row.

use super::{QKind, QK};

/// Bytes of scale data per block that move to the front (`d`, and `m` for Q4_1), and quant bytes
/// per block. `None` for kinds that are not packed.
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

/// Rewrites `src` (rows of `kind`, file layout, `cols` wide) into `dst` in the packed layout.
pub fn pack_rows(kind: QKind, cols: usize, src: &[u8], dst: &mut [u8]) {
    let (head, q) = parts(kind).expect("packable kind");
    let nb = cols / QK;
    let rb = kind.row_bytes(cols);
    for (s, d) in src.chunks_exact(rb).zip(dst.chunks_exact_mut(rb)) {
        for b in 0..nb {
            let blk = &s[b * (head + q)..(b + 1) * (head + q)];
            // Scale fields: field f (2 bytes each) of block b goes to [f * nb + b].
            for f in 0..head / 2 {
                let at = 2 * (f * nb + b);
                d[at..at + 2].copy_from_slice(&blk[2 * f..2 * f + 2]);
            }
            let at = head * nb + b * q;
            d[at..at + q].copy_from_slice(&blk[head..]);
        }
    }
}

/// Rewrites one packed row back into the file layout.
pub fn unpack_row(kind: QKind, cols: usize, src: &[u8], dst: &mut [u8]) {
    let (head, q) = parts(kind).expect("packable kind");
    let nb = cols / QK;
    for b in 0..nb {
        let blk = &mut dst[b * (head + q)..(b + 1) * (head + q)];
        for f in 0..head / 2 {
            let at = 2 * (f * nb + b);
            blk[2 * f..2 * f + 2].copy_from_slice(&src[at..at + 2]);
        }
        let at = head * nb + b * q;
        blk[head..].copy_from_slice(&src[at..at + q]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_is_identity() {
        for kind in [QKind::Q4_0, QKind::Q4_1, QKind::Q8_0] {
            let cols = 96;
            let rb = kind.row_bytes(cols);
            let src: Vec<u8> = (0..3 * rb).map(|i| (i * 31 % 251) as u8).collect();
            let mut packed = vec![0; src.len()];
            pack_rows(kind, cols, &src, &mut packed);
            assert_ne!(packed, src, "{kind:?}: packing must move bytes");
            let mut back = vec![0; rb];
            for r in 0..3 {
                unpack_row(kind, cols, &packed[r * rb..(r + 1) * rb], &mut back);
                assert_eq!(back, src[r * rb..(r + 1) * rb], "{kind:?} row {r}");
            }
        }
    }
}
