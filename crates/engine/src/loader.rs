//! Opening a model from disk: a GGUF file, or a Hugging Face folder (`config.json`,
//! `*.safetensors`, `tokenizer.json`). Produces the forward pass, tokenizer and chat template.

use std::path::Path;
use std::time::Instant;

use crate::chat_template::{ChatTemplate, CHATML};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::model::{safetensor_files, LlamaModel, ModelConfig, Weights};
use crate::tokenizer::TextTokenizer;

/// Everything needed to serve one model.
pub struct LoadedModel {
    /// The forward pass and its weights.
    pub model: LlamaModel,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template.
    pub template: ChatTemplate,
    /// Seconds spent loading.
    pub load_seconds: f64,
}

impl LoadedModel {
    /// Loads a GGUF file or a Hugging Face model folder.
    pub fn load(path: &Path) -> Result<Self> {
        let started = Instant::now();
        let meta = std::fs::metadata(path)
            .map_err(|e| EngineError::io(format!("model path {}", path.display()), e))?;
        let (model, tokenizer, template_src) = if meta.is_dir() {
            load_hf_dir(path)?
        } else {
            load_gguf(path)?
        };
        let template = ChatTemplate::new(
            template_src.as_deref().unwrap_or(CHATML),
            tokenizer.bos_text.as_deref(),
            tokenizer.eos_text.as_deref(),
        )?;
        Ok(Self {
            model,
            tokenizer,
            template,
            load_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn load_gguf(path: &Path) -> Result<(LlamaModel, TextTokenizer, Option<String>)> {
    let f = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&f)?;
    let weights = Weights::from_gguf(&f, &config)?;
    let tokenizer = TextTokenizer::from_gguf(&f)?;
    let template = f.get_str("tokenizer.chat_template").map(str::to_string);
    Ok((LlamaModel::new(config, weights), tokenizer, template))
}

fn load_hf_dir(dir: &Path) -> Result<(LlamaModel, TextTokenizer, Option<String>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| EngineError::io(format!("reading {}", cfg_path.display()), e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", cfg_path.display())))?;
    let config = ModelConfig::from_hf_json(&json)?;
    let weights = Weights::from_safetensors(&safetensor_files(dir)?, &config)?;
    let tokenizer = TextTokenizer::from_hf_dir(dir, &json)?;
    let template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        })
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    Ok((LlamaModel::new(config, weights), tokenizer, template))
}
