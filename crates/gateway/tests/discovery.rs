//! Workers found through a real etcd: each registers under a lease; the gateway adds them as they
//! appear, drops one whose lease expires (it stopped keeping it alive, as a dead process does) or
//! is revoked (a graceful shutdown), answers 503 with no worker left, and takes a worker back when
//! it registers again.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{gateway, wait_healthy, worker, EtcdServer, MODEL};
use lastmile_discovery::{Etcd, EtcdConfig, Registration, WorkerInfo, DEFAULT_PREFIX};
use lastmile_gateway::{EtcdDiscovery, GatewayConfig};
use serde_json::{json, Value};

fn info(url: &str) -> WorkerInfo {
    WorkerInfo {
        url: url.to_string(),
        model: MODEL.to_string(),
        role: "both".to_string(),
    }
}

async fn health(gw: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{gw}/health")).await.expect("health");
    (r.status().as_u16(), r.json().await.expect("json"))
}

/// Waits until the gateway lists `n` workers, all available; returns how long it took.
async fn until_listed(gw: &str, n: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (_, h) = health(gw).await;
        if h["workers"] == n && h["available"] == n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "gateway never listed {n} workers: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a chat request; returns its status and the worker that answered.
async fn chat(gw: &str) -> (u16, Option<String>, Value) {
    let r = reqwest::Client::new()
        .post(format!("{gw}/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                      "max_tokens": 3, "temperature": 0}),
        )
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let by = r
        .headers()
        .get("x-lastmile-worker")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, by, r.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_expire_leave_and_return_through_etcd() {
    let etcd_server = EtcdServer::start().await;
    let (a, b) = (worker(), worker());
    wait_healthy(&a).await;
    wait_healthy(&b).await;
    let mut config = GatewayConfig::new(Vec::new());
    config.etcd = Some(EtcdDiscovery {
        client: EtcdConfig::new(vec![etcd_server.url.clone()]),
        prefix: DEFAULT_PREFIX.to_string(),
        allow: vec!["127.0.0.0/8".parse().expect("network")],
    });
    config.health_interval = Duration::from_millis(100);
    config.debug_headers = true;
    let gw = gateway(config);

    // No worker registered yet: the gateway is up but unavailable, and says so in OpenAI's shape.
    let mut up = false;
    for _ in 0..100 {
        if reqwest::get(format!("{gw}/health")).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "gateway never answered");
    let (status, _, body) = chat(&gw).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    // Both register (2 s leases) and both take traffic.
    let etcd = Etcd::new(vec![etcd_server.url.clone()]);
    let reg_a = Registration::start(etcd.clone(), DEFAULT_PREFIX, info(&a), 2)
        .await
        .expect("register a");
    let reg_b = Registration::start(etcd.clone(), DEFAULT_PREFIX, info(&b), 2)
        .await
        .expect("register b");
    until_listed(&gw, 2, Duration::from_secs(10)).await;
    let mut served = HashSet::new();
    for _ in 0..4 {
        let (status, by, body) = chat(&gw).await;
        assert_eq!(status, 200, "{body}");
        served.insert(by.expect("x-lastmile-worker"));
    }
    assert_eq!(served, HashSet::from([a.clone(), b.clone()]));

    // A stops keeping its lease alive (as a killed process would): it drops out once the lease
    // expires — the keep-alive ran every 0.67 s, so it was listed right up to then.
    drop(reg_a);
    let gone = until_listed(&gw, 1, Duration::from_secs(10)).await;
    assert!(
        gone >= Duration::from_millis(500),
        "left before its lease expired ({gone:?})"
    );
    for _ in 0..3 {
        let (status, by, body) = chat(&gw).await;
        assert_eq!((status, by.as_deref()), (200, Some(b.as_str())), "{body}");
    }

    // B deregisters (a graceful shutdown revokes its lease): it leaves at once.
    reg_b.deregister().await.expect("deregister b");
    let gone = until_listed(&gw, 0, Duration::from_secs(2)).await;
    assert!(gone < Duration::from_secs(1), "revocation took {gone:?}");
    let (status, _, body) = chat(&gw).await;
    assert_eq!(status, 503, "{body}");
    let (code, h) = health(&gw).await;
    assert_eq!((code, h["status"].as_str()), (503, Some("unavailable")));

    // A comes back under a new lease and serves again.
    let _reg_a = Registration::start(etcd, DEFAULT_PREFIX, info(&a), 2)
        .await
        .expect("register a again");
    until_listed(&gw, 1, Duration::from_secs(10)).await;
    let (status, by, body) = chat(&gw).await;
    assert_eq!((status, by.as_deref()), (200, Some(a.as_str())), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_fails_clearly_without_etcd() {
    let dead = common::dead_url();
    let err = Registration::start(
        Etcd::new(vec![dead.clone()]),
        DEFAULT_PREFIX,
        info("http://x"),
        2,
    )
    .await
    .err()
    .expect("no etcd there");
    assert_eq!(err.error_type(), "unreachable");
    assert!(err.to_string().contains(&dead), "{err}");
}

/// Only addresses on the allow-list join: a registration of any other address (whoever can
/// write to etcd could make one) is ignored, while an allowed one joins.
#[tokio::test]
async fn workers_outside_the_allow_list_never_join() {
    let etcd_server = EtcdServer::start().await;
    let mut config = GatewayConfig::new(Vec::new());
    config.etcd = Some(EtcdDiscovery {
        client: EtcdConfig::new(vec![etcd_server.url.clone()]),
        prefix: DEFAULT_PREFIX.to_string(),
        allow: vec!["127.0.0.2".parse().expect("address")],
    });
    config.health_interval = Duration::from_millis(100);
    let gw = gateway(config);
    let etcd = Etcd::new(vec![etcd_server.url.clone()]);
    let _evil = Registration::start(etcd.clone(), DEFAULT_PREFIX, info("http://127.0.0.1:9"), 5)
        .await
        .expect("register");
    let _good = Registration::start(etcd, DEFAULT_PREFIX, info("http://127.0.0.2:9"), 5)
        .await
        .expect("register");
    // The watch delivers registrations in the order etcd stored them: once the allowed one has
    // joined, the other one has been seen, and refused.
    let start = Instant::now();
    let h = loop {
        let (_, h) = health(&gw).await;
        if h["workers"].as_u64() >= Some(1) {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the allowed worker never joined: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        h["workers"], 1,
        "an address outside the allow-list joined: {h}"
    );
}
