//! Fixtures shared by the binary's integration tests: `lastmile` processes that are killed when
//! dropped, free ports, health waits, and reading a counter from `/metrics`.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `lastmile` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lastmile");

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts `lastmile ARGS` (logs: warnings only, discarded).
pub fn start(args: &[&str]) -> Proc {
    Proc(
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting lastmile"),
    )
}

/// Waits (up to a minute) until `url`'s /health answers 200.
pub async fn wait_healthy(url: &str) {
    for _ in 0..600 {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never became healthy");
}

/// A counter from a server's `/metrics` (0 before it is first written).
pub async fn metric(server: &str, series: &str) -> u64 {
    let text = reqwest::get(format!("{server}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}
