//! API keys, quotas and usage with real processes and the default model
//! (`lastmile serve --config --admin-key --usage-db`): the admin API needs the admin key; API
//! requests need a valid key (401 in each API's shape otherwise); requests- and tokens-per-minute
//! quotas throttle at their limits with 429, `Retry-After` and a message naming the limit; the
//! usage ledger sums to exactly the `usage` the clients received (whole answers and streams,
//! OpenAI and Anthropic); and keys and usage survive `kill -9` of the server. Quotas reserve what
//! the worker will really run (prompt and output limit, times `n`) and cap requests in flight per
//! key; a stream the client cuts is charged what was computed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{listening, wait_healthy, Proc, BIN};
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-for-tests";

fn temp_dir() -> PathBuf {
    temp_dir_named("main")
}

/// A fresh directory of this test process, one per test (tests run at once).
fn temp_dir_named(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lastmile-tenants-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `lastmile serve --config` with keys on, its ledger in `dir`.
fn serve(dir: &Path) -> (Proc, String) {
    serve_with(dir, &[])
}

/// [`serve`] with more arguments.
fn serve_with(dir: &Path, extra: &[&str]) -> (Proc, String) {
    let config = dir.join("deployments.yaml");
    std::fs::write(
        &config,
        "deployments:\n  - name: smol\n    min_replicas: 1\n    threads: 1\n",
    )
    .expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .args(["--admin-key", ADMIN, "--usage-db"])
        .arg(dir.join("usage.db"))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null());
    listening(cmd)
}

/// Waits until the deployment's replica is ready (min_replicas: 1).
async fn wait_ready(url: &str) {
    wait_healthy(url).await;
    for _ in 0..600 {
        let s: Value = admin(url, reqwest::Method::GET, "/admin/deployments/smol", None)
            .await
            .1;
        if s["status"]["ready"] == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the replica never became ready");
}

async fn admin(
    url: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .request(method, format!("{url}{path}"))
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("admin request");
    (r.status().as_u16(), r.json().await.expect("json"))
}

async fn create_key(url: &str, body: Value) -> (String, String) {
    let (status, v) = admin(url, reqwest::Method::POST, "/admin/keys", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().expect("id").to_string(),
        v["key"].as_str().expect("secret").to_string(),
    )
}

/// A non-streaming chat request with `key`: (status, Retry-After, body).
async fn chat(url: &str, key: Option<&str>, max_tokens: u64) -> (u16, Option<String>, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(
            &json!({"model": "smol", "max_tokens": max_tokens, "ignore_eos": true,
            "temperature": 0, "messages": [{"role": "user", "content": "Say something."}]}),
        );
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, retry, r.json().await.expect("json"))
}

