//! Model files: every supported tensor type loads and computes, and broken or unsupported files
//! are clear errors that name the problem (never a panic).

mod common;

use std::io::Write;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lastmile_engine::kernels::QKind;
use lastmile_engine::LoadedModel;
use lastmile_models::ensure_default_model;

/// A file path in this test process's temp folder; the file is removed when this is dropped
/// (rewritten models are ~160 MB, and every run would otherwise leave them behind).
struct TempFile(std::path::PathBuf);

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempFile {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_path(name: &str) -> TempFile {
    let dir = std::env::temp_dir().join(format!("lastmile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempFile(dir.join(name))
}

fn load_err(path: &std::path::Path) -> String {
    match LoadedModel::load(path) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the default model with its weights converted: every kernel format and the K-quants.
fn write_mixed_gguf(path: &std::path::Path) {
    let src = ensure_default_model().expect("model");
    let mut f = std::fs::File::open(&src).expect("open");
    let content = gguf_file::Content::read(&mut f).expect("header");
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, &Device::Cpu).expect("tensor");
        let target = match () {
            _ if name.ends_with("ffn_down.weight") => {
                // K-quants need rows in multiples of 256: only ffn_down (1536 wide) qualifies here.
                let layer: usize = name
                    .split('.')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                Some([GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K][layer % 3])
            }
            _ if name.ends_with("attn_q.weight") => Some(GgmlDType::F16),
            _ if name.ends_with("attn_k.weight") => Some(GgmlDType::BF16),
            _ if name.ends_with("attn_v.weight") => Some(GgmlDType::Q8_0),
            _ if name.ends_with("attn_output.weight") => Some(GgmlDType::Q4_0),
            _ if name.ends_with("ffn_gate.weight") => Some(GgmlDType::Q5_0),
            _ if name.ends_with("ffn_up.weight") => Some(GgmlDType::Q5_1),
            _ => None,
        };
        let q = match target {
            Some(dt) => {
                let t: Tensor = q.dequantize(&Device::Cpu).expect("dequantize");
                QTensor::quantize(&t, dt).expect("quantize")
            }
            None => q,
        };
        tensors.push((name.clone(), q));
    }
    let meta: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(path).expect("create");
    gguf_file::write(&mut out, &meta, &tens).expect("write gguf");
}

#[test]
fn every_tensor_type_loads_and_generates_like_the_original() {
    let path = temp_path("mixed.gguf");
    write_mixed_gguf(&path);
    let mixed = LoadedModel::load(&path).expect("mixed-type model loads");
    // The formats with kernels stay as they are (Q5 no longer goes through Q8_0).
    let layer = &mixed.model.weights.layers[0];
    let kinds = [
        layer.wv.kind,
        layer.wo.kind,
        layer.w_gate.kind,
        layer.w_up.kind,
    ];
    assert_eq!(
        kinds,
        [QKind::Q8_0, QKind::Q4_0, QKind::Q5_0, QKind::Q5_1],
        "formats as loaded"
    );
    // The k-quant down projections (Q4_K, Q5_K, Q6_K in turn) are rewritten at load.
    let down: Vec<QKind> = mixed.model.weights.layers[..3]
        .iter()
        .map(|l| l.w_down.kind)
        .collect();
    assert_eq!(
        down,
        [QKind::Q4_1, QKind::Q5_1, QKind::Q8_0],
        "k-quants as rewritten"
    );
    let original = common::default_model();
    let prompt = original
        .tokenizer
        .encode("The capital of France is Paris. The capital of Germany is")
        .expect("encode");
    let a = common::greedy_ids(original, &prompt, 8);
    let b = common::greedy_ids(&mixed, &prompt, 8);
    let text = mixed.tokenizer.decode(&b).expect("decode");
    assert!(
        text.contains("Berlin"),
        "mixed-type model lost the plot: {text:?}"
    );
    let same = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(same >= 2, "greedy diverged at once: {a:?} vs {b:?}");
}

#[test]
fn truncated_file_is_a_clear_error() {
    let src = std::fs::read(ensure_default_model().expect("model")).expect("read");
    // Inside the header, inside the metadata, and inside the tensor data.
    for cut in [10usize, 4_000, src.len() / 2] {
        let path = temp_path(&format!("truncated-{cut}.gguf"));
        std::fs::write(&path, &src[..cut]).expect("write");
        let msg = load_err(&path);
        assert!(
            msg.contains("GGUF") || msg.contains("truncated"),
            "cut at {cut}: {msg}"
        );
        if cut == src.len() / 2 {
            assert!(msg.contains("truncated") && msg.contains("tensor"), "{msg}");
        }
    }
}

#[test]
fn not_a_gguf_and_missing_files_are_clear_errors() {
    let path = temp_path("garbage.gguf");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(b"definitely not a model"))
        .expect("write");
    assert!(load_err(&path).contains("GGUF"));
    assert!(load_err(&temp_path("does-not-exist.gguf")).contains("does-not-exist"));
}

fn tiny_gguf(path: &std::path::Path, arch: &str, dtype_id: Option<u32>) {
    let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    let q = QTensor::quantize(&t, GgmlDType::F32).expect("qtensor");
    let arch_v = Value::String(arch.to_string());
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut out,
        &[("general.architecture", &arch_v)],
        &[("token_embd.weight", &q)],
    )
    .expect("write");
    let mut bytes = out.into_inner();
    if let Some(id) = dtype_id {
        // Patch the tensor's type id (after its name, dimension count and two dimensions).
        let name = b"token_embd.weight";
        let at = bytes
            .windows(name.len())
            .position(|w| w == name)
            .expect("name")
            + name.len()
            + 4
            + 16;
        bytes[at..at + 4].copy_from_slice(&id.to_le_bytes());
    }
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn unsupported_architecture_is_named() {
    let path = temp_path("mamba.gguf");
    tiny_gguf(&path, "mamba", None);
    let msg = load_err(&path);
    assert!(
        msg.contains("mamba") && msg.contains("not supported"),
        "{msg}"
    );
}

#[test]
fn unknown_tensor_type_is_named() {
    let path = temp_path("weird-type.gguf");
    tiny_gguf(&path, "llama", Some(77));
    let msg = load_err(&path);
    assert!(msg.contains("77"), "{msg}");
}
