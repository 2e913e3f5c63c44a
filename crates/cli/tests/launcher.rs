//! The one process launcher (`lastmile_control::launcher`) with the real binary: servers started
//! with `--port 0` report the port they bound, so launches never race for a port; a worker
//! that cannot start fails the launch with the end of its stderr; every server command (here
//! `gateway`) reports its port the same way.

mod common;

use std::time::Duration;

use common::{wait_healthy, BIN};
use lastmile_control::launcher::{Launch, LaunchedWorker, Output};

/// `lastmile ARGS --host 127.0.0.1 --port 0`, its output behind `name` on the test's stderr.
fn launch(name: &str, args: &[&str]) -> LaunchedWorker {
    Launch::new(BIN, args)
        .output(Output::Prefixed(name.into()))
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawning lastmile")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_launches_at_once_get_distinct_ports_and_both_serve() {
    let a = launch("a", &["serve", "--threads", "1"]);
    let b = launch("b", &["serve", "--threads", "1"]);
    let limit = Duration::from_secs(120);
    let (url_a, url_b) = tokio::join!(a.listening(limit), b.listening(limit));
    let (url_a, url_b) = (url_a.expect("a listens"), url_b.expect("b listens"));
    assert_ne!(url_a, url_b);
    for url in [&url_a, &url_b] {
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        assert!(!url.ends_with(":0"), "{url}");
        wait_healthy(url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_start_fails_the_launch_with_its_stderr() {
    let worker = launch(
        "missing",
        &["serve", "--model", "/nonexistent/missing-model.gguf"],
    );
    let err = worker
        .listening(Duration::from_secs(60))
        .await
        .expect_err("no model, no server");
    assert_eq!(err.error_type(), "exited_early");
    let text = err.to_string();
    assert!(text.contains("exit status: 1"), "{text}");
    assert!(text.contains("missing-model.gguf"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reports_the_port_it_bound() {
    let gateway = launch("gateway", &["gateway", "--worker", "http://127.0.0.1:9"]);
    let url = gateway
        .listening(Duration::from_secs(30))
        .await
        .expect("the gateway listens");
    let r = reqwest::get(format!("{url}/health"))
        .await
        .expect("the reported port answers");
    // No worker is up: unavailable, but answered by the gateway on the port it reported.
    assert_eq!(r.status(), 503);
}
