//! Helpers shared by the gateway's tests: in-process workers with the default model, a gateway,
//! and polling.
#![allow(dead_code)]

use std::time::Duration;

use lastmile_engine::fetch::ensure_default_model;
use lastmile_engine::{EngineConfig, EngineHandle, LoadedModel};
use lastmile_gateway::GatewayConfig;
use lastmile_worker::ServerConfig;

pub const MODEL: &str = "smollm2-135m-instruct";

/// Serves `app` on an ephemeral port from its own runtime thread; returns the base URL.
pub fn spawn_server<F>(serve: impl FnOnce(tokio::net::TcpListener) -> F + Send + 'static) -> String
where
    F: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = listener.local_addr().expect("address");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            serve(listener).await;
        });
    });
    format!("http://{addr}")
}

pub fn worker() -> String {
    worker_until(std::future::pending())
}

/// A worker that shuts down gracefully when `shutdown` resolves.
pub fn worker_until(shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> String {
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

pub async fn wait_healthy(url: &str) {
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never became healthy");
}

async fn metrics_page(server: &str) -> String {
    reqwest::get(format!("{server}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body")
}

/// A counter from a server's `/metrics` (0 when it has not been written yet).
pub async fn metric(server: &str, series: &str) -> u64 {
    metrics_page(server)
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A real etcd server (the `etcd` binary on PATH, or `LASTMILE_ETCD`) on free local ports,
/// with its data in a fresh directory; killed and cleaned up when dropped.
pub struct EtcdServer {
    pub url: String,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding")
        .local_addr()
        .expect("address")
        .port()
}

impl EtcdServer {
    pub async fn start() -> Self {
        Self::start_with(&[], "http", reqwest::Client::new()).await
    }

    /// A fresh data directory for a server on `client`'s port.
    fn fresh_dir(client: u16) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lastmile-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A server with `extra` options, its client URL in `scheme`, ready once `probe` gets an
    /// answer from its `/health` (a client with the certificates it needs).
    pub async fn start_with(extra: &[&str], scheme: &str, probe: reqwest::Client) -> Self {
        let bin = std::env::var("LASTMILE_ETCD").unwrap_or_else(|_| "etcd".into());
        let (client, peer) = (free_port(), free_port());
        let dir = Self::fresh_dir(client);
        let url = format!("{scheme}://127.0.0.1:{client}");
        let child = std::process::Command::new(&bin)
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {bin} (install the etcd-server package; .ci/run does): {e}")
            });
        let server = Self { url, child, dir };
        for _ in 0..200 {
            if let Ok(r) = probe.get(format!("{}/health", server.url)).send().await {
                if r.status().is_success() {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd at {} never became healthy", server.url);
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sum of a metric's series over all their labels (`family{...} N` lines).
pub async fn metric_sum(server: &str, family: &str) -> u64 {
    let prefix = format!("{family}{{");
    metrics_page(server)
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}
