//! A memory-mapped GGUF file: the header and metadata are parsed by candle's bounds-checked reader;
//! tensor data stays in the mapping and is handed out as byte slices, after checking that every
//! tensor lies inside the file. Nothing is copied here.

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
        let mut cursor = std::io::Cursor::new(&mmap[..]);
        let content = Content::read(&mut cursor).map_err(|e| {
            EngineError::InvalidModel(format!("{}: not a readable GGUF file: {e}", path.display()))
        })?;
        let file_len = mmap.len();
        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let dims: Vec<usize> = info.shape.dims().to_vec();
            let elems: usize = dims.iter().product();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(EngineError::InvalidModel(format!(
                    "{}: tensor {name} has {elems} elements, not a multiple of its block size {block}",
                    path.display()
                )));
            }
            let len = elems / block * info.ggml_dtype.type_size();
            let start = (content.tensor_data_offset as usize).saturating_add(info.offset as usize);
            if start.saturating_add(len) > file_len {
                return Err(EngineError::InvalidModel(format!(
                    "{}: file is truncated: tensor {name} needs bytes {start}..{} but the file has {file_len} bytes",
                    path.display(),
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
        Ok(Self {
            mmap: Arc::new(mmap),
            metadata: content.metadata,
            tensors,
        })
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
