//! The hot path: quantized weight matrices and the matrix products over them.
//!
//! Weights are memory-mapped GGUF blocks, repacked at load for the SIMD kernels (see below);
//! activations are quantized to 8-bit blocks of 32 (`Q8Acts`) once per matrix input and then
//! multiplied against every weight row with integer SIMD, detected at run time. Matrices are
//! repacked at load into row groups (`pack.rs`), one vector lane per row: 16-row groups where the
//! CPU has AVX-512 VNNI (read by the AVX-512 kernels and, where present, the AMX int8 tiles),
//! 8-row groups where it has AVX2/FMA/F16C. Every kernel of a packing ends each block with the
//! same per-block epilogue, so a token's result never depends on its batch. Without AVX2, a
//! portable scalar fallback over the file layout computes exactly the same integer sums.

pub mod amx;
mod avx2;
mod avx512;
pub mod kquant;
mod matmul;
mod pack;
mod q8;
mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::lanes_below;
pub use matmul::{matmul, MatmulTask};
pub use pack::Packing;
pub(crate) use pack::{prefetch_range, zeroed_huge};
pub use q8::Q8Acts;

use std::sync::Arc;
use std::sync::OnceLock;

use memmap2::Mmap;

/// Elements per quantization block for every block format here.
pub const QK: usize = 32;

/// The storage formats the kernels multiply directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, one f16 scale per 32 (ggml Q4_0, 18 bytes a block).
    Q4_0,
    /// 4-bit, f16 scale and minimum per 32 (ggml Q4_1, 20 bytes a block).
    Q4_1,
    /// 8-bit, one f16 scale per 32 (ggml Q8_0, 34 bytes a block).
    Q8_0,
    /// 5-bit, one f16 scale per 32, values offset by 16 (ggml Q5_0, 22 bytes a block: scale, the
    /// 32 fifth bits, then the low nibbles as Q4_0 stores them).
    Q5_0,
    /// 5-bit, f16 scale and minimum per 32 (ggml Q5_1, 24 bytes a block).
    Q5_1,
}

impl QKind {
    /// Bytes used by `cols` elements of one row.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::F32 => cols * 4,
            Self::F16 | Self::BF16 => cols * 2,
            Self::Q4_0 => cols / QK * 18,
            Self::Q4_1 => cols / QK * 20,
            Self::Q8_0 => cols / QK * 34,
            Self::Q5_0 => cols / QK * 22,
            Self::Q5_1 => cols / QK * 24,
        }
    }

    /// Whether the kernel takes 8-bit quantized activations (else f32).
    pub fn wants_q8(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 | Self::Q5_0 | Self::Q5_1
        )
    }

    /// Whether the weights are floats (F32, F16, BF16).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }
}

/// Bytes of a weight matrix: either a window of the model's memory map or an owned buffer (for
/// formats converted at load).
#[derive(Clone)]
pub enum WeightBytes {
    /// A range inside a shared memory map.
    Mapped {
        /// The mapping (kept alive by every matrix that points into it).
        mmap: Arc<Mmap>,
        /// Start offset.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
    /// Bytes owned by the matrix.
    Owned(Arc<Vec<u8>>),
    /// A range of a buffer several matrices share (a model's packed weights, one allocation in
    /// the order the forward pass reads them).
    Shared {
        /// The buffer.
        buf: Arc<Vec<u8>>,
        /// Start offset.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
}

impl WeightBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped { mmap, start, len } => &mmap[*start..*start + *len],
            Self::Owned(v) => v,
            Self::Shared { buf, start, len } => &buf[*start..*start + *len],
        }
    }
}

/// A weight matrix of `rows` outputs by `cols` inputs, row-major, in one of the `QKind` layouts.
#[derive(Clone)]
pub struct QMatrix {
    /// Storage format.
    pub kind: QKind,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    bytes: WeightBytes,
    /// In a packed layout of `pack.rs` (only ever VNNI where `has_vnni`, AVX2 where `has_avx2`).
    packed: Option<Packing>,
}

