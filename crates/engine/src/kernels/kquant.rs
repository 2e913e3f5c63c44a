//! ggml's k-quants rewritten at load into formats the kernels run: Q4_K as Q4_1 and Q5_K as
//! Q5_1 (exactly, up to f16 rounding of their scales), Q6_K as Q8_0 (re-quantized).
//!
//! A Q4_K super-block holds 256 weights as eight sub-blocks of 32 that share one f16 scale `d`
//! and one f16 `dmin`, each with a 6-bit scale `sc` and 6-bit minimum `m`: weight = `d * sc * q -
//! dmin * m`. That is exactly a Q4_1 block per sub-block with scale `d * sc` and minimum
//! `-dmin * m`; the only change is rounding those two products to f16 (relative error <= 2^-11 on
//! a block's scale, far below the 4-bit quantization step). The nibbles are reordered from
//! Q4_K's order (low nibbles of 32 bytes = sub-block 2c, high nibbles = 2c + 1) to Q4_1's (byte
//! `j` holds weights `j` and `j + 16`). 144 bytes per 256 weights become 160.

/// Bytes of one Q4_K super-block.
pub const Q4K_BLOCK_BYTES: usize = 144;
/// Weights per Q4_K super-block.
pub const Q4K_WEIGHTS: usize = 256;

/// The 6-bit scale and minimum of sub-block `j` (0..8) from the 12 packed bytes.
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Appends sub-block `j` (0..8) of a Q4_K or Q5_K super-block as a Q4_1 or Q5_1 block: the
/// f16 scale `d * sc` and minimum `-dmin * m`, then `mid` (Q5_1's fifth bits; nothing for
/// Q4_1), then the nibbles in Q4_1's order (byte `l` holds weights `l` and `l + 16`). Sub-block
/// `j`'s nibble `l` (0..32) is in byte `l` of 32-byte chunk `j / 2` of `qs`, low half for even
/// `j`, high half for odd.
fn push_sub_block(
    out: &mut Vec<u8>,
    (d, dmin): (f32, f32),
    scales: &[u8],
    qs: &[u8],
    j: usize,
    mid: &[u8],
) {
    let (sc, m) = scale_min(scales, j);
    out.extend_from_slice(&half::f16::from_f32(d * sc as f32).to_le_bytes());
    out.extend_from_slice(&half::f16::from_f32(-dmin * m as f32).to_le_bytes());
    out.extend_from_slice(mid);
    let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
    let nib = |l: usize| {
        if j.is_multiple_of(2) {
            chunk[l] & 0x0F
        } else {
            chunk[l] >> 4
        }
    };
    out.extend((0..16).map(|l| nib(l) | (nib(l + 16) << 4)));
}

/// A super-block's f16 `d` and `dmin` (its first four bytes).
fn d_dmin(sb: &[u8]) -> (f32, f32) {
    let f16 = |i: usize| half::f16::from_le_bytes([sb[i], sb[i + 1]]).to_f32();
    (f16(0), f16(2))
}

/// Converts whole Q4_K data (a multiple of 144 bytes) to Q4_1 blocks (20 bytes per 32 weights).
pub fn q4k_to_q4_1(src: &[u8]) -> Vec<u8> {
    assert!(
        src.len().is_multiple_of(Q4K_BLOCK_BYTES),
        "partial Q4_K super-block"
    );
    let mut out = Vec::with_capacity(src.len() / Q4K_BLOCK_BYTES * 8 * 20);
    for sb in src.chunks_exact(Q4K_BLOCK_BYTES) {
        for j in 0..8 {
            push_sub_block(&mut out, d_dmin(sb), &sb[4..16], &sb[16..144], j, &[]);
        }
    }
    out
}

/// Bytes of one Q5_K super-block: `d`, `dmin`, the 12 bytes of 6-bit scales and minimums
/// (as Q4_K's), 32 bytes of fifth bits, 128 of low nibbles.
pub const Q5K_BLOCK_BYTES: usize = 176;

