//! Portable kernels: the reference every SIMD path must agree with, and the fallback on CPUs
//! without AVX2. Integer sums are exact, so the two paths differ only in float rounding order.

use super::q8::Q8Row;
use super::{QKind, QK};

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes one row of `kind` bytes into `out`.
pub fn dequantize_row(kind: QKind, w: &[u8], out: &mut [f32]) {
    match kind {
        QKind::F32 => {
            for (o, c) in out.iter_mut().zip(w.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QKind::F16 => {
            for (o, c) in out.iter_mut().zip(w.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QKind::BF16 => {
            for (o, c) in out.iter_mut().zip(w.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QKind::Q4_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(w.chunks_exact(18)) {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    o[j] = ((q & 0xF) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        QKind::Q4_1 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(w.chunks_exact(20)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    o[j] = (q & 0xF) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        QKind::Q8_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(w.chunks_exact(34)) {
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    o[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
        }
        QKind::Q5_0 | QKind::Q5_1 => {
            let bs = kind.row_bytes(QK);
            for (o, blk) in out.chunks_exact_mut(QK).zip(w.chunks_exact(bs)) {
                let (d, off) = q5_scales(kind, blk);
                for (j, o) in o.iter_mut().enumerate() {
                    *o = q5_value(blk, j) as f32 * d + off;
                }
            }
        }
    }
}

/// A Q5 block's scale and the offset every weight carries: `-16 d` for Q5_0 (values stored
/// plus 16), the minimum for Q5_1.
fn q5_scales(kind: QKind, blk: &[u8]) -> (f32, f32) {
    let d = f16_at(blk, 0);
    if kind == QKind::Q5_1 {
        (d, f16_at(blk, 2))
    } else {
        (d, -16.0 * d)
    }
}

/// Stored value `j` (0..32, unsigned 5 bits) of a Q5_0 or Q5_1 block: the low nibble as Q4
/// stores it (byte `j % 16`, high half for `j >= 16`) and bit `j` of the 32-bit word of fifth
/// bits before the nibbles.
pub(crate) fn q5_value(blk: &[u8], j: usize) -> u8 {
    let qs = &blk[blk.len() - 16..];
    let qh = &blk[blk.len() - 20..blk.len() - 16];
    let nib = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    nib | (((qh[j / 8] >> (j % 8)) & 1) << 4)
}

/// Quantizes to ggml Q8_0 blocks (round half away from zero, as ggml's reference does).
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len().div_ceil(QK) * 34);
    quantize_q8_0_into(values, &mut out);
    out
}

/// `quantize_q8_0`, appending to `out`.
pub fn quantize_q8_0_into(values: &[f32], out: &mut Vec<u8>) {
    for b in values.chunks(QK) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for j in 0..QK {
            let v = b.get(j).copied().unwrap_or(0.0);
            out.push((v * id).round() as i8 as u8);
        }
    }
}

/// Dot products of one weight row with `R` activation rows.
pub fn dot_rows<const R: usize>(
    kind: QKind,
    w: &[u8],
    xf: [&[f32]; R],
    xq: Option<[Q8Row<'_>; R]>,
) -> [f32; R] {
    let mut out = [0.0f32; R];
    match (kind, xq) {
        (QKind::Q4_0, Some(xq)) => {
            for (b, blk) in w.chunks_exact(18).enumerate() {
                let d = f16_at(blk, 0);
                for (o, x) in out.iter_mut().zip(xq.iter()) {
                    let mut sum = 0i32;
                    for j in 0..16 {
                        let q = blk[2 + j];
                        sum += (q & 0xF) as i32 * x.qs[b * QK + j] as i32;
                        sum += (q >> 4) as i32 * x.qs[b * QK + j + 16] as i32;
                    }
                    *o += d * (x.d[b] * sum as f32) - 8.0 * d * x.s[b];
                }
            }
        }
        (QKind::Q4_1, Some(xq)) => {
            for (b, blk) in w.chunks_exact(20).enumerate() {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for (o, x) in out.iter_mut().zip(xq.iter()) {
                    let mut sum = 0i32;
                    for j in 0..16 {
                        let q = blk[4 + j];
                        sum += (q & 0xF) as i32 * x.qs[b * QK + j] as i32;
                        sum += (q >> 4) as i32 * x.qs[b * QK + j + 16] as i32;
                    }
                    *o += d * (x.d[b] * sum as f32) + m * x.s[b];
                }
            }
        }
        (QKind::Q8_0, Some(xq)) => {
            for (b, blk) in w.chunks_exact(34).enumerate() {
                let d = f16_at(blk, 0);
                for (o, x) in out.iter_mut().zip(xq.iter()) {
                    let mut sum = 0i32;
                    for j in 0..QK {
                        sum += blk[2 + j] as i8 as i32 * x.qs[b * QK + j] as i32;
                    }
                    *o += d * (x.d[b] * sum as f32);
                }
            }
        }
        (QKind::Q5_0 | QKind::Q5_1, Some(xq)) => {
            for (b, blk) in w.chunks_exact(kind.row_bytes(QK)).enumerate() {
                let (d, off) = q5_scales(kind, blk);
                for (o, x) in out.iter_mut().zip(xq.iter()) {
                    let sum: i32 = (0..QK)
                        .map(|j| q5_value(blk, j) as i32 * x.qs[b * QK + j] as i32)
                        .sum();
                    *o += d * (x.d[b] * sum as f32) + off * x.s[b];
                }
            }
        }
        _ => {
            let mut row = vec![0.0f32; xf[0].len()];
            dequantize_row(kind, w, &mut row);
            for (o, x) in out.iter_mut().zip(xf.iter()) {
                *o = row.iter().zip(x.iter()).map(|(a, b)| a * b).sum();
            }
        }
    }
    out
}
