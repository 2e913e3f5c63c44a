//! A memory-mapped GGUF file: the header and metadata are parsed by candle's bounds-checked reader;
//! tensor data stays in the mapping and is handed out as byte slices, after checking that every
//! tensor lies inside the file. Nothing is copied here.
//!
//! A model file is untrusted input: `general.alignment` is checked before candle divides by it
//! (it would panic on 0), and every tensor size is computed with overflow checks, so a crafted
//! file is refused with an error naming the field instead of crashing or aliasing memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// One tensor's place in the file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Its storage type.
    pub dtype: GgmlDType,
    /// Dimensions, outermost first (rows, cols for a matrix).
    pub dims: Vec<usize>,
    /// Absolute byte offset of its data in the file.
    pub start: usize,
    /// Length of its data in bytes.
    pub len: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    mmap: Arc<Mmap>,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, GgufTensor>,
}

impl GgufFile {
    /// Maps `path` and parses its header; fails with a message naming the problem on a truncated
    /// file, an unknown tensor type or a tensor that points outside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: the file is opened read-only and the mapping is never written through; a
        // concurrent truncation by another process is outside what the engine can defend against.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| EngineError::io(format!("mapping {}", path.display()), e))?;
        let (metadata, tensors) = index(&mmap[..], &path.display().to_string())?;
        Ok(Self {
            mmap: Arc::new(mmap),
            metadata,
            tensors,
        })
    }

    /// Reads a GGUF header from bytes as [`GgufFile::open`] reads a file's, and checks every
    /// tensor it names (for fuzzing the reader: a file's bytes are hostile).
    pub fn check_bytes(bytes: &[u8]) -> Result<()> {
        index(bytes, "<bytes>").map(drop)
    }

    /// The shared mapping (weights keep it alive).
    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.mmap
    }

    /// A tensor's description, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    /// An integer metadata value of any integer width.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key)? {
            Value::U8(v) => Some(*v as u64),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::U16(v) => Some(*v as u64),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::U32(v) => Some(*v as u64),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::U64(v) => Some(*v),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// A float metadata value.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        match self.metadata.get(key)? {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            _ => None,
        }
    }

    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.metadata.get(key)? {
            Value::Bool(v) => Some(*v),
            _ => None,
        }
    }

    /// A required integer, with an error naming the key.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)
            .ok_or_else(|| EngineError::InvalidModel(format!("GGUF metadata key {key} is missing")))
    }

    /// A string-array metadata value.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        match self.metadata.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// An integer-array metadata value.
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        match self.metadata.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Some(*x as i64),
                    Value::U32(x) => Some(*x as i64),
                    Value::I64(x) => Some(*x),
                    Value::U8(x) => Some(*x as i64),
                    Value::I8(x) => Some(*x as i64),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// A float-array metadata value.
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        match self.metadata.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Some(*x),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

/// The metadata and the tensors of a GGUF file's bytes, every size checked against `bytes`;
/// errors name `name` (the file).
fn index(
    bytes: &[u8],
    name: &str,
) -> Result<(HashMap<String, Value>, HashMap<String, GgufTensor>)> {
    if let Some(alignment) = declared_alignment(bytes) {
        if alignment <= 0 || !(alignment as u64).is_power_of_two() || alignment > 1 << 30 {
            return Err(EngineError::InvalidModel(format!(
                "{}: general.alignment is {alignment}: it must be a power of two (32 by \
                 default)",
                name
            )));
        }
    }
    let mut cursor = std::io::Cursor::new(bytes);
    // The reader is not ours: a header it was never meant to see must not take the process down.
    let read =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut cursor)))
            .map_err(|_| {
                EngineError::InvalidModel(format!(
                    "{}: not a readable GGUF file: its header breaks the reader",
                    name
                ))
            })?;
    let content = read.map_err(|e| {
        EngineError::InvalidModel(format!("{}: not a readable GGUF file: {e}", name))
    })?;
    let file_len = bytes.len();
    let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dims: Vec<usize> = info.shape.dims().to_vec();
        let too_large = || {
            EngineError::InvalidModel(format!(
                "{}: tensor {name} is too large: its dimensions {dims:?} overflow",
                name
            ))
        };
        let elems = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(too_large)?;
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(EngineError::InvalidModel(format!(
                "{}: tensor {name} has {elems} elements, not a multiple of its block size {block}",
                name
            )));
        }
        let len = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(too_large)?;
        let start = usize::try_from(content.tensor_data_offset)
            .unwrap_or(usize::MAX)
            .saturating_add(usize::try_from(info.offset).unwrap_or(usize::MAX));
        if start.saturating_add(len) > file_len {
            return Err(EngineError::InvalidModel(format!(
                "{}: file is truncated: tensor {name} needs bytes {start}..{} but the file has {file_len} bytes",
                name,
                start.saturating_add(len)
            )));
        }
        tensors.insert(
            name.clone(),
            GgufTensor {
                dtype: info.ggml_dtype,
                dims,
                start,
                len,
            },
        );
    }
    Ok((content.metadata, tensors))
}

/// The value of `general.alignment` in the GGUF header `bytes`, if the key is there with an
/// integer value (read before candle's reader, which divides by it). `None` also when the
/// header cannot be walked: candle's reader then reports what is wrong.
fn declared_alignment(bytes: &[u8]) -> Option<i128> {
    let mut r = HeaderReader {
        bytes,
        at: 0,
        wide: false,
    };
    if r.take(4)? != b"GGUF" {
        return None;
    }
    let version = r.u32()?;
    r.wide = version >= 2;
    let _tensors = r.len()?;
    let entries = r.len()?;
    // As candle reads it: trailing NULs dropped from keys, and the last of duplicate keys wins.
    let mut found = None;
    for _ in 0..entries {
        let mut key = r.string()?;
        while let Some((0, rest)) = key.split_last() {
            key = rest;
        }
        let kind = r.u32()?;
        if key == b"general.alignment" {
            found = Some(r.integer(kind));
        } else {
            r.skip_value(kind, 0)?;
        }
    }
    found.flatten()
}

