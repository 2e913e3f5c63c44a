//! The gateway's own overhead: end-to-end latency of chat requests sent through `lastmile
//! gateway` minus the same requests sent straight to the worker, at a fixed arrival rate.
//!
//! The worker here is a FAKE WORKER: it answers every chat completion at once with a fixed
//! reply, so that what is measured is the gateway (reading the body, choosing a worker,
//! forwarding, relaying the answer) and not the model. It exists for this benchmark only.
//!
//! ```sh
//! cargo run --release -p lastmile-gateway --example gateway_overhead -- [RATE] [SECONDS]
//! ```
//! (defaults: 200 requests/s, 20 s per side). Direct and gateway phases alternate every 2 s so
//! that drift on a shared machine hits both alike; the report gives p50 and p99 of each side and
//! their differences, and the gateway's own overhead histogram from its `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// The fake worker's routes: health with no load, one model, an instant fixed completion.
fn fake_worker() -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "ok", "running": 0, "waiting": 0})) }),
        )
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": "fake", "object": "model",
                    "created": 0, "owned_by": "fake-worker"}]}))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|Json(_): Json<Value>| async {
                Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                    "model": "fake",
                    "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "Hello from the fake worker."}}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
                }))
            }),
        )
}

/// Runs `serve` on an ephemeral port in its own single-thread runtime; returns the base URL.
fn spawn<F: std::future::Future<Output = ()>>(
    serve: impl FnOnce(tokio::net::TcpListener) -> F + Send + 'static,
) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                serve(tokio::net::TcpListener::from_std(listener).expect("listener")).await
            });
    });
    format!("http://{addr}")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Sends requests to `url` at `rate` per second for `phase`; returns their latencies (ms).
async fn phase(client: &reqwest::Client, url: &str, rate: f64, phase: Duration) -> Vec<f64> {
    let body = Arc::new(json!({"model": "fake", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello in five words."}]}));
    let gap = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut k = 0u32;
    while start.elapsed() < phase {
        // Open loop: each request leaves on schedule, whatever the others are doing.
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + gap * k)).await;
        k += 1;
        let (client, body, url) = (
            client.clone(),
            body.clone(),
            format!("{url}/v1/chat/completions"),
        );
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.post(url).json(&*body).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.bytes().await.ok()?;
            Some(t.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(Some(ms)) = t.await {
            out.push(ms);
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200.0);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let worker = spawn(|l| async move {
        let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(l, fake_worker()).await.expect("fake worker");
    });
    let config = lastmile_gateway::GatewayConfig::new(vec![worker.clone()]);
    let gateway = spawn(move |l| async move {
        lastmile_gateway::serve(l, config, std::future::pending())
            .await
            .expect("gateway");
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let client = reqwest::Client::new();
        for url in [&worker, &gateway] {
            for _ in 0..100 {
                if client
                    .get(format!("{url}/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        let rounds = seconds.div_ceil(2).max(1);
        let bar = indicatif::ProgressBar::new(rounds * 2);
        // Warm both paths' connections.
        phase(&client, &worker, rate, Duration::from_millis(500)).await;
        phase(&client, &gateway, rate, Duration::from_millis(500)).await;
        for _ in 0..rounds {
            direct.extend(phase(&client, &worker, rate, Duration::from_secs(2)).await);
            bar.inc(1);
            through.extend(phase(&client, &gateway, rate, Duration::from_secs(2)).await);
            bar.inc(1);
        }
        bar.finish_and_clear();
        direct.sort_by(f64::total_cmp);
        through.sort_by(f64::total_cmp);
        let (d50, d99) = (percentile(&direct, 50.0), percentile(&direct, 99.0));
        let (g50, g99) = (percentile(&through, 50.0), percentile(&through, 99.0));
        println!(
            "fake worker (instant fixed replies), {rate} requests/s, {} + {} requests",
            direct.len(),
            through.len()
        );
        println!("| path | p50 ms | p99 ms |\n| --- | ---: | ---: |");
        println!("| direct to the fake worker | {d50:.3} | {d99:.3} |");
        println!("| through the gateway | {g50:.3} | {g99:.3} |");
        println!(
            "| **gateway overhead** | **{:.3}** | **{:.3}** |",
            g50 - d50,
            g99 - d99
        );
        let metrics = client
            .get(format!("{gateway}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        println!("\ngateway's own histogram (lastmile_gateway_overhead_seconds):");
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("lastmile_gateway_overhead_seconds"))
        {
            println!("  {line}");
        }
    });
}
