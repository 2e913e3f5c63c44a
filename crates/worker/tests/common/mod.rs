//! One real server per test binary: the default model behind real HTTP on an ephemeral port,
//! running on its own runtime thread so it outlives each test's runtime.

use std::sync::OnceLock;

use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_models::ensure_default_model;
use lastmile_worker::ServerConfig;

/// The model id the test server serves.
pub const MODEL: &str = "smollm2-135m-instruct";

/// Base URL (`http://127.0.0.1:PORT`) of the shared test server.
pub fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let config = ServerConfig {
            model_id: MODEL.to_string(),
            max_body_bytes: 64 * 1024,
            startup_ms: Vec::new(),
            disagg: Default::default(),
        };
        start(engine(), config)
    })
}

/// A fresh engine over the default model (2 threads).
pub fn engine() -> EngineHandle {
    let path = ensure_default_model().expect("fetching the default model");
    let loaded = LoadedModel::load(&path).expect("loading the default model");
    EngineHandle::start(
        loaded,
        EngineConfig {
            threads: 2,
            ..EngineConfig::default()
        },
    )
    .expect("starting the engine")
}

/// Serves `engine` under `config` on an ephemeral port, on a runtime thread of its own; returns
/// its base URL.
pub fn start(engine: EngineHandle, config: ServerConfig) -> String {
    lastmile_testing::spawn_server(move |listener| async move {
        lastmile_worker::serve(listener, engine, config, std::future::pending())
            .await
            .expect("serving");
    })
}

/// POSTs JSON to the test server.
async fn send(path: &str, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", server()))
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// POSTs JSON and returns (status, parsed body).
#[allow(dead_code)]
pub async fn post(path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp = send(path, body).await;
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => serde_json::Value::String(text),
        },
    )
}

/// POSTs JSON and returns (status, raw body text).
#[allow(dead_code)]
pub async fn post_text(path: &str, body: serde_json::Value) -> (u16, String) {
    let resp = send(path, body).await;
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

/// POSTs a streaming request and returns the `data:` payloads.
#[allow(dead_code)]
pub async fn post_stream(path: &str, body: serde_json::Value) -> Vec<String> {
    let resp = send(path, body).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    lastmile_protocol::parse_sse_data(&resp.text().await.expect("body"))
}

/// Reads one gauge or counter from `/metrics`.
#[allow(dead_code)]
pub async fn metric(name: &str) -> f64 {
    lastmile_testing::metric_value(server(), name)
        .await
        .unwrap_or_else(|| panic!("metric {name} not found"))
}
