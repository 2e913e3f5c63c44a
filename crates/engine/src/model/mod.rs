//! Model definitions. One llama-family forward pass serves Llama 2/3, SmolLM/SmolLM2, TinyLlama,
//! Mistral and Qwen2 (with its Q/K/V biases); `ModelConfig` carries what differs between them.

mod attention;
mod config;
mod llama;
pub mod ops;
mod weights;

pub use config::{ModelConfig, RopeStyle, SUPPORTED_ARCHS};
pub use llama::{BatchSeq, LlamaModel, Scratch};
pub use weights::{safetensor_files, Weights};