/// The JSON events of a streamed request sent with `key` (as `x-api-key`, which both APIs
/// accept).
async fn stream_events(url: &str, path: &str, key: &str, body: Value) -> Vec<Value> {
    let text = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("stream");
    lastmile_protocol::parse_sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// (input, output) tokens from a whole OpenAI answer.
fn openai_usage(v: &Value) -> (u64, u64) {
    (
        v["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens"),
        v["usage"]["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_quotas_and_usage_hold_and_survive_a_kill() {
    let dir = temp_dir();
    let (mut server, url) = serve(&dir);
    wait_ready(&url).await;

    // The admin API needs the admin key; API requests need a valid key.
    let r = reqwest::get(format!("{url}/admin/keys"))
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let (status, _, body) = chat(&url, None, 4).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{body}"
    );
    let (status, _, body) = chat(&url, Some("lm-not-a-key"), 4).await;
    assert_eq!(status, 401, "{body}");
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", "lm-not-a-key")
        .json(&json!({"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "authentication_error", "{body}");

    // Requests per minute: 3 pass, the 4th is refused, naming the limit.
    let (_, rpm_key) = create_key(&url, json!({"name": "rpm-team", "rpm": 3})).await;
    for _ in 0..3 {
        let (status, _, body) = chat(&url, Some(&rpm_key), 4).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, retry, body) = chat(&url, Some(&rpm_key), 4).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "requests", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("requests per minute (RPM): limit 3"),
        "{message}"
    );
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=20).contains(&retry), "{retry}");

    // Tokens per minute (100): max_tokens (20) is reserved at admission and the real use
    // (prompt + 20) settled after. The first two fit; then the bucket holds less than 20.
    let (_, tpm_key) = create_key(&url, json!({"name": "tpm-team", "tpm": 100})).await;
    let started = Instant::now();
    let (s1, _, b1) = chat(&url, Some(&tpm_key), 20).await;
    let (s2, _, b2) = chat(&url, Some(&tpm_key), 20).await;
    let (s3, retry3, b3) = chat(&url, Some(&tpm_key), 20).await;
    let refill = started.elapsed().as_secs_f64() * 100.0 / 60.0;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    let (u1, u2) = (openai_usage(&b1), openai_usage(&b2));
    let used = (u1.0 + u1.1 + u2.0 + u2.1) as f64;
    // The preconditions that make these the exact outcomes at the limit.
    assert!(
        100.0 - (u1.0 + u1.1) as f64 >= 20.0,
        "the second fits: {u1:?}"
    );
    assert!(
        100.0 - used + refill < 20.0,
        "the third does not: used {used}, refill {refill}"
    );
    assert_eq!(s3, 429, "{b3}");
    assert_eq!(b3["error"]["type"], "tokens", "{b3}");
    assert!(
        b3["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tokens per minute (TPM): limit 100")),
        "{b3}"
    );
    assert!(retry3.is_some());
    // A request that can never fit says so.
    let (status, _, body) = chat(&url, Some(&tpm_key), 500).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Lower max_tokens")),
        "{body}"
    );

    // Usage: what the ledger says equals what the clients were told, over whole answers and
    // streams on both APIs.
    let (usage_id, usage_key) = create_key(&url, json!({"name": "metered"})).await;
    let mut told = (0u64, 0u64, 0u64);
    for n in [3, 5] {
        let (status, _, body) = chat(&url, Some(&usage_key), n).await;
        assert_eq!(status, 200, "{body}");
        let (i, o) = openai_usage(&body);
        told = (told.0 + 1, told.1 + i, told.2 + o);
    }
    let events = stream_events(
        &url,
        "/v1/chat/completions",
        &usage_key,
        json!({"model": "smol", "max_tokens": 6, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Stream something."}]}),
    )
    .await;
    let last = events
        .iter()
        .rev()
        .find(|v| v["usage"].is_object())
        .expect("a usage chunk");
    let (i, o) = openai_usage(last);
    told = (told.0 + 1, told.1 + i, told.2 + o);
    let events = stream_events(
        &url,
        "/v1/messages",
        &usage_key,
        json!({"model": "smol", "max_tokens": 7, "stream": true,
            "messages": [{"role": "user", "content": "Stream something else."}]}),
    )
    .await;
    let input = events
        .iter()
        .find_map(|e| e["message"]["usage"]["input_tokens"].as_u64())
        .expect("message_start usage");
    let output = events
        .iter()
        .rev()
        .find_map(|e| {
            (e["type"] == "message_delta").then(|| e["usage"]["output_tokens"].as_u64())?
        })
        .expect("message_delta usage");
    told = (told.0 + 1, told.1 + input, told.2 + output);
    let ledger = |v: &Value| {
        (
            v["totals"]["requests"].as_u64().unwrap_or(0),
            v["totals"]["input_tokens"].as_u64().unwrap_or(0),
            v["totals"]["output_tokens"].as_u64().unwrap_or(0),
        )
    };
    let usage_path = format!("/admin/usage?key={usage_id}&deployment=smol");
    let (status, v) = admin(&url, reqwest::Method::GET, &usage_path, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ledger(&v), told, "{v}");

    // kill -9 now: /admin/usage above wrote every request counted so far before it answered (it
    // flushes first), so keys and usage are on disk and must still be there.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .expect("kill")
        .success());
    let _ = server.0.wait();
    drop(server);
    let (_server, url) = serve(&dir);
    wait_ready(&url).await;
    let (status, v) = admin(&url, reqwest::Method::GET, &usage_path, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ledger(&v), told, "usage survives kill -9: {v}");
    let (status, _, body) = chat(&url, Some(&usage_key), 2).await;
    assert_eq!(status, 200, "the key survives too: {body}");
    let (status, v) = admin(
        &url,
        reqwest::Method::DELETE,
        &format!("/admin/keys/{usage_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, _, _) = chat(&url, Some(&usage_key), 2).await;
    assert_eq!(status, 401, "a revoked key is refused");
}

/// POSTs `body` to `path` with `key`: (status, body as JSON).
async fn post(url: &str, path: &str, key: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The error message of an OpenAI or Anthropic error body.
fn error_message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

/// Regression (issue 13, item 4): admission reserved less than the worker runs. Chat without a
/// limit reserved 256 whatever `n`; `/v1/completions` and `/v1/messages` read
/// `max_completion_tokens` where the worker reads `max_tokens`; `echo` scoring and prompts
/// reserved nothing; and any number of requests could be admitted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_cover_what_the_worker_runs_and_keys_have_an_in_flight_cap() {
    let dir = temp_dir_named("reserve");
    let (_server, url) = serve_with(&dir, &["--key-max-in-flight", "2"]);
    wait_ready(&url).await;
    let (_, key) = create_key(&url, json!({"name": "tpm-1000", "tpm": 1000})).await;
    let hi = json!([{"role": "user", "content": "Say something."}]);

    // Ordinary requests fit.
    let (status, body) = post(
        &url,
        "/v1/chat/completions",
        &key,
        json!({"model": "smol", "max_tokens": 8, "messages": hi}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(
        &url,
        "/v1/completions",
        &key,
        json!({"model": "smol", "max_tokens": 8, "prompt": "Say something."}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Each of these would run more than a key's whole minute; each is refused up front.
    let ids: Vec<u32> = (100..1300).collect();
    let long_text = "word ".repeat(1500);
    let bypasses = [
        (
            "completions reads max_tokens, as the worker does",
            "/v1/completions",
            json!({"model": "smol", "prompt": "Say something.", "max_completion_tokens": 1,
                "max_tokens": 1500}),
        ),
        (
            "messages reads max_tokens, as the worker does",
            "/v1/messages",
            json!({"model": "smol", "max_completion_tokens": 1, "max_tokens": 1500,
                "messages": hi}),
        ),
        (
            "chat without a limit reserves its context window per choice",
            "/v1/chat/completions",
            json!({"model": "smol", "n": 4, "messages": hi}),
        ),
        (
            "echo scoring reserves its prompt",
            "/v1/completions",
            json!({"model": "smol", "prompt": ids, "echo": true, "max_tokens": 0,
                "logprobs": 1}),
        ),
        (
            "a long prompt is reserved",
            "/v1/chat/completions",
            json!({"model": "smol", "max_tokens": 1,
                "messages": [{"role": "user", "content": long_text}]}),
        ),
    ];
    for (what, path, body) in bypasses {
        // A fresh key each: one case's debt does not refuse the next.
        let (_, key) = create_key(&url, json!({"name": "tpm-1000", "tpm": 1000})).await;
        let (status, answer) = post(&url, path, &key, body).await;
        assert_eq!(status, 429, "{what}: {answer}");
        let message = error_message(&answer);
        assert!(
            message.contains("tokens per minute (TPM) limit of 1000"),
            "{what}: {message}"
        );
    }

    // In flight: two streams held open, the third request is refused naming the cap; once
    // they are gone the key is admitted again.
    let (_, free_key) = create_key(&url, json!({"name": "unmetered"})).await;
    let open_stream = || {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&free_key)
            .json(
                &json!({"model": "smol", "max_tokens": 2000, "ignore_eos": true,
                "stream": true, "messages": hi}),
            )
            .send()
    };
    let first = open_stream().await.expect("first stream");
    let second = open_stream().await.expect("second stream");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let (status, answer) = post(
        &url,
        "/v1/chat/completions",
        &free_key,
        json!({"model": "smol", "max_tokens": 1, "messages": hi}),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["type"], "concurrent_requests", "{answer}");
    assert!(
        error_message(&answer).contains("concurrent requests: limit 2 in flight"),
        "{answer}"
    );
    drop((first, second));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = post(
            &url,
            "/v1/chat/completions",
            &free_key,
            json!({"model": "smol", "max_tokens": 1, "messages": hi}),
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            status == 429 && Instant::now() < deadline,
            "the slots never came back: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a stream until `pieces` generated pieces arrived, then drops it (the client leaves).
async fn read_then_cut(resp: reqwest::Response, pieces: u64) -> lastmile_protocol::StreamMeter {
    let mut resp = resp;
    let mut meter = lastmile_protocol::StreamMeter::default();
    while meter.output_tokens < pieces {
        let chunk = resp
            .chunk()
            .await
            .expect("stream")
            .expect("more of the stream");
        meter.push(&chunk);
    }
    meter
}

/// Regression (issue 13, item 5): a stream the client cut before its last chunk was recorded
/// as 0 input tokens and its whole reservation as output. It is charged its prompt (a token came)
/// and the output relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_client_is_charged_what_was_computed() {
    let dir = temp_dir_named("cut");
    let (_server, url) = serve(&dir);
    wait_ready(&url).await;
    let (id, key) = create_key(&url, json!({"name": "leaver"})).await;
    let hi = json!([{"role": "user", "content": "Tell me a long story."}]);
    let (status, whole) = post(
        &url,
        "/v1/chat/completions",
        &key,
        json!({"model": "smol", "max_tokens": 1, "messages": hi}),
    )
    .await;
    assert_eq!(status, 200, "{whole}");
    let prompt = openai_usage(&whole).0;

    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(
            &json!({"model": "smol", "max_tokens": 2000, "ignore_eos": true,
            "stream": true, "messages": hi}),
        )
        .send()
        .await
        .expect("chat stream");
    let chat_seen = read_then_cut(resp, 3).await.output_tokens;
    let resp = client
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", &key)
        .json(&json!({"model": "smol", "max_tokens": 2000, "stream": true, "messages": hi}))
        .send()
        .await
        .expect("messages stream");
    let meter = read_then_cut(resp, 3).await;
    let messages_seen = meter.output_tokens;

    let path = format!("/admin/usage?key={id}&deployment=smol");
    let deadline = Instant::now() + Duration::from_secs(30);
    let totals = loop {
        let (status, v) = admin(&url, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{v}");
        if v["totals"]["requests"] == 3 {
            break v["totals"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the cut streams were never recorded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let input = totals["input_tokens"].as_u64().expect("input");
    let output = totals["output_tokens"].as_u64().expect("output");
    // The same conversation, whole and cut twice: its prompt was computed three times.
    assert_eq!(input, 3 * prompt, "{totals}");
    // What the client read was relayed; far less than the 2 × 2000 reserved was generated.
    assert!(
        output > chat_seen + messages_seen && output < 1 + 2 * 500,
        "output {output}, the client read {chat_seen} + {messages_seen}: {totals}"
    );
}
