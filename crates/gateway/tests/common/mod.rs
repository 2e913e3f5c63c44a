//! Helpers shared by the gateway's tests: in-process workers with the default model, a gateway,
//! and polling.
#![allow(dead_code)]

use std::time::Duration;

use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_gateway::GatewayConfig;
use lastmile_models::ensure_default_model;
use lastmile_worker::ServerConfig;

#[allow(unused_imports)] // Each test file uses some of them.
pub use lastmile_testing::{metric, metric_sum, EtcdServer};

pub const MODEL: &str = "smollm2-135m-instruct";

pub use lastmile_testing::spawn_server;

pub fn worker() -> String {
    worker_until(std::future::pending())
}

/// A worker that shuts down gracefully when `shutdown` resolves.
pub fn worker_until(shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> String {
    worker_with(Default::default(), shutdown)
}

/// A worker with a part in disaggregated serving.
pub fn worker_as(disagg: lastmile_worker::DisaggConfig) -> String {
    worker_with(disagg, std::future::pending())
}

fn worker_with(
    disagg: lastmile_worker::DisaggConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> String {
    let loaded = LoadedModel::load(&ensure_default_model().expect("model")).expect("load");
    let engine = EngineHandle::start(
        loaded,
        EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .expect("engine");
    let config = ServerConfig {
        model_id: MODEL.to_string(),
        max_body_bytes: 1 << 20,
        startup_ms: Vec::new(),
        disagg,
    };
    spawn_server(move |l| async move {
        lastmile_worker::serve(l, engine, config, shutdown)
            .await
            .expect("worker");
    })
}

pub fn gateway(config: GatewayConfig) -> String {
    gateway_until(config, std::future::pending())
}

/// A gateway that shuts down gracefully when `shutdown` resolves.
pub fn gateway_until(
    config: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> String {
    spawn_server(move |l| async move {
        lastmile_gateway::serve(l, config, shutdown)
            .await
            .expect("gateway");
    })
}

/// A URL where nothing listens.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let url = format!("http://{}", l.local_addr().expect("address"));
    drop(l);
    url
}

/// Waits (up to 10 s) until `url`'s `/health` answers 200.
pub async fn wait_healthy(url: &str) {
    lastmile_testing::wait_healthy(url, Duration::from_secs(10)).await
}
