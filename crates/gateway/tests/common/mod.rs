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

/// A worker's `/v1/kv/blocks`: what its prefix cache holds now.
pub async fn kv_blocks(worker: &str) -> serde_json::Value {
    reqwest::get(format!("{worker}/v1/kv/blocks"))
        .await
        .expect("blocks")
        .json()
        .await
        .expect("json")
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

/// A TCP proxy to `target` whose connections can be frozen: once frozen, the connections open
/// then carry nothing more but stay open (a partition, a host gone without a word), while new
/// connections pass. A request whose first bytes `swallow` picks is held the same way, at once.
pub async fn freezable_proxy(
    target: std::net::SocketAddr,
    swallow: fn(&[u8]) -> bool,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frozen = std::sync::Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            // Connections made after the freeze are not frozen.
            let born_frozen = flag.load(Ordering::Relaxed);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w, request) in [
                (
                    Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    true,
                ),
                (Box::new(ro), Box::new(wi), false),
            ] {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let swallowed = request && swallow(&buf[..n]);
                        if swallowed || (flag.load(Ordering::Relaxed) && !born_frozen) {
                            // Hold both sockets open and carry nothing.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (url, frozen)
}