/// Converts whole Q5_K data (a multiple of 176 bytes) to Q5_1 blocks (24 bytes per 32 weights).
/// A Q5_K super-block is Q4_K's with a fifth bit per weight: sub-block `j`'s weight `l` has it
/// in bit `j` of fifth-bit byte `l`, and each sub-block is exactly a Q5_1 block with scale
/// `d * sc` and minimum `-dmin * m` (rounded to f16, as for Q4_K). 176 bytes per 256 weights
/// become 192.
pub fn q5k_to_q5_1(src: &[u8]) -> Vec<u8> {
    assert!(
        src.len().is_multiple_of(Q5K_BLOCK_BYTES),
        "partial Q5_K super-block"
    );
    let mut out = Vec::with_capacity(src.len() / Q5K_BLOCK_BYTES * 8 * 24);
    for sb in src.chunks_exact(Q5K_BLOCK_BYTES) {
        let high = &sb[16..48];
        for j in 0..8 {
            // Q5_1's fifth bits: bit l of a little-endian u32 for weight l.
            let bits = (0..32).fold(0u32, |acc, l| acc | (((high[l] >> j) & 1) as u32) << l);
            push_sub_block(
                &mut out,
                d_dmin(sb),
                &sb[4..16],
                &sb[48..176],
                j,
                &bits.to_le_bytes(),
            );
        }
    }
    out
}

/// Bytes of one Q6_K super-block: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed
/// 8-bit scales (one per 16 weights), the f16 scale `d`.
pub const Q6K_BLOCK_BYTES: usize = 210;

/// One Q6_K super-block's 256 weights as f32: weight = `d * scale * (q - 32)`, `q` the 6-bit
/// value. The block is two halves of 128 weights, each with 64 nibble bytes, 32 bytes of bit
/// pairs and 8 scales; within a half, weight `32 * j + l` (`j` < 4, `l` < 32) takes the low
/// (`j` < 2) or high nibble of nibble byte `l + 32 * (j % 2)`, bits `2j..2j + 2` of pair byte
/// `l` on top, and scale `2j + l / 16`. Computed as candle's (ggml's) dequantization does, to
/// the same f32 bits.
fn q6k_values(sb: &[u8], out: &mut [f32; Q4K_WEIGHTS]) {
    let d = half::f16::from_le_bytes([sb[208], sb[209]]).to_f32();
    for half in 0..2 {
        let ql = &sb[64 * half..64 * half + 64];
        let qh = &sb[128 + 32 * half..128 + 32 * half + 32];
        let sc = &sb[192 + 8 * half..192 + 8 * half + 8];
        for j in 0..4 {
            for l in 0..32 {
                let byte = ql[l + 32 * (j % 2)];
                let low = if j < 2 { byte & 0x0F } else { byte >> 4 };
                let q = (low | (((qh[l] >> (2 * j)) & 3) << 4)) as i8 - 32;
                let scale = sc[2 * j + l / 16] as i8;
                out[128 * half + 32 * j + l] = d * scale as f32 * q as f32;
            }
        }
    }
}

