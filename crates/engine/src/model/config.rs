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

    /// The RoPE frequency divisors a Hugging Face `config.json`'s `rope_scaling` asks for (one
    /// per rotated pair, as GGUF's `rope_freqs.weight` holds them: frequency `i` becomes
    /// `f_i / d_i`), or `None` without scaling. `llama3` (Llama 3.1 / 3.2) and `linear` are
    /// computed; any other kind is refused, so a model is never served with the wrong positions.
    pub fn rope_divisors_from_hf(&self, v: &serde_json::Value) -> Result<Option<Vec<f32>>> {
        let Some(s) = v.get("rope_scaling").filter(|s| !s.is_null()) else {
            return Ok(None);
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let num = |k: &str| s.get(k).and_then(|x| x.as_f64());
        let need = |k: &str| {
            num(k).filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| {
                EngineError::InvalidModel(format!(
                    "config.json's {kind} rope_scaling needs a positive `{k}`"
                ))
            })
        };
        let half = self.rope_dims / 2;
        let freq =
            |i: usize| 1.0 / f64::from(self.rope_base).powf(2.0 * i as f64 / self.rope_dims as f64);
        match kind {
            "default" => Ok(None),
            "linear" => {
                let factor = need("factor")? as f32;
                Ok(Some(vec![factor; half]))
            }
            "llama3" => {
                let factor = need("factor")?;
                let low = need("low_freq_factor")?;
                let high = need("high_freq_factor")?;
                let original = need("original_max_position_embeddings")?;
                if high <= low {
                    return Err(EngineError::InvalidModel(
                        "config.json's llama3 rope_scaling has high_freq_factor <= low_freq_factor"
                            .into(),
                    ));
                }
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                let divisors = (0..half)
                    .map(|i| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq(i);
                        let d = if wavelen < high_wavelen {
                            1.0
                        } else if wavelen > low_wavelen {
                            factor
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            1.0 / ((1.0 - smooth) / factor + smooth)
                        };
                        d as f32
                    })
                    .collect();
                Ok(Some(divisors))
            }
            other => Err(EngineError::UnsupportedModel(format!(
                "config.json's rope_scaling type `{other}` is not supported (supported: llama3, \
                 linear); serving it with plain RoPE would give wrong answers past short contexts"
            ))),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Llama 3.1 8B's `config.json`, shape and RoPE only.
    fn llama31(rope_scaling: serde_json::Value) -> serde_json::Value {
        json!({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
               "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336,
               "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rope_scaling": rope_scaling})
    }

    fn divisors(rope_scaling: serde_json::Value) -> Result<Option<Vec<f32>>> {
        let v = llama31(rope_scaling);
        ModelConfig::from_hf_json(&v)?.rope_divisors_from_hf(&v)
    }

    #[test]
    fn llama3_rope_scaling_stretches_only_the_low_frequencies() {
        let d = divisors(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        )
        .expect("supported")
        .expect("scaled");
        assert_eq!(d.len(), 64);
        // Wavelengths under 8192 / 4 positions keep their frequency; over 8192, divided by 8;
        // in between, a smooth ramp.
        assert_eq!(d[0], 1.0);
        assert_eq!(d[63], 8.0);
        assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
        let ramp = d.iter().filter(|&&x| x > 1.0 && x < 8.0).count();
        assert!(ramp > 0 && ramp < 20, "{d:?}");
        // Wavelength of pair 40: 2 pi * 500000^(80/128) = 22,100 positions: past 8192.
        assert_eq!(d[40], 8.0);
        // Pair 20: 2 pi * 500000^(40/128) = 378 positions: under 2048, unchanged.
        assert_eq!(d[20], 1.0);
    }

    #[test]
    fn no_or_default_or_linear_scaling_is_served_and_the_rest_refused() {
        assert_eq!(divisors(serde_json::Value::Null).ok(), Some(None));
        assert_eq!(divisors(json!({"rope_type": "default"})).ok(), Some(None));
        assert_eq!(
            divisors(json!({"type": "linear", "factor": 2.0})).ok(),
            Some(Some(vec![2.0; 64]))
        );
        for kind in ["yarn", "dynamic", "longrope"] {
            let e = divisors(json!({"rope_type": kind, "factor": 4.0})).err();
            assert!(
                matches!(&e, Some(EngineError::UnsupportedModel(m)) if m.contains(kind)),
                "{kind}: {e:?}"
            );
        }
        let e = divisors(json!({"rope_type": "llama3", "factor": 8.0})).err();
        assert!(matches!(e, Some(EngineError::InvalidModel(_))), "{e:?}");
    }
}