/// A cursor over a GGUF header that fails (`None`) instead of reading past the end.
struct HeaderReader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Version 2 and later: 64-bit lengths.
    wide: bool,
}

impl<'a> HeaderReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn len(&mut self) -> Option<usize> {
        let n = if self.wide {
            self.u64()?
        } else {
            u64::from(self.u32()?)
        };
        usize::try_from(n).ok()
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    /// An integer value of GGUF type `kind`.
    fn integer(&mut self, kind: u32) -> Option<i128> {
        let b = self.take(fixed_size(kind)?)?;
        Some(match kind {
            0 => i128::from(b[0]),
            1 => i128::from(b[0] as i8),
            2 => i128::from(u16::from_le_bytes(b.try_into().ok()?)),
            3 => i128::from(i16::from_le_bytes(b.try_into().ok()?)),
            4 => i128::from(u32::from_le_bytes(b.try_into().ok()?)),
            5 => i128::from(i32::from_le_bytes(b.try_into().ok()?)),
            10 => i128::from(u64::from_le_bytes(b.try_into().ok()?)),
            11 => i128::from(i64::from_le_bytes(b.try_into().ok()?)),
            _ => return None,
        })
    }

    /// Skips one value of GGUF type `kind` (arrays nest at most a few levels).
    fn skip_value(&mut self, kind: u32, depth: usize) -> Option<()> {
        if let Some(size) = fixed_size(kind) {
            self.take(size)?;
            return Some(());
        }
        match kind {
            8 => {
                self.string()?;
            }
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.len()?;
                match fixed_size(item) {
                    Some(size) => {
                        self.take(size.checked_mul(n)?)?;
                    }
                    // Each item takes at least one byte, so a count past the end fails soon.
                    None => {
                        for _ in 0..n {
                            self.skip_value(item, depth + 1)?;
                        }
                    }
                }
            }
            _ => return None,
        }
        Some(())
    }
}

/// Bytes of a GGUF value of fixed size: integers, floats and booleans.
fn fixed_size(kind: u32) -> Option<usize> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with the given metadata entries (key, type, value bytes) and tensors
    /// (name, dims innermost first, type), followed by `data` bytes of tensor data.
    fn gguf(
        entries: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((entries.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (key, kind, value) in entries {
            string(&mut b, key);
            b.extend(kind.to_le_bytes());
            b.extend(value);
        }
        for (name, dims, kind) in tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(kind.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(64) + data, 0);
        b
    }

    fn open(bytes: &[u8], tag: &str) -> Result<GgufFile> {
        let path =
            std::env::temp_dir().join(format!("lastmile-gguf-{tag}-{}.gguf", std::process::id()));
        std::fs::write(&path, bytes).expect("write");
        let f = GgufFile::open(&path);
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn a_zero_or_odd_alignment_is_refused_naming_the_field() {
        for (kind, value) in [
            (4u32, 0u32.to_le_bytes().to_vec()),
            (4, 3u32.to_le_bytes().to_vec()),
            (5, (-32i32).to_le_bytes().to_vec()),
        ] {
            let bytes = gguf(
                &[
                    (
                        "general.architecture",
                        8,
                        [4u64.to_le_bytes().to_vec(), b"test".to_vec()].concat(),
                    ),
                    ("general.alignment", kind, value),
                ],
                &[],
                0,
            );
            let err = open(&bytes, "align").err().expect("refused");
            assert!(err.to_string().contains("general.alignment"), "{err}");
        }
        let fine = gguf(
            &[("general.alignment", 4, 64u32.to_le_bytes().to_vec())],
            &[("t", &[64], 0)],
            256,
        );
        assert!(open(&fine, "align-ok").is_ok());
    }

    #[test]
    fn the_alignment_is_found_as_the_reader_finds_it() {
        // Found by the gguf fuzzer: a key spelled with trailing NULs (the reader drops them),
        // and duplicate keys (the last one counts), hid a zero alignment from the check.
        let finding =
            include_bytes!("../../../fuzz/findings/gguf-zero-alignment-key-with-trailing-nuls");
        let err = GgufFile::check_bytes(finding).unwrap_err();
        assert!(err.to_string().contains("general.alignment"), "{err}");
        let zero = 0u32.to_le_bytes().to_vec();
        let bytes = gguf(
            &[
                ("general.alignment", 4, 64u32.to_le_bytes().to_vec()),
                ("general.alignment\0\0", 4, zero),
            ],
            &[],
            0,
        );
        let err = GgufFile::check_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("general.alignment is 0"), "{err}");
    }

    #[test]
    fn tensor_sizes_that_overflow_are_refused_naming_the_tensor() {
        // 2^33 x 2^33 f32 elements: the product wraps to 0 in 64 bits, which looked empty.
        let bytes = gguf(&[], &[("blk.0.attn_q.weight", &[1 << 33, 1 << 33], 0)], 0);
        let err = open(&bytes, "overflow").err().expect("refused");
        assert!(
            err.to_string().contains("blk.0.attn_q.weight")
                && err.to_string().contains("too large"),
            "{err}"
        );
    }
}
