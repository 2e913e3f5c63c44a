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
    /// Where those seconds went: (stage, seconds); stages that overlap run on separate threads.
    pub load_breakdown: Vec<(&'static str, f64)>,
}

impl LoadedModel {
    /// Loads a GGUF file or a Hugging Face model folder.
    pub fn load(path: &Path) -> Result<Self> {
        let started = Instant::now();
        let meta = std::fs::metadata(path)
            .map_err(|e| EngineError::io(format!("model path {}", path.display()), e))?;
        let mut breakdown = Vec::new();
        let (model, tokenizer, template_src) = if meta.is_dir() {
            load_hf_dir(path)?
        } else {
            load_gguf(path, &mut breakdown)?
        };
        let t = Instant::now();
        let src = template_src.as_deref().unwrap_or(CHATML);
        ChatTemplate::vet(
            src,
            tokenizer.bos_text.as_deref(),
            tokenizer.eos_text.as_deref(),
        )?;
        let template = ChatTemplate::new(
            src,
            tokenizer.bos_text.as_deref(),
            tokenizer.eos_text.as_deref(),
        )?;
        breakdown.push(("chat template", t.elapsed().as_secs_f64()));
        Ok(Self {
            model,
            tokenizer,
            template,
            load_seconds: started.elapsed().as_secs_f64(),
            load_breakdown: breakdown,
        })
    }
}

/// Maps the file, then builds the tokenizer on its own thread while the weights are prepared
/// (repacked for this CPU on every core): neither waits for the other.
fn load_gguf(
    path: &Path,
    breakdown: &mut Vec<(&'static str, f64)>,
) -> Result<(LlamaModel, TextTokenizer, Option<String>)> {
    let t = Instant::now();
    let f = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&f)?;
    breakdown.push(("map and parse the file", t.elapsed().as_secs_f64()));
    let (weights, tokenizer) = std::thread::scope(|scope| {
        let tokenizer = scope.spawn(|| {
            let t = Instant::now();
            TextTokenizer::from_gguf(&f).map(|tok| (tok, t.elapsed().as_secs_f64()))
        });
        let t = Instant::now();
        let weights = Weights::from_gguf(&f, &config).map(|w| (w, t.elapsed().as_secs_f64()));
        let tokenizer = tokenizer.join().unwrap_or_else(|_| {
            Err(EngineError::InvalidModel(
                "tokenizer thread panicked".into(),
            ))
        });
        (weights, tokenizer)
    });
    let (weights, weights_s) = weights?;
    let (tokenizer, tokenizer_s) = tokenizer?;
    breakdown.push(("weights (mapped, repacked)", weights_s));
    breakdown.push(("tokenizer (in parallel)", tokenizer_s));
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
    let rope_divisors = config.rope_divisors_from_hf(&json)?;
    let mut weights = Weights::from_safetensors(&safetensor_files(dir)?, &config)?;
    weights.rope_freqs = rope_divisors;
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