impl QMatrix {
    /// Wraps bytes as a matrix, checking the length matches the shape.
    pub fn new(kind: QKind, rows: usize, cols: usize, bytes: WeightBytes) -> Result<Self, String> {
        if kind != QKind::F32
            && kind != QKind::F16
            && kind != QKind::BF16
            && !cols.is_multiple_of(QK)
        {
            return Err(format!(
                "{kind:?} matrix needs columns in multiples of {QK}, got {cols}"
            ));
        }
        let want = kind.row_bytes(cols) * rows;
        let got = bytes.as_slice().len();
        if want != got {
            return Err(format!(
                "{kind:?} matrix {rows}x{cols} needs {want} bytes, got {got}"
            ));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            bytes,
            packed: None,
        })
    }

    /// The packing of this CPU's fastest kernels: VNNI where AVX-512 VNNI runs, else AVX2 where
    /// that does, else none (the scalar kernels read the file layout).
    pub fn packing_for_this_cpu() -> Option<Packing> {
        if has_vnni() {
            Some(Packing::Vnni)
        } else if has_avx2() {
            Some(Packing::Avx2)
        } else {
            None
        }
    }

    /// Feeds a fingerprint of this matrix to `h`: its shape, format and layout, and its first
    /// and last 4 KiB (a fine-tune, a merged adapter or another quantization changes them).
    pub fn fingerprint(&self, h: &mut impl std::hash::Hasher) {
        let bytes = self.bytes.as_slice();
        let edge = bytes.len().min(4096);
        let words = [self.rows, self.cols, bytes.len()];
        h.write(format!("{:?}/{:?}", self.kind, self.packed).as_bytes());
        for w in words {
            h.write_u64(w as u64);
        }
        h.write(&bytes[..edge]);
        h.write(&bytes[bytes.len() - edge..]);
    }

    /// This matrix in the layout of the fastest kernels this CPU has: rows repacked (a copy) for
    /// them where the format has a packed layout, else itself (shared).
    pub fn for_this_cpu(&self) -> Self {
        match Self::packing_for_this_cpu() {
            Some(p) if self.packed.is_none() && pack::packable(self.kind) => self.packed_as(p),
            _ => self.clone(),
        }
    }

    /// The packing `for_this_cpu` would repack this matrix into, and the packed size; `None`
    /// where it would keep it as it is.
    pub(crate) fn packing_plan(&self) -> Option<(Packing, usize)> {
        match Self::packing_for_this_cpu() {
            Some(p) if self.packed.is_none() && pack::packable(self.kind) => {
                Some((p, pack::packed_len(self.kind, p, self.rows, self.cols)))
            }
            _ => None,
        }
    }

    /// Repacks this matrix for `packing` into `dst` (zeroed, `packing_plan`'s size).
    pub(crate) fn pack_into(&self, packing: Packing, dst: &mut [u8]) {
        let file = self.file_layout();
        pack::pack_into(
            self.kind,
            packing,
            self.rows,
            self.cols,
            file.bytes.as_slice(),
            dst,
        );
    }

    /// This matrix with `bytes` as its rows in `packing`'s layout (written by `pack_into`).
    pub(crate) fn with_packed(&self, packing: Packing, bytes: WeightBytes) -> Self {
        assert_eq!(
            bytes.as_slice().len(),
            pack::packed_len(self.kind, packing, self.rows, self.cols),
            "packed size"
        );
        Self {
            bytes,
            packed: Some(packing),
            ..self.clone()
        }
    }

    /// This matrix repacked (a copy) for `packing`'s kernels; the caller checks they can run
    /// here before multiplying with it.
    pub fn packed_as(&self, packing: Packing) -> Self {
        assert!(
            pack::packable(self.kind),
            "{:?} has no packed layout",
            self.kind
        );
        let file = self.file_layout();
        let dst = pack::pack(
            self.kind,
            packing,
            self.rows,
            self.cols,
            file.bytes.as_slice(),
        );
        Self {
            bytes: WeightBytes::Owned(Arc::new(dst)),
            packed: Some(packing),
            ..self.clone()
        }
    }

    /// This matrix in the file layout (a copy if it was packed), for the file-layout kernels.
    pub fn file_layout(&self) -> Self {
        let Some(packing) = self.packed else {
            return self.clone();
        };
        let rb = self.kind.row_bytes(self.cols);
        let mut dst = vec![0u8; self.rows * rb];
        for (r, out) in dst.chunks_exact_mut(rb).enumerate() {
            pack::unpack_row(self.kind, packing, self.cols, self.bytes.as_slice(), r, out);
        }
        Self {
            bytes: WeightBytes::Owned(Arc::new(dst)),
            packed: None,
            ..self.clone()
        }
    }

    /// Whether the rows are in a packed layout.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The packed layout the rows are in, if any.
    pub fn packing(&self) -> Option<Packing> {
        self.packed
    }

    /// The bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        assert!(
            self.packed.is_none(),
            "a packed matrix has no contiguous rows"
        );
        let rb = self.kind.row_bytes(self.cols);
        &self.bytes.as_slice()[r * rb..(r + 1) * rb]
    }

    /// All rows' bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Where the matrix's bytes lie in memory (for checks of how a model's weights are laid
    /// out).
    pub fn address_range(&self) -> std::ops::Range<usize> {
        let b = self.bytes.as_slice();
        let start = b.as_ptr() as usize;
        start..start + b.len()
    }

    /// Total bytes (what one full pass over the matrix reads).
    pub fn byte_len(&self) -> usize {
        self.bytes.as_slice().len()
    }

    /// Dequantizes row `r` into `out` (length `cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if let Some(packing) = self.packed {
            let mut file = vec![0u8; self.kind.row_bytes(self.cols)];
            pack::unpack_row(
                self.kind,
                packing,
                self.cols,
                self.bytes.as_slice(),
                r,
                &mut file,
            );
            scalar::dequantize_row(self.kind, &file, out);
        } else {
            scalar::dequantize_row(self.kind, self.row(r), out);
        }
    }
}

