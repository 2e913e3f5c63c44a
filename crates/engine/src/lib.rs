//! lastmile's inference engine: loads GGUF and safetensors llama-family models, tokenizes and
//! renders chat templates, and runs continuous batching over a paged KV cache on its own thread,
//! with SIMD quantized kernels over memory-mapped weights.
#![warn(missing_docs)]

pub mod chat_template;
pub mod constraint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod kv_disk;
pub mod kv_transfer;
pub mod loader;
pub mod model;
pub mod parallel;
pub mod sampler;
pub mod tokenizer;

pub use constraint::{Grammar, GrammarSpec};
pub use engine::{
    Device, DeviceReport, DraftInfo, DraftSource, EngineConfig, EngineHandle, EngineStats,
    FinishReason, GenerateRequest, GenerationEvent, GenerationStream, ModelInfo, Speculation,
    TokenLogprobs,
};
pub use error::{EngineError, GrammarFault, Result};
pub use loader::LoadedModel;
pub use sampler::SamplingParams;
pub use tokenizer::TokenPiece;
