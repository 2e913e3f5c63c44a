//! The gateway's follower of a worker's KV event feed, over a link that can die without a word
//! (a TCP proxy that freezes): a quiet feed is kept (the worker sends keep-alives), a silent one
//! is given up and the worker's prefix index rebuilt from a fresh subscription.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{freezable_proxy, gateway, kv_blocks, metric, wait_healthy, worker, MODEL};
use lastmile_gateway::GatewayConfig;
use lastmile_router::PolicyKind;
use serde_json::json;

/// A worker, a freezable proxy to it, and a KV-aware gateway that knows the worker only
/// through the proxy, with a one-second feed idle limit: (worker, gateway, the gateway's
/// index series for the worker, the proxy's freeze switch).
async fn gateway_over_proxy() -> (String, String, String, Arc<AtomicBool>) {
    let w = worker();
    wait_healthy(&w).await;
    let target = w
        .trim_start_matches("http://")
        .parse()
        .expect("worker address");
    let (proxied, frozen) = freezable_proxy(target, |_| false).await;
    let mut config = GatewayConfig::new(vec![proxied.clone()]);
    config.policy = PolicyKind::KvAware;
    config.kv_events_idle = Duration::from_secs(1);
    let gw = gateway(config);
    wait_healthy(&gw).await;
    let series = format!("lastmile_gateway_indexed_blocks{{worker=\"{proxied}\"}}");
    (w, gw, series, frozen)
}

/// A fresh conversation straight at the worker (no gateway sees it but through the feed);
/// returns how many blocks the worker's prefix cache holds afterwards.
async fn converse_at_worker(w: &str, topic: &str) -> u64 {
    let client = reqwest::Client::new();
    let body = json!({
        "model": MODEL,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": format!("You are an expert on {topic}. ").repeat(10)},
            {"role": "user", "content": format!("Tell me one fact about {topic}.")}
        ]
    });
    let r = client
        .post(format!("{w}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status().as_u16(), 200);
    kv_blocks(w).await["hashes"].as_array().map_or(0, Vec::len) as u64
}

/// Waits up to `within` for the gateway's index of the worker to hold `held` blocks.
async fn until_indexed(gw: &str, series: &str, held: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let indexed = metric(gw, series).await;
        if indexed == held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway indexes {indexed} of the worker's {held} blocks after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_kv_feed_is_kept() {
    let (w, gw, series, _) = gateway_over_proxy().await;
    let held = converse_at_worker(&w, "glaciers").await;
    assert!(
        held >= 5,
        "the worker cached the conversation: {held} blocks"
    );
    until_indexed(&gw, &series, held, Duration::from_secs(10)).await;
    // Three idle limits without an event: the worker's keep-alives hold the feed, so the index
    // is never dropped (a follower that took the quiet for a dead link would drop it, and
    // rebuild it half a second later).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let indexed = metric(&gw, &series).await;
        assert_eq!(indexed, held, "the index of a quiet worker was dropped");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_feed_that_went_silent_is_replaced() {
    let (w, gw, series, frozen) = gateway_over_proxy().await;
    let held = converse_at_worker(&w, "glaciers").await;
    until_indexed(&gw, &series, held, Duration::from_secs(10)).await;
    // The feed's connection goes silent (it stays open and carries nothing); then the worker
    // caches more. A follower that waited on that feed forever would never learn of it; this
    // one gives the silent feed up after its idle limit and subscribes again over a new
    // connection, starting from the worker's snapshot.
    frozen.store(true, Ordering::Relaxed);
    let now_held = converse_at_worker(&w, "volcanoes").await;
    assert!(now_held > held, "{now_held} blocks after {held}");
    until_indexed(&gw, &series, now_held, Duration::from_secs(10)).await;
}
