//! Shared fixtures of the engine's integration tests: the default model, loaded once per binary.

use std::sync::OnceLock;

use lastmile_engine::LoadedModel;
use lastmile_models::ensure_default_model;

/// The default model (fetched into the cache on first use).
#[allow(dead_code)] // not every test binary uses the shared model
pub fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = ensure_default_model().expect("fetching the default model");
        LoadedModel::load(&path).expect("loading the default model")
    })
}

/// The greedy tokens an engine generates after `prompt` (`max_tokens` of them: end-of-generation
/// tokens do not stop it).
#[allow(dead_code)] // not every test binary runs an engine
pub fn generate(e: &lastmile_engine::EngineHandle, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    use lastmile_engine::{GenerateRequest, GenerationEvent, SamplingParams};
    let mut request = GenerateRequest::new(prompt.to_vec(), SamplingParams::greedy(), max_tokens);
    request.ignore_eos = true;
    let mut s = e.submit(request).expect("submit");
    let mut ids = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token { id, .. } => ids.push(id),
            GenerationEvent::Finished { .. } => return ids,
            GenerationEvent::PromptLogprobs(_) => panic!("not asked for"),
            GenerationEvent::Failed(m) => panic!("{m}"),
        }
    }
    panic!("no Finished event")
}

/// Reads a JSON fixture next to the tests.
#[allow(dead_code)] // not every test binary reads fixtures
pub fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Greedy continuation of `prompt` for `steps` tokens: the prompt as one prefill, then one decode
/// step per token, straight through the forward pass.
#[allow(dead_code)] // not every test binary decodes
pub fn greedy_ids(m: &LoadedModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    use lastmile_engine::kv::KvCache;
    use lastmile_engine::model::{BatchSeq, Scratch};
    use lastmile_engine::parallel::ThreadPool;
    let cfg = &m.model.config;
    let pool = ThreadPool::new(2);
    let total = prompt.len() + steps;
    let mut kv = KvCache::new(cfg.layers, total.div_ceil(16), 16, cfg.kv_dim());
    let blocks: Vec<u32> = (0..total.div_ceil(16) as u32).collect();
    let (mut s, mut feed, mut pos, mut out) = (Scratch::default(), prompt.to_vec(), 0, Vec::new());
    for _ in 0..steps {
        let b = [BatchSeq {
            start: 0,
            len: feed.len(),
            pos0: pos,
            blocks: &blocks,
            logit_rows: 1,
        }];
        m.model.forward(&feed, &b, &mut kv, &mut s, &pool);
        pos += feed.len();
        let next = lastmile_engine::sampler::argmax(&s.logits[..cfg.vocab]);
        out.push(next);
        feed = vec![next];
    }
    out
}
