//! A worker process killed (SIGKILL) while requests run through the gateway: every request ends
//! with a complete answer or a clear error in the API's shape — none hangs, none is cut off
//! without a word, none runs twice. Requests whose answer had not begun complete on the other
//! worker; only streams already under way on the dead worker end with an error event. The
//! requests that follow go to the surviving worker.
//! Real processes: two `lastmile serve` workers and `lastmile gateway`, the default model.

use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{metric as gateway_metric, start_listening, wait_healthy};

/// Completed chat requests a worker counted.
async fn completed(worker: &str) -> u64 {
    gateway_metric(
        worker,
        "lastmile_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
    )
    .await
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    /// A full answer, from this worker.
    Complete(String),
    /// A clear error: an HTTP error with an error object, or a stream's final error event.
    Error(String),
}

async fn request(gw: &str, i: usize, stream: bool) -> Outcome {
    let outcome = request_once(gw, i, stream).await;
    if !stream {
        // A non-streaming answer had not begun when any worker died: it completes somewhere.
        assert!(
            matches!(outcome, Outcome::Complete(_)),
            "request {i}: {outcome:?}"
        );
    }
    outcome
}

async fn request_once(gw: &str, i: usize, stream: bool) -> Outcome {
    let mut body = json!({"model": "smollm2-135m-instruct", "max_tokens": 64, "ignore_eos": true,
        "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": format!("Count to {}.", 10 + i)}]});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = reqwest::Client::new()
        .post(format!("{gw}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("the gateway answers every request (no dropped connection, no hang)");
    let status = r.status().as_u16();
    let by = r
        .headers()
        .get("x-lastmile-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = r
        .text()
        .await
        .expect("the body ends cleanly, even when its worker dies");
    if status != 200 {
        assert!(
            status >= 500,
            "only the lost worker may fail a request: {status} {text}"
        );
        let v: Value = serde_json::from_str(&text).expect("an error object");
        assert!(v["error"]["message"].is_string(), "{text}");
        return Outcome::Error(text);
    }
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 64, "{text}");
        return Outcome::Complete(by);
    }
    let events = lastmile_protocol::parse_sse_data(&text);
    match events.last().map(String::as_str) {
        Some("[DONE]") => {
            let usage = events
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .find(|v| v["usage"].is_object())
                .expect("a usage chunk");
            assert_eq!(usage["usage"]["completion_tokens"], 64, "{text}");
            Outcome::Complete(by)
        }
        Some(last) => {
            let v: Value = serde_json::from_str(last).expect("a final JSON event");
            assert!(
                v["error"]["message"].is_string(),
                "a stream that ends early ends with an error event: {text}"
            );
            Outcome::Error(last.to_string())
        }
        None => panic!("an empty stream: {text}"),
    }
}

/// Workers A and B (`serve --threads 1`) behind a gateway with `extra` options.
struct Pair {
    a: String,
    b: String,
    gw: String,
    worker_a: common::Proc,
    _worker_b: common::Proc,
    _gateway: common::Proc,
}

async fn pair(extra: &[&str]) -> Pair {
    let (worker_a, a) = start_listening(&["serve", "--threads", "1"]);
    let (worker_b, b) = start_listening(&["serve", "--threads", "1"]);
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let mut args = vec![
        "gateway",
        "--worker",
        &a,
        "--worker",
        &b,
        "--health-interval-ms",
        "100",
        "--debug-headers",
    ];
    args.extend_from_slice(extra);
    let (gateway, gw) = start_listening(&args);
    wait_healthy(&gw).await;
    Pair {
        a,
        b,
        gw,
        worker_a,
        _worker_b: worker_b,
        _gateway: gateway,
    }
}

/// `n` requests through `gw` (the even ones streaming), started now.
fn load(gw: &str, n: usize) -> Vec<tokio::task::JoinHandle<Outcome>> {
    (0..n)
        .map(|i| {
            let gw = gw.to_string();
            tokio::spawn(async move { request(&gw, i, i % 2 == 0).await })
        })
        .collect()
}

