//! A real etcd server for tests.

use std::time::Duration;

use crate::free_port;

/// A real etcd server (the `etcd` binary on PATH, or `LASTMILE_ETCD`) on free local ports,
/// with its data in a fresh directory; killed and cleaned up when dropped.
pub struct EtcdServer {
    /// Its client URL.
    pub url: String,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl EtcdServer {
    /// A plain-HTTP server.
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
