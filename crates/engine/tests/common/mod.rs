//! Shared fixtures of the engine's integration tests: the default model, loaded once per binary.

use std::sync::OnceLock;

use lastmile_engine::fetch::ensure_default_model;
use lastmile_engine::LoadedModel;

/// The default model (fetched into the cache on first use).
#[allow(dead_code)] // not every test binary uses the shared model
pub fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = ensure_default_model().expect("fetching the default model");
        LoadedModel::load(&path).expect("loading the default model")
    })
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
