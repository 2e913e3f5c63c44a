//! The shape of a llama-family model, read from GGUF metadata or a Hugging Face `config.json`.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// How rotary embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's layout for GGUF llama models, whose Q/K rows the
    /// converter permuted.
    Interleaved,
    /// Halves (i, i + d/2): Hugging Face's `rotate_half`, and GGUF Qwen2.
    Neox,
}

/// Hyper-parameters of a llama-family decoder.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Architecture name as the file states it (`llama`, `qwen2`, `mistral`).
    pub arch: String,
    /// Residual stream width.
    pub hidden: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Feed-forward inner width.
    pub ffn_hidden: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Trained context length.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Dimensions rotated per head (usually `head_dim`).
    pub rope_dims: usize,
    /// Pairing of rotated dimensions.
    pub rope_style: RopeStyle,
}

/// Architectures served by the llama forward pass.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelConfig {
    /// Reads the config of a GGUF model.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f
            .get_str("general.architecture")
            .ok_or_else(|| EngineError::InvalidModel("GGUF has no general.architecture".into()))?
            .to_string();
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(EngineError::UnsupportedModel(format!(
                "architecture `{arch}` is not supported (supported: {})",
                SUPPORTED_ARCHS.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = f.require_u64(&key("embedding_length"))? as usize;
        let heads = f.require_u64(&key("attention.head_count"))? as usize;
        let kv_heads = f
            .get_u64(&key("attention.head_count_kv"))
            .unwrap_or(heads as u64) as usize;
        let head_dim = f
            .get_u64(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let vocab = match f.get_u64(&key("vocab_size")) {
            Some(v) => v as usize,
            None => f
                .tensor("token_embd.weight")
                .map(|t| t.dims[0])
                .ok_or_else(|| EngineError::InvalidModel("no token_embd.weight tensor".into()))?,
        };
        let cfg = Self {
            hidden,
            layers: f.require_u64(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
            ffn_hidden: f.require_u64(&key("feed_forward_length"))? as usize,
            vocab,
            context_length: f.get_u64(&key("context_length")).unwrap_or(2048) as usize,
            rms_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_base: f.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_dims: f
                .get_u64(&key("rope.dimension_count"))
                .map(|v| v as usize)
                .unwrap_or(head_dim),
            rope_style: if arch == "qwen2" {
                RopeStyle::Neox
            } else {
                RopeStyle::Interleaved
            },
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let need = |k: &str| {
            get(k).ok_or_else(|| EngineError::InvalidModel(format!("config.json has no `{k}`")))
        };
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .unwrap_or("llama")
            .to_string();
        if !SUPPORTED_ARCHS.contains(&model_type.as_str()) {
            return Err(EngineError::UnsupportedModel(format!(
                "model_type `{model_type}` is not supported (supported: {})",
                SUPPORTED_ARCHS.join(", ")
            )));
        }
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let head_dim = get("head_dim").unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let cfg = Self {
            arch: model_type,
            hidden,
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim,
            ffn_hidden: need("intermediate_size")?,
            vocab: need("vocab_size")?,
            context_length: get("max_position_embeddings").unwrap_or(2048),
            rms_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5) as f32,
            rope_base: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0) as f32,
            rope_dims: head_dim,
            rope_style: RopeStyle::Neox,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the shape is internally consistent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidModel(m));
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad(format!("degenerate model shape: {self:?}"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        // Products the loader and the KV cache size buffers by: a crafted file must not make
        // them wrap.
        let fits = [
            self.heads.checked_mul(self.head_dim),
            self.vocab.checked_mul(self.hidden),
            self.ffn_hidden.checked_mul(self.hidden),
            self.layers
                .checked_mul(self.kv_heads)
                .and_then(|n| n.checked_mul(self.head_dim))
                .and_then(|n| n.checked_mul(self.context_length))
                .and_then(|n| n.checked_mul(4)),
        ];
        if fits
            .iter()
            .any(|n| n.is_none_or(|n| n > isize::MAX as usize))
        {
            return bad(format!(
                "model shape too large (its sizes overflow): {self:?}"
            ));
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return bad(format!(
                "rope dimension {} does not fit head dimension {}",
                self.rope_dims, self.head_dim
            ));
        }
        Ok(())
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
