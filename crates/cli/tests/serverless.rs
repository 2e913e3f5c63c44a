//! Deployments that scale to zero and back (`lastmile serve --config`), with real processes and
//! the default model: requests at zero replicas are held and complete on the replica they
//! start; load scales a deployment up to its maximum; a replica killed under load is replaced
//! and no request is lost; idle scales it back to zero, and it comes back on the next request.
//! A deployment whose replicas cannot start holds requests no longer than its timeout, turns
//! away what exceeds its queue (503 with Retry-After), and counts the crashes. A bad file is
//! refused at start with the line and the field named.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{listening, metric, wait_healthy, Proc, BIN};
use serde_json::{json, Value};

const DEPLOYMENTS: &str = "\
deployments:
  - name: smol
    max_replicas: 2
    target_concurrency: 2
    idle_timeout: 3s
    routing: least_loaded
    threads: 1
    autoscaling:
      stable_window: 4s
      panic_window: 1s
  - name: broken
    model: broken.gguf
    max_replicas: 1
    queue: 1
    hold_timeout: 1s
";

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lastmile-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `lastmile serve --config`, its log kept in a file and printed if the test fails.
struct Server {
    _proc: Proc,
    url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- server log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn serve(config: &std::path::Path) -> Server {
    let log = config.with_extension("log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(config)
        .arg("--debug-headers")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log file"));
    let (proc, url) = listening(cmd);
    Server {
        _proc: proc,
        url,
        log,
    }
}

async fn get(url: &str) -> Value {
    reqwest::get(url)
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// A deployment's live status from the admin API.
async fn status(server: &str, name: &str) -> Value {
    get(&format!("{server}/admin/deployments/{name}")).await["status"].clone()
}

/// Polls the status of `name` until `done` holds; panics with the last status after `limit`.
async fn wait_for(
    server: &str,
    name: &str,
    what: &str,
    limit: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(limit);
    loop {
        let s = status(server, name).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {what} within {limit} s; last status {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One chat request: (status, body, the worker that answered).
async fn chat(server: &str, model: &str, i: usize) -> (u16, Value, String, Option<String>) {
    let r = reqwest::Client::new()
        .post(format!("{server}/v1/chat/completions"))
        .json(
            &json!({"model": model, "max_tokens": 16, "ignore_eos": true, "temperature": 0,
            "messages": [{"role": "user", "content": format!("Count to {}.", 10 + i)}]}),
        )
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("the gateway answers every request");
    let status = r.status().as_u16();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (by, retry_after) = (
        header("x-lastmile-worker").unwrap_or_default(),
        header("retry-after"),
    );
    (status, r.json().await.expect("json body"), by, retry_after)
}

#[test]
fn a_bad_deployments_file_is_refused_with_its_line_and_field() {
    let dir = temp_dir("bad-config");
    let path = dir.join("bad.yaml");
    let text = DEPLOYMENTS.replace("max_replicas: 2", "max_replicas: 0");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--port", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:3:19: deployments[0].max_replicas: must be at least 1",
        path.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_scales_from_zero_to_n_and_back_and_replaces_a_crashed_replica() {
    let dir = temp_dir("serverless");
    let config = dir.join("deployments.yaml");
    std::fs::write(&config, DEPLOYMENTS).expect("write config");
    std::fs::write(dir.join("broken.gguf"), "not a model").expect("write broken model");
    let server = serve(&config);
    let gw = server.url.clone();
    wait_healthy(&gw).await;

    // Every deployment is listed, though none has a replica.
    let models = get(&format!("{gw}/v1/models")).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["smol", "broken"]);
    let s = status(&gw, "smol").await;
    assert_eq!(
        (s["ready"].as_u64(), s["desired"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );

    // 0 -> 1: two concurrent first requests are held, start one replica, and both complete.
    let first = futures_join(2, |i| chat(&gw, "smol", i)).await;
    for (code, body, _, _) in &first {
        assert_eq!(*code, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");
    }
    let s = status(&gw, "smol").await;
    assert_eq!(
        s["cold_starts"], 1,
        "one replica for concurrent first requests: {s}"
    );
    assert!(metric(&gw, "lastmile_activator_held_total").await >= 2);

    // 1 -> 2 under load (6 clients, target 2 per replica); then one replica is SIGKILLed.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (gw, stop) = (gw.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = c * 1000;
                while !stop.load(Ordering::Relaxed) {
                    seen.push(chat(&gw, "smol", i % 40).await);
                    i += 1;
                }
                seen
            })
        })
        .collect();
    let s = wait_for(&gw, "smol", "two replicas ready", 60, |s| s["ready"] == 2).await;
    let victim = s["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["state"] == "ready"))
        .and_then(|r| r["id"].as_str())
        .expect("a ready replica")
        .to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Command::new("kill")
        .args(["-9", &victim])
        .status()
        .expect("kill");
    assert!(killed.success());
    let s = wait_for(
        &gw,
        "smol",
        "the crash seen and the replica replaced",
        60,
        |s| s["crashes"] == 1 && s["ready"] == 2 && s["cold_starts"].as_u64() >= Some(3),
    )
    .await;
    assert!(
        s["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["id"] != victim.as_str())),
        "{s}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut workers = std::collections::HashSet::new();
    let mut answered = 0;
    for c in clients {
        for (code, body, by, _) in c.await.expect("client") {
            assert_eq!(code, 200, "no request is lost to the crash: {body}");
            assert_eq!(body["usage"]["completion_tokens"], 16, "{body}");
            workers.insert(by);
            answered += 1;
        }
    }
    assert!(
        workers.len() >= 2,
        "the load was spread: {workers:?} over {answered}"
    );
    assert_eq!(
        metric(&gw, "lastmile_replica_crashes_total{deployment=\"smol\"}").await,
        1
    );

    // Idle: back to zero replicas, still listed.
    wait_for(&gw, "smol", "scaled to zero", 60, |s| {
        s["ready"] == 0 && s["replicas"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let models = get(&format!("{gw}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "smol");
    let cold = status(&gw, "smol").await["cold_starts"]
        .as_u64()
        .expect("count");
    let (code, body, _, _) = chat(&gw, "smol", 7).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        status(&gw, "smol").await["cold_starts"].as_u64(),
        Some(cold + 1)
    );
    // Every cold start is in the histogram, and each took under 30 s.
    let series = "lastmile_cold_start_seconds_bucket{deployment=\"smol\",le=\"30\"}";
    assert_eq!(metric(&gw, series).await, cold + 1);
    let count = "lastmile_cold_start_seconds_count{deployment=\"smol\"}";
    assert_eq!(metric(&gw, count).await, cold + 1);

    // A deployment that cannot start: the queue (1) turns the second request away at once,
    // the first waits its hold timeout (1 s); both get 503 with Retry-After.
    let started = Instant::now();
    let broken = futures_join(2, |i| chat(&gw, "broken", i)).await;
    for (code, body, _, retry_after) in &broken {
        assert_eq!(*code, 503, "{body}");
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        assert!(retry_after.is_some(), "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("broken")),
            "{body}"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    wait_for(&gw, "broken", "its crash counted", 30, |s| {
        s["crashes"].as_u64() >= Some(1)
    })
    .await;
    assert!(metric(&gw, "lastmile_activator_rejected_total").await >= 2);
}

/// Runs `n` requests at once and returns their results in order.
async fn futures_join<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    futures::future::join_all((0..n).map(f)).await
}