/// The instruction-set tiers the kernels run at, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Portable code, no SIMD.
    Scalar,
    /// AVX2 + FMA + F16C over matrices repacked at load (8-row groups).
    Avx2,
    /// The AVX2 kernels with AVX-VNNI's 256-bit `vpdpbusd` for their integer dot products
    /// (Intel client CPUs since Alder Lake, AMD since Zen 5: AVX2-only machines with VNNI).
    AvxVnni,
    /// AVX-512 VNNI over matrices repacked at load.
    Avx512,
    /// AMX int8 tiles beside AVX-512 VNNI.
    Amx,
}

/// The highest tier the kernels may use (see [`cap_tier`]); fixed at the first detection.
static CAP: OnceLock<Tier> = OnceLock::new();

/// Caps the kernels at `tier`, whatever this CPU has beyond it, to measure what a machine
/// without the higher tiers gets (`lastmile engine-bench --kernels avx2`). Takes effect only
/// before the kernels are first chosen (before any model loads); returns whether it did (or
/// the cap was already `tier`). `LASTMILE_NO_SIMD`, `LASTMILE_NO_AVX512` and
/// `LASTMILE_NO_AMX` cap them the same way from the environment.
pub fn cap_tier(tier: Tier) -> bool {
    *CAP.get_or_init(|| tier) == tier
}

fn cap() -> Tier {
    *CAP.get_or_init(|| Tier::Amx)
}

/// The tier in use here: the CPU's best, under the cap.
pub fn tier() -> Tier {
    if amx::has_amx() {
        Tier::Amx
    } else if has_vnni() {
        Tier::Avx512
    } else if has_avx_vnni() {
        Tier::AvxVnni
    } else if has_avx2() {
        Tier::Avx2
    } else {
        Tier::Scalar
    }
}