/// Waits until the worker at `url` is generating (or, with `queued`, holds any request).
async fn until_busy(url: &str, queued: bool) {
    for _ in 0..1000 {
        let h: Value = reqwest::get(format!("{url}/health"))
            .await
            .expect("the worker's health")
            .json()
            .await
            .expect("json");
        let waiting = if queued {
            h["waiting"].as_u64().unwrap_or(0)
        } else {
            0
        };
        if h["running"].as_u64().unwrap_or(0) + waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("worker {url} never got work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_mid_load_loses_and_duplicates_nothing() {
    // Bound whole: the processes live as long as `p`.
    let mut p = pair(&[]).await;
    let (a, b, gw) = (p.a.clone(), p.b.clone(), p.gw.clone());

    // 16 requests (half streaming) spread over both workers; A dies while they run.
    let tasks = load(&gw, 16);
    // Kill A only once it is generating (whatever this machine's speed).
    until_busy(&a, false).await;
    p.worker_a.0.kill().expect("killing worker A");
    let _ = p.worker_a.0.wait();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("request task"));
    }
    let on_b = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Complete(w) if *w == b))
        .count() as u64;
    let errors: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Error(e) => Some(e.as_str()),
            Outcome::Complete(_) => None,
        })
        .collect();
    for e in &errors {
        assert!(e.contains("worker"), "errors name what failed: {e}");
    }
    eprintln!(
        "after killing A: {on_b} completed on B, {} on A before it died, {} errors: {errors:?}",
        16 - on_b as usize - errors.len(),
        errors.len()
    );
    assert_eq!(outcomes.len(), 16);
    // A died with work in flight: each such request was run again on B or ended in an error.
    let retries = gateway_metric(&gw, "lastmile_gateway_retries_total").await;
    assert!(
        !errors.is_empty() || retries > 0,
        "A was killed with work in flight: {outcomes:?}"
    );
    // Nothing ran twice on B: it completed exactly the requests that came back from it.
    assert_eq!(completed(&b).await, on_b, "{outcomes:?}");

    // After the kill, everything goes to B and completes.
    for i in 0..4 {
        match request(&gw, 100 + i, i % 2 == 0).await {
            Outcome::Complete(w) => assert_eq!(w, b),
            e => panic!("after the kill: {e:?}"),
        }
    }
    assert_eq!(completed(&b).await, on_b + 4);
}

/// Sends `sig` (`STOP`, `CONT`) to a process.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_loses_its_requests_to_another() {
    // A worker frozen (SIGSTOP: a wedged process keeps its sockets open and answers nothing)
    // while it holds requests. Without a first-byte timeout its clients wait forever; with one,
    // requests whose answer had not begun go to B, and its streams under way end with an error
    // event, within the worker timeout plus a health check.
    let p = pair(&["--worker-timeout-ms", "1000"]).await;
    let (a, b, gw) = (p.a.clone(), p.b.clone(), p.gw.clone());
    let started = std::time::Instant::now();
    let tasks = load(&gw, 8);
    until_busy(&a, true).await;
    signal(p.worker_a.0.id(), "STOP");
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("request task"));
    }
    let took = started.elapsed();
    let on_b = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Complete(w) if *w == b))
        .count() as u64;
    eprintln!("with A frozen: {outcomes:?} in {took:?}");
    // Non-streaming requests all completed (`request` checks), so those A held went to B.
    assert!(
        gateway_metric(&gw, "lastmile_gateway_retries_total").await > 0,
        "A was frozen holding requests: {outcomes:?}"
    );
    assert_eq!(completed(&b).await, on_b, "nothing ran twice on B");
    assert!(
        took < Duration::from_secs(90),
        "every client of the frozen worker was answered: {took:?}"
    );
    // Thawed, A answers again (the gateway dropped its connections; A cancelled that work).
    signal(p.worker_a.0.id(), "CONT");
    wait_healthy(&a).await;
}
