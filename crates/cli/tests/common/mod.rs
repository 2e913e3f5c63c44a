//! Fixtures shared by the binary's integration tests: `lastmile` processes that are killed when
//! dropped, free ports, health waits, and reading a counter from `/metrics`.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)] // Each test file uses some of them.
pub use lastmile_testing::{metric, Proc};

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

/// Starts `lastmile ARGS --port 0` (logs: warnings only, discarded) and waits for the address
/// it reports; see [`listening`].
pub fn start_listening(args: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn").stderr(Stdio::null());
    listening(cmd)
}

/// Runs `cmd` (a `lastmile` server command) with `--port 0` and waits, up to two minutes, for
/// the address it reports on stdout once it listens: no port is picked by the test, so none
/// can be taken by another test in between. Panics if the server exits first.
pub fn listening(mut cmd: Command) -> (Proc, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting lastmile");
    let stdout = child.stdout.take().expect("piped stdout");
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads stdout to its end, so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = lastmile_control::launcher::parse_listening_line(&line) {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("lastmile exited or never said where it listens");
    (proc, url)
}

/// A new API key (named `name`) made through the admin API of the server at `url`.
pub async fn api_key(url: &str, admin: &str, name: &str) -> String {
    let made: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/admin/keys"))
        .bearer_auth(admin)
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .expect("POST /admin/keys")
        .json()
        .await
        .expect("key json");
    made["key"].as_str().expect("a key").to_string()
}

/// Waits (up to a minute) until `url`'s /health answers 200.
pub async fn wait_healthy(url: &str) {
    lastmile_testing::wait_healthy(url, Duration::from_secs(60)).await
}