/// Whether the AVX2 + FMA + F16C kernels can run on this CPU (checked once).
pub fn has_avx2() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            cap() >= Tier::Avx2
                && std::env::var_os("LASTMILE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AVX2 kernels may use AVX-VNNI's 256-bit `vpdpbusd` here (checked once; under a
/// cap below [`Tier::AvxVnni`], or with `LASTMILE_NO_AVXVNNI` set, they do not).
pub fn has_avx_vnni() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2()
                && cap() >= Tier::AvxVnni
                && std::env::var_os("LASTMILE_NO_AVXVNNI").is_none()
                && is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the AVX-512 VNNI kernels can run on this CPU (checked once; `LASTMILE_NO_AVX512`
/// turns them off, `LASTMILE_NO_SIMD` turns off every SIMD path).
pub fn has_vnni() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2()
                && cap() >= Tier::Avx512
                && std::env::var_os("LASTMILE_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The widest kernel family in use here, for logs and benchmark reports.
pub fn simd_name() -> &'static str {
    match tier() {
        Tier::Amx => "amx-int8+avx512-vnni",
        Tier::Avx512 => "avx512-vnni",
        Tier::AvxVnni => "avx2+avx-vnni",
        Tier::Avx2 => "avx2",
        Tier::Scalar => "scalar",
    }
}

/// Float weight rows `w` (`out[0].len()` of them, one after another) against `T` tokens, `R`
/// rows at a time through `tile` and each row left through `one`: row `i` for token `t` into
/// `out[t][i]`. Inlined into each SIMD family's target-feature function, whose closures it runs.
#[inline(always)]
pub(crate) fn float_row_tiles<const R: usize, const T: usize>(
    w: &[u8],
    out: &mut [&mut [f32]; T],
    tile: impl Fn(&[&[u8]; R]) -> [[f32; R]; T],
    one: impl Fn(&[&[u8]; 1]) -> [[f32; 1]; T],
) {
    let rows = out[0].len();
    assert!(
        out.iter().all(|o| o.len() == rows),
        "one output length for every token"
    );
    assert!(
        rows > 0 && w.len().is_multiple_of(rows),
        "whole rows of weights"
    );
    let row_bytes = w.len() / rows;
    let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    let mut r = 0;
    while r + R <= rows {
        let v = tile(&std::array::from_fn(|k| row(r + k)));
        for (o, v) in out.iter_mut().zip(&v) {
            o[r..r + R].copy_from_slice(v);
        }
        r += R;
    }
    while r < rows {
        let v = one(&[row(r)]);
        for (o, v) in out.iter_mut().zip(&v) {
            o[r] = v[0];
        }
        r += 1;
    }
}

/// Elements in each float row of `w` (`F` 0: four bytes an element, else two), checked to be
/// the same in every row and to fit in every activation row of `xf`.
pub(crate) fn float_tile_len<const F: usize>(w: &[&[u8]], xf: &[&[f32]]) -> usize {
    let esize = if F == 0 { 4 } else { 2 };
    let n = w[0].len() / esize;
    for row in w {
        assert_eq!(row.len(), n * esize, "float rows of one length");
    }
    for x in xf {
        assert!(x.len() >= n, "activations shorter than the rows");
    }
    n
}

/// Quantizes f32 values to ggml Q8_0 blocks (used when converting formats we have no kernel for).
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    scalar::quantize_q8_0(values)
}

/// Dot product of one row of `kind` bytes with one activation row.
#[inline]
pub(crate) fn dot_rows<const R: usize>(
    kind: QKind,
    w: &[u8],
    xf: [&[f32]; R],
    xq: Option<[q8::Q8Row<'_>; R]>,
) -> [f32; R] {
    if has_avx2() {
        // SAFETY: the required CPU features were detected at run time just above.
        unsafe { avx2::dot_rows::<R>(kind, w, xf, xq) }
    } else {
        scalar::dot_rows::<R>(kind, w, xf, xq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn make_q4_1(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in values.chunks(QK) {
            let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&half::f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let lo = (((b[j] - min) * id).round() as u8).min(15);
                let hi = (((b[j + 16] - min) * id).round() as u8).min(15);
                out.push(lo | (hi << 4));
            }
        }
        out
    }

    fn make_q4_0(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in values.chunks(QK) {
            let mut amax = 0.0f32;
            let mut max = 0.0f32;
            for &v in b {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            for j in 0..16 {
                let lo = ((b[j] * id + 8.5) as u8).min(15);
                let hi = ((b[j + 16] * id + 8.5) as u8).min(15);
                out.push(lo | (hi << 4));
            }
        }
        out
    }

    /// ggml's Q5_0 (`min` false: values `d * (q - 16)`) or Q5_1 (`min`: `d * q + m`) blocks.
    fn make_q5(values: &[f32], min: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for b in values.chunks(QK) {
            let (d, m, q): (f32, f32, Vec<u8>) = if min {
                let lo = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let hi = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (hi - lo) / 31.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q = b.iter().map(|v| (((v - lo) * id).round() as u8).min(31));
                (d, lo, q.collect())
            } else {
                let max = b
                    .iter()
                    .cloned()
                    .fold(0.0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                let d = max / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = b.iter().map(|v| ((v * id + 16.5) as u8).min(31));
                (d, 0.0, q.collect())
            };
            out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            if min {
                out.extend_from_slice(&half::f16::from_f32(m).to_le_bytes());
            }
            let qh = q
                .iter()
                .enumerate()
                .fold(0u32, |h, (j, v)| h | (((*v as u32) >> 4) << j));
            out.extend_from_slice(&qh.to_le_bytes());
            for j in 0..16 {
                out.push((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
            }
        }
        out
    }

    /// Our Q5 reference reads the blocks as ggml (candle's copy of its reference) does.
    #[test]
    fn q5_blocks_dequantize_like_ggml() {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        use std::borrow::Cow;
        let mut seed = 3u64;
        let values: Vec<f32> = (0..4 * QK).map(|_| lcg(&mut seed) * 3.0).collect();
        for (kind, dtype) in [
            (QKind::Q5_0, GgmlDType::Q5_0),
            (QKind::Q5_1, GgmlDType::Q5_1),
        ] {
            let bytes = make_q5(&values, kind == QKind::Q5_1);
            let dev = candle_core::Device::Cpu;
            let storage = QStorage::from_data(Cow::Borrowed(&bytes), &dev, dtype).unwrap();
            let want: Vec<f32> = QTensor::new(storage, (values.len(),))
                .and_then(|q| q.dequantize(&dev))
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap();
            let mut got = vec![0.0; values.len()];
            scalar::dequantize_row(kind, &bytes, &mut got);
            assert_eq!(got, want, "{kind:?}");
            // And it is a quantization of the values (the test data means something).
            for (g, v) in got.iter().zip(&values) {
                assert!((g - v).abs() < 0.2, "{kind:?}: {g} vs {v}");
            }
        }
    }

    fn reference(m: &QMatrix, x: &[f32]) -> Vec<f32> {
        let mut row = vec![0.0; m.cols];
        (0..m.rows)
            .map(|r| {
                m.dequantize_row(r, &mut row);
                row.iter().zip(x).map(|(a, b)| a * b).sum()
            })
            .collect()
    }

    fn check_kind(kind: QKind) {
        for (rows, cols, n) in [
            (37, 256, 5),
            (9, 96, 3),
            (21, 576, 9),
            (4, 32, 5),
            (21, 576, 37),
            (40, 256, 16),
        ] {
            check_shape(kind, rows, cols, n);
        }
    }

    fn check_shape(kind: QKind, rows: usize, cols: usize, n: usize) {
        let mut seed = 7u64;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut seed)).collect();
        check_data(kind, rows, cols, n, &w, &x);
    }

    /// Weights that quantize to the largest stored values against activations that quantize to
    /// 127 everywhere: the integer sums reach the kernels' widest partial sums (31 * 127 per
    /// product for Q5), which must not saturate.
    #[test]
    fn extreme_values_do_not_saturate() {
        let (rows, cols, n) = (9, 128, 21);
        for kind in pack::PACKED_KINDS {
            // Each block: one -1 (its scale's anchor), the rest 15/16 (Q4_0 / Q5_0 store them
            // at the top of their range, Q4_1 / Q5_1 and Q8_0 as well).
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| if i % QK == 0 { -1.0 } else { 0.9375 })
                .collect();
            check_data(kind, rows, cols, n, &w, &vec![1.0; n * cols]);
        }
    }

    fn check_data(kind: QKind, rows: usize, cols: usize, n: usize, w: &[f32], x: &[f32]) {
        let bytes = match kind {
            QKind::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            QKind::F16 => w
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            QKind::BF16 => w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            QKind::Q4_0 => make_q4_0(w),
            QKind::Q4_1 => make_q4_1(w),
            QKind::Q8_0 => quantize_q8_0(w),
            QKind::Q5_0 => make_q5(w, false),
            QKind::Q5_1 => make_q5(w, true),
        };
        let m = QMatrix::new(kind, rows, cols, WeightBytes::Owned(Arc::new(bytes))).unwrap();
        let pool = crate::parallel::ThreadPool::new(2);
        let mut acts = Q8Acts::default();
        acts.quantize(x, n, cols);
        // The file layout (scalar kernels, and AVX2's file-layout ones) and every packing whose
        // kernels run here (AVX2's 8-row groups on any AVX2 CPU, VNNI's 16-row groups where
        // AVX-512 VNNI runs) must all match the reference, and each other to float rounding.
        let fast = m.for_this_cpu();
        assert_eq!(
            fast.packing(),
            QMatrix::packing_for_this_cpu().filter(|_| kind.wants_q8())
        );
        let mut layouts = vec![m.clone()];
        if kind.wants_q8() {
            if has_avx2() {
                layouts.push(m.packed_as(Packing::Avx2));
            }
            if has_vnni() {
                layouts.push(m.packed_as(Packing::Vnni));
            }
        }
        let mut outs = Vec::new();
        for mat in &layouts {
            let mut out = vec![0.0; n * rows];
            matmul(
                &pool,
                &mut [MatmulTask {
                    w: mat,
                    out: &mut out,
                }],
                x,
                &acts,
                n,
            );
            for t in 0..n {
                let want = reference(&m, &x[t * cols..(t + 1) * cols]);
                for r in 0..rows {
                    let got = out[t * rows + r];
                    // 8-bit activations: error grows with sqrt(cols); values are O(sqrt(cols)).
                    let tol = if kind.wants_q8() { 0.1 } else { 1e-3 };
                    assert!(
                        (got - want[r]).abs() < tol,
                        "{kind:?} {:?} t{t} r{r}: {got} vs {}",
                        mat.packing(),
                        want[r]
                    );
                }
            }
            outs.push(out);
        }
        for out in &outs[1..] {
            for (a, b) in outs[0].iter().zip(out) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + a.abs()),
                    "{kind:?}: {a} vs {b}"
                );
            }
        }
        // Each packing's kernels one token at a time must give its batched results exactly (and
        // AMX's whole tiles of 16 tokens the AVX-512 ones): a token's result may not depend on
        // its batch.
        #[cfg(target_arch = "x86_64")]
        for (mat, batched) in layouts.iter().zip(&outs).skip(1) {
            let packing = mat.packing().expect("packed");
            let job = |t0: usize, out: &mut Vec<f32>| pack::GroupJob {
                kind,
                packing,
                w: mat.bytes(),
                rows,
                cols,
                xq: &acts,
                t0,
                g0: 0,
                g1: rows.div_ceil(packing.group()),
                out: out.as_mut_ptr(),
                prefetch: false,
                unpacked: None,
            };
            let mut single = vec![f32::NAN; n * rows];
            for t in 0..n {
                // SAFETY: the packing's kernels run here (it was only built where they do);
                // `single` holds every cell.
                unsafe {
                    match packing {
                        Packing::Vnni => avx512::groups::<1>(&job(t, &mut single)),
                        Packing::Avx2 => avx2::groups::<1>(&job(t, &mut single)),
                    }
                };
            }
            assert_eq!(
                &single, batched,
                "{kind:?} {packing:?}: one token at a time differs from batched"
            );
            // The AVX2 kernels with and without AVX-VNNI's dot products (where the CPU has it)
            // compute the same integer sums, so the same floats.
            if packing == Packing::Avx2 {
                for vnni in [false, true] {
                    if vnni && !is_x86_feature_detected!("avxvnni") {
                        continue;
                    }
                    let mut each = vec![f32::NAN; n * rows];
                    for t in 0..n {
                        // SAFETY: AVX2 runs here (the packing was built), AVX-VNNI where
                        // detected; `each` holds every cell.
                        unsafe { avx2::groups_variant::<1>(&job(t, &mut each), vnni) };
                    }
                    assert_eq!(&each, batched, "{kind:?}: AVX2 with AVX-VNNI {vnni}");
                }
            }
            if packing == Packing::Vnni && amx::amx_available() && n >= amx::TOKENS {
                let tiles = n / amx::TOKENS;
                let mut tiled = single.clone();
                tiled[..tiles * amx::TOKENS * rows].fill(f32::NAN);
                // SAFETY: AMX available; `tiled` holds every cell.
                unsafe { amx::groups(&job(0, &mut tiled), tiles) };
                assert_eq!(tiled, single, "{kind:?}: AMX differs from AVX-512");
            }
        }
        let mut row = vec![0.0; cols];
        let mut packed_row = vec![0.0; cols];
        m.dequantize_row(rows - 1, &mut row);
        for mat in &layouts[1..] {
            mat.dequantize_row(rows - 1, &mut packed_row);
            assert_eq!(row, packed_row, "{kind:?}: dequantized rows differ");
        }
        // The scalar path must agree with the SIMD path.
        let xq = acts.row(0);
        let s = scalar::dot_rows::<1>(kind, m.row(3), [&x[..cols]], Some([xq]));
        let d = dot_rows::<1>(kind, m.row(3), [&x[..cols]], Some([acts.row(0)]));
        assert!(
            (s[0] - d[0]).abs() < 1e-3 * (1.0 + s[0].abs()),
            "{kind:?}: {s:?} vs {d:?}"
        );
    }

    #[test]
    fn every_kind_matches_dequantized_reference() {
        for kind in [
            QKind::F32,
            QKind::F16,
            QKind::BF16,
            QKind::Q4_0,
            QKind::Q4_1,
            QKind::Q8_0,
            QKind::Q5_0,
            QKind::Q5_1,
        ] {
            check_kind(kind);
        }
    }

    /// Float weights: a token's result is the same bits alone and in a batch of any size (in a
    /// register tile of rows x tokens, in the tiles for the tokens and rows left over: every
    /// kernel sums a row and token in one order), over widths with an odd and an even number of
    /// 8-wide blocks and with elements past the last block, and close to the reference.
    #[test]
    fn float_products_are_the_same_in_any_batch() {
        let mut seed = 7u64;
        for kind in [QKind::F32, QKind::F16, QKind::BF16] {
            for cols in [64, 200, 203, 1000] {
                let rows = 7;
                let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
                let bytes = float_bytes(kind, &w);
                let m = QMatrix::new(kind, rows, cols, WeightBytes::Owned(Arc::new(bytes)))
                    .expect("matrix");
                let n = 8;
                let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut seed)).collect();
                let pool = crate::parallel::ThreadPool::new(2);
                let acts = Q8Acts::default();
                let product = |n: usize, x: &[f32]| {
                    let mut out = vec![0.0; n * rows];
                    let mut tasks = [MatmulTask {
                        w: &m,
                        out: &mut out,
                    }];
                    matmul(&pool, &mut tasks, x, &acts, n);
                    out
                };
                let batches: Vec<Vec<f32>> = (2..=n).map(|b| product(b, &x[..b * cols])).collect();
                for t in 0..n {
                    let alone = product(1, &x[t * cols..(t + 1) * cols]);
                    for (b, batched) in (2..=n).zip(&batches).filter(|(b, _)| t < *b) {
                        assert_eq!(
                            alone,
                            batched[t * rows..(t + 1) * rows],
                            "{kind:?} width {cols}: token {t} alone differs from its batch of {b}"
                        );
                    }
                    let xt = &x[t * cols..(t + 1) * cols];
                    let want = reference(&m, xt);
                    for r in 0..rows {
                        assert!((alone[r] - want[r]).abs() < 1e-3, "{kind:?} r{r}");
                    }
                }
            }
        }
    }

    /// `w` in the bytes of float kind `kind`.
    fn float_bytes(kind: QKind, w: &[f32]) -> Vec<u8> {
        match kind {
            QKind::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            QKind::F16 => w
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }

    /// A float kernel for one token (`avx2::float_rows::<R, 1>`, `avx512::float_rows::<R, 1>`).
    #[cfg(target_arch = "x86_64")]
    type OneToken = unsafe fn(QKind, &[u8], &[&[f32]; 1], &mut [&mut [f32]; 1]);
    /// The same for two and three tokens.
    #[cfg(target_arch = "x86_64")]
    type TwoTokens = unsafe fn(QKind, &[u8], &[&[f32]; 2], &mut [&mut [f32]; 2]);
    /// Each token's outputs.
    #[cfg(target_arch = "x86_64")]
    type TokenRows = Vec<Vec<f32>>;
    #[cfg(target_arch = "x86_64")]
    type ThreeTokens = unsafe fn(QKind, &[u8], &[&[f32]; 3], &mut [&mut [f32]; 3]);

    /// Each tier's float kernel called directly (the products above run only this CPU's best
    /// tier): every tile shape gives each (row, token) the bits the lone row and token gets,
    /// 16-bit rows widened first give the bits converting them in the loop gives, and all of it
    /// is the reference product to 1e-3.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn float_kernels_of_every_tier_agree_in_every_tile() {
        let mut seed = 11u64;
        let rows = 7;
        for kind in [QKind::F32, QKind::F16, QKind::BF16] {
            for cols in [16, 20, 40, 50, 64, 203, 1000] {
                let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
                let bytes = float_bytes(kind, &w);
                let m = QMatrix::new(
                    kind,
                    rows,
                    cols,
                    WeightBytes::Owned(Arc::new(bytes.clone())),
                )
                .expect("matrix");
                let x: Vec<f32> = (0..3 * cols).map(|_| lcg(&mut seed)).collect();
                let xs: Vec<&[f32]> = x.chunks(cols).collect();
                let out = || vec![vec![0.0f32; rows]; 3];
                // Three tokens one at a time, as (one, one, one), (two, one) or (three).
                let ones = |f: OneToken, k: QKind, w: &[u8]| {
                    let mut o = out();
                    for (t, o) in o.iter_mut().enumerate() {
                        // SAFETY: each caller checked its tier's features.
                        unsafe { f(k, w, &[xs[t]], &mut [o]) };
                    }
                    o
                };
                let two_one = |f2: TwoTokens, f1: OneToken, k: QKind, w: &[u8]| {
                    let mut o = out();
                    let (a, b) = o.split_at_mut(2);
                    let [o0, o1] = a else { unreachable!() };
                    // SAFETY: as above.
                    unsafe { f2(k, w, &[xs[0], xs[1]], &mut [o0, o1]) };
                    unsafe { f1(k, w, &[xs[2]], &mut [&mut b[0]]) };
                    o
                };
                let three = |f: ThreeTokens, k: QKind, w: &[u8]| {
                    let mut o = out();
                    let [o0, o1, o2] = &mut o[..] else {
                        unreachable!()
                    };
                    // SAFETY: as above.
                    unsafe { f(k, w, &[xs[0], xs[1], xs[2]], &mut [o0, o1, o2]) };
                    o
                };
                let mut tiers: Vec<Vec<(&str, TokenRows)>> = Vec::new();
                if has_avx2() {
                    tiers.push(vec![
                        ("avx2 1x1", ones(avx2::float_rows::<1, 1>, kind, &bytes)),
                        ("avx2 3x1", ones(avx2::float_rows::<3, 1>, kind, &bytes)),
                        (
                            "avx2 3x2 + 3x1",
                            two_one(
                                avx2::float_rows::<3, 2>,
                                avx2::float_rows::<3, 1>,
                                kind,
                                &bytes,
                            ),
                        ),
                    ]);
                }
                if has_vnni() {
                    let mut wide = vec![0.0f32; rows * cols];
                    if kind != QKind::F32 {
                        // SAFETY: has_vnni holds.
                        unsafe { avx512::widen_rows(kind, &bytes, &mut wide) };
                        let exact: Vec<f32> = (0..rows)
                            .flat_map(|r| {
                                let mut row = vec![0.0; cols];
                                m.dequantize_row(r, &mut row);
                                row
                            })
                            .collect();
                        assert_eq!(wide, exact, "{kind:?} width {cols}: widening is not exact");
                    }
                    let widened = float_bytes(QKind::F32, &wide);
                    let (wk, wb) = match kind {
                        QKind::F32 => (kind, &bytes),
                        _ => (QKind::F32, &widened),
                    };
                    tiers.push(vec![
                        ("avx512 1x1", ones(avx512::float_rows::<1, 1>, kind, &bytes)),
                        (
                            "avx512 4x3",
                            three(avx512::float_rows::<4, 3>, kind, &bytes),
                        ),
                        (
                            "avx512 4x2 + 4x1, widened",
                            two_one(
                                avx512::float_rows::<4, 2>,
                                avx512::float_rows::<4, 1>,
                                wk,
                                wb,
                            ),
                        ),
                        (
                            "avx512 4x3, widened",
                            three(avx512::float_rows::<4, 3>, wk, wb),
                        ),
                    ]);
                }
                for runs in &tiers {
                    let (alone, want) = (&runs[0], (0..3).map(|t| reference(&m, xs[t])));
                    for (t, want) in want.enumerate() {
                        for r in 0..rows {
                            let (got, want) = (alone.1[t][r], want[r]);
                            assert!(
                                (got - want).abs() < 1e-3,
                                "{} {kind:?} width {cols}: {got} vs {want}",
                                alone.0
                            );
                        }
                    }
                    for other in &runs[1..] {
                        assert_eq!(
                            alone.1, other.1,
                            "{kind:?} width {cols}: {} vs {}",
                            alone.0, other.0
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_length_is_rejected() {
        let r = QMatrix::new(
            QKind::Q4_1,
            2,
            64,
            WeightBytes::Owned(Arc::new(vec![0; 10])),
        );
        assert!(r.is_err());
    }
}
