//! The gateway in front of two real workers (the default model, real HTTP): requests are spread
//! by policy, streams pass through intact, `/v1/models` is merged, an unreachable worker is
//! retried around and taken out of rotation, and with no worker left clients get a 503.

mod common;

use std::time::Duration;

use common::{dead_url, gateway, kv_blocks, metric, metric_sum, wait_healthy, worker, MODEL};
use lastmile_gateway::GatewayConfig;
use lastmile_router::PolicyKind;
use serde_json::{json, Value};

async fn chat_count(worker: &str) -> u64 {
    metric(
        worker,
        "lastmile_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
    )
    .await
}

fn chat(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
           "max_tokens": 4, "temperature": 0, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_spreads_relays_and_routes_around_failures() {
    let (a, b) = (worker(), worker());
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let dead = dead_url();
    let mut config = GatewayConfig::new(vec![a.clone(), dead.clone(), b.clone()]);
    config.health_interval = Duration::from_millis(100);
    let gw = gateway(config);
    wait_healthy(&gw).await;
    let client = reqwest::Client::new();

    // Round robin over the two live workers (the dead one failed its first health check).
    for _ in 0..4 {
        let r = client
            .post(format!("{gw}/v1/chat/completions"))
            .json(&chat(false))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["object"], "chat.completion");
    }
    assert_eq!((chat_count(&a).await, chat_count(&b).await), (2, 2));

    // Streams pass through byte for byte, `[DONE]` included.
    let text = client
        .post(format!("{gw}/v1/chat/completions"))
        .json(&chat(true))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let data = lastmile_protocol::parse_sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(data.len() >= 3, "{text}");

    // One model, listed once.
    let models: Value = client
        .get(format!("{gw}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(models["data"][0]["id"], MODEL);
    let one = client
        .get(format!("{gw}/v1/models/{MODEL}"))
        .send()
        .await
        .expect("model");
    assert_eq!(one.status(), 200);
    let one: Value = one.json().await.expect("json");
    assert_eq!(
        (one["id"].as_str(), one["object"].as_str()),
        (Some(MODEL), Some("model"))
    );
    let missing = client
        .get(format!("{gw}/v1/models/org/nope"))
        .send()
        .await
        .expect("model");
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.expect("json");
    assert!(
        missing["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("org/nope")),
        "{missing}"
    );

    // Errors keep each API's shape; unknown paths are 404s.
    let r = client
        .post(format!("{gw}/v1/messages"))
        .json(&json!({"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "not_found_error");
    let r = client
        .get(format!("{gw}/v1/nothing"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);

    let metrics = client
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(metrics.contains(&format!(
        "lastmile_gateway_worker_available{{worker=\"{dead}\"}} 0"
    )));
    assert!(metrics.contains(&format!(
        "lastmile_gateway_worker_available{{worker=\"{a}\"}} 1"
    )));
    assert!(metrics.contains("lastmile_gateway_overhead_seconds_count"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_workers_are_retried_then_refused() {
    // Only dead workers: the first health check marks them down; requests get a 503 with
    // Retry-After in the endpoint's error shape, and the gateway's own health says so.
    let mut config = GatewayConfig::new(vec![dead_url(), dead_url()]);
    config.policy = PolicyKind::LeastLoaded;
    let gw = gateway(config);
    let client = reqwest::Client::new();
    let mut health = None;
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("{gw}/health")).send().await {
            health = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health, Some(503));
    let r = client
        .post(format!("{gw}/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "overloaded");
}

#[test]
fn settings_are_checked() {
    assert!(GatewayConfig::new(vec![]).validate().is_err());
    assert!(GatewayConfig::new(vec!["localhost:1".into()])
        .validate()
        .is_err());
    let mut kv = GatewayConfig::new(vec!["http://127.0.0.1:1".into()]);
    kv.policy = PolicyKind::KvAware;
    assert!(kv.validate().is_ok());
    kv.breaker_failures = 0;
    assert!(kv.validate().is_err());
    // The KV feed's idle limit: a third of it is the keep-alive asked of workers (100 ms to
    // 10 min), so shorter than 300 ms or longer than 30 min is refused.
    for (idle_ms, ok) in [
        (299, false),
        (300, true),
        (1_800_000, true),
        (1_800_001, false),
    ] {
        let mut c = GatewayConfig::new(vec!["http://127.0.0.1:1".into()]);
        c.kv_events_idle = Duration::from_millis(idle_ms);
        assert_eq!(c.validate().is_ok(), ok, "kv_events_idle {idle_ms} ms");
    }
    assert!(GatewayConfig::new(vec!["http://127.0.0.1:1".into()])
        .validate()
        .is_ok());
}

/// A stand-in for a worker that dies right after passing its first health check: it answers
/// exactly one `/health` and closes its port. (Only this simulated death is fake; the worker
/// that serves the requests is real.)
fn worker_that_dies_after_one_health_check() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            // It serves the same model as the live worker (the gateway routes by model).
            let body = format!(r#"{{"status":"ok","model":"{MODEL}","running":0,"waiting":0}}"#);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        drop(listener);
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_worker_that_died_are_retried_elsewhere() {
    let live = worker();
    wait_healthy(&live).await;
    let dying = worker_that_dies_after_one_health_check();
    let mut config = GatewayConfig::new(vec![dying.clone(), live.clone()]);
    // Long enough that the gateway still believes in the dead worker when requests arrive.
    config.health_interval = Duration::from_secs(60);
    let gw = gateway(config);
    wait_healthy(&gw).await;
    // The gateway is healthy once one worker is; the test needs it to believe in both (under
    // load the dying worker's one health check can land after the live worker's).
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let health: Value = client
            .get(format!("{gw}/health"))
            .send()
            .await
            .expect("gateway health")
            .json()
            .await
            .expect("health json");
        if health["available"] == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never counted both workers available: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        let r = client
            .post(format!("{gw}/v1/chat/completions"))
            .json(&chat(false))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "no request is lost");
    }
    assert_eq!(chat_count(&live).await, 4, "each request ran exactly once");
    let retries = metric(&gw, "lastmile_gateway_retries_total").await;
    assert!(retries >= 1, "{retries}");
}

async fn chat_via(client: &reqwest::Client, gw: &str, messages: &Value) -> (String, String) {
    let r = client
        .post(format!("{gw}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // Named by the gateway; empty when the request went straight to a worker.
    let worker = r
        .headers()
        .get("x-lastmile-worker")
        .map(|v| v.to_str().expect("header").to_string())
        .unwrap_or_default();
    let body: Value = r.json().await.expect("json");
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    (worker, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_sends_later_turns_where_the_conversation_is_cached() {
    let (a, b) = (worker(), worker());
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let mut config = GatewayConfig::new(vec![a.clone(), b.clone()]);
    config.policy = PolicyKind::KvAware;
    config.debug_headers = true;
    let gw = gateway(config);
    wait_healthy(&gw).await;
    let client = reqwest::Client::new();
    let topics = ["rivers", "mountains", "deserts", "forests"];
    let mut first_workers = Vec::new();
    for topic in topics {
        let mut messages = json!([
            {"role": "system", "content": format!("You are an expert on {topic}. ").repeat(8)},
            {"role": "user", "content": format!("Tell me one fact about {topic}.")}
        ]);
        let indexed = indexed_blocks(&gw).await;
        let (first, answer) = chat_via(&client, &gw, &messages).await;
        first_workers.push(first.clone());
        // The worker's KV events reach the gateway before the next turn.
        let mut indexed = kv_events_arrived(&gw, indexed).await;
        for turn in 0..2 {
            let list = messages.as_array_mut().expect("array");
            list.push(json!({"role": "assistant", "content": answer}));
            list.push(json!({"role": "user", "content": format!("And another, number {turn}?")}));
            let (next, _) = chat_via(&client, &gw, &messages).await;
            assert_eq!(next, first, "turn {turn} of the {topic} conversation moved");
            indexed = kv_events_arrived(&gw, indexed).await;
        }
    }
    // Idle workers and no shared prefix: new conversations are spread, not piled on one worker.
    assert!(
        first_workers.contains(&a) && first_workers.contains(&b),
        "{first_workers:?}"
    );
    let predicted = metric(&gw, "lastmile_gateway_predicted_overlap_blocks_total").await;
    assert!(
        predicted >= 8 * 5,
        "later turns were predicted cached: {predicted}"
    );
    // The gateway built every prompt and sent its tokens along: no worker tokenized one again.
    let given = metric(&a, "lastmile_given_prompts_total").await
        + metric(&b, "lastmile_given_prompts_total").await;
    assert_eq!(given, 12, "4 conversations x 3 turns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_starts_from_what_workers_already_cached() {
    let (a, b) = (worker(), worker());
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    // B computes a conversation before any gateway exists: no gateway saw those events.
    let client = reqwest::Client::new();
    let mut messages = json!([
        {"role": "system", "content": "You are an expert on glaciers. ".repeat(10)},
        {"role": "user", "content": "Tell me one fact about glaciers."}
    ]);
    let (direct, answer) = chat_via(&client, &b, &messages).await;
    assert_eq!(direct, "", "straight to the worker, no gateway header");
    let held = kv_blocks(&b).await;
    assert_eq!(held["block_size"], 16);
    let held = held["hashes"].as_array().map_or(0, Vec::len);
    assert!(held >= 5, "B cached the conversation: {held} blocks");

    let mut config = GatewayConfig::new(vec![a.clone(), b.clone()]);
    config.policy = PolicyKind::KvAware;
    config.debug_headers = true;
    let gw = gateway(config);
    wait_healthy(&gw).await;
    // The gateway loads each worker's snapshot when it subscribes to its events.
    let series = format!("lastmile_gateway_indexed_blocks{{worker=\"{b}\"}}");
    let mut indexed = 0;
    for _ in 0..100 {
        indexed = metric(&gw, &series).await;
        if indexed >= held as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(indexed, held as u64, "the index starts from B's snapshot");
    let list = messages.as_array_mut().expect("array");
    list.push(json!({"role": "assistant", "content": answer}));
    list.push(json!({"role": "user", "content": "And another?"}));
    let (next, _) = chat_via(&client, &gw, &messages).await;
    assert_eq!(
        next, b,
        "the next turn goes where the conversation is cached"
    );
}

/// Blocks the gateway's KV index holds, over every worker.
async fn indexed_blocks(gw: &str) -> u64 {
    metric_sum(gw, "lastmile_gateway_indexed_blocks").await
}

/// Waits until a request's KV events have reached the gateway: its index grew past `before`
/// and then held still for 100 ms (events come a step at a time). Returns the new size.
async fn kv_events_arrived(gw: &str, before: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = (before, std::time::Instant::now());
    loop {
        let now = indexed_blocks(gw).await;
        if now != last.0 {
            last = (now, std::time::Instant::now());
        } else if now > before && last.1.elapsed() >= Duration::from_millis(100) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no KV events reached the gateway in 10 s ({before} blocks indexed)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