/// Converts whole Q6_K data (a multiple of 210 bytes) to Q8_0 blocks (34 bytes per 32 weights),
/// byte for byte what quantizing candle's dequantization of it gives (`quantize_q8_0`), without
/// the matrix in f32.
pub fn q6k_to_q8_0(src: &[u8]) -> Vec<u8> {
    assert!(
        src.len().is_multiple_of(Q6K_BLOCK_BYTES),
        "partial Q6_K super-block"
    );
    let mut out = Vec::with_capacity(src.len() / Q6K_BLOCK_BYTES * 8 * 34);
    let mut values = [0.0f32; Q4K_WEIGHTS];
    for sb in src.chunks_exact(Q6K_BLOCK_BYTES) {
        q6k_values(sb, &mut values);
        super::scalar::quantize_q8_0_into(&values, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    use candle_core::Device;

    use super::*;
    use crate::kernels::{scalar, QKind};

    /// candle's (ggml's) dequantization of `src`, `blocks` super-blocks of `dtype`.
    fn ggml_values(src: &[u8], dtype: GgmlDType, blocks: usize) -> Vec<f32> {
        let storage = QStorage::from_data(Cow::Borrowed(src), &Device::Cpu, dtype).unwrap();
        QTensor::new(storage, (blocks * Q4K_WEIGHTS,))
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
    }

    /// Three super-blocks of `dtype` with scale `d`, minimum scale `dmin` and random other
    /// bytes, rewritten by `rewrite` into `kind`: checks its size and that it dequantizes to
    /// candle's (ggml's) values of the original within `tol` (the f16 rounding of each
    /// sub-block's `d * sc` and `dmin * m`); returns those values.
    fn rewritten_like_ggml(
        (dtype, block_bytes): (GgmlDType, usize),
        (kind, out_block_bytes): (QKind, usize),
        (d, dmin): (f32, f32),
        rewrite: fn(&[u8]) -> Vec<u8>,
        tol: f32,
    ) -> Vec<f32> {
        let mut seed = block_bytes as u32;
        let mut src = Vec::new();
        for _ in 0..3 {
            src.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            src.extend_from_slice(&half::f16::from_f32(dmin).to_le_bytes());
            for _ in 4..block_bytes {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                src.push((seed >> 24) as u8);
            }
        }
        let want = ggml_values(&src, dtype, 3);
        let out = rewrite(&src);
        assert_eq!(out.len(), 3 * 8 * out_block_bytes);
        let mut got = vec![0.0f32; 3 * Q4K_WEIGHTS];
        scalar::dequantize_row(kind, &out, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < tol, "weight {i}: {g} vs {w}");
        }
        want
    }

    #[test]
    fn converted_blocks_dequantize_like_ggml() {
        // Terms up to ~0.013 * 63 * 15: f16 rounding of relative 2^-11.
        let want = rewritten_like_ggml(
            (GgmlDType::Q4K, Q4K_BLOCK_BYTES),
            (QKind::Q4_1, 20),
            (0.013, 0.007),
            q4k_to_q4_1,
            0.01,
        );
        assert!(
            want.iter().any(|v| v.abs() > 1.0),
            "test data too small to mean anything"
        );
    }

    /// Q5_K rewritten as Q5_1, likewise.
    #[test]
    fn q5k_converted_blocks_dequantize_like_ggml() {
        // Terms up to ~0.011 * 63 * 31.
        let want = rewritten_like_ggml(
            (GgmlDType::Q5K, Q5K_BLOCK_BYTES),
            (QKind::Q5_1, 24),
            (0.011, 0.009),
            q5k_to_q5_1,
            0.02,
        );
        // The fifth bits matter: values past what 4 bits reach under the largest scale.
        let reach = 0.011 * 63.0 * 15.0;
        assert!(want.iter().any(|v| *v > reach), "no fifth bit exercised");
    }

    /// Q6_K rewritten directly is byte for byte what the general path (candle's dequantization,
    /// then `quantize_q8_0`) makes of it, over random blocks with scales of both signs.
    #[test]
    fn q6k_converts_like_dequantizing_and_quantizing() {
        let mut seed = 5u32;
        let mut src = Vec::new();
        for b in 0..5 {
            for _ in 0..208 {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                src.push((seed >> 24) as u8);
            }
            src.extend_from_slice(&half::f16::from_f32(0.002 * (b + 1) as f32).to_le_bytes());
        }
        let values = ggml_values(&src, GgmlDType::Q6K, 5);
        assert!(values.iter().any(|v| *v < -1.0) && values.iter().any(|v| *v > 1.0));
        assert_eq!(q6k_to_q8_0(&src), scalar::quantize_q8_0(&values));
    }
}
