//! Fixtures shared by the binary's integration tests: `lastmile` processes that are killed when
//! dropped, free ports, health waits, and reading a counter from `/metrics`.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)] // Each test file uses some of them.
pub use lastmile_testing::{free_port, metric, Proc};

/// The `lastmile` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lastmile");

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
    lastmile_testing::wait_healthy(url, Duration::from_secs(60)).await
}
