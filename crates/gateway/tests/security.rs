//! Security regressions at the gateway, through real HTTP with a real worker (the default
//! model): the usage ledger cannot be grown by made-up model names, and a blank admin key is
//! refused.

mod common;

use std::time::{Duration, Instant};

use common::{gateway, wait_healthy, worker, MODEL};
use lastmile_gateway::{GatewayConfig, TenantsConfig};
use serde_json::{json, Value};

const ADMIN: &str = "gateway-admin-key-for-tests";

fn temp_db(tag: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("lastmile-gw-security-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("usage.db")
}

/// A gateway with keys on (admin key `ADMIN`) in front of `workers`.
fn keyed_gateway(workers: Vec<String>, tag: &str) -> String {
    let mut config = GatewayConfig::new(workers);
    let mut tenants = TenantsConfig::new(temp_db(tag));
    tenants.admin_key = Some(ADMIN.into());
    config.tenants = Some(tenants);
    gateway(config)
}

/// Creates an API key; returns (id, secret).
async fn create_key(gw: &str) -> (String, String) {
    let v: Value = reqwest::Client::new()
        .post(format!("{gw}/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "tenant"}))
        .send()
        .await
        .expect("create key")
        .json()
        .await
        .expect("json");
    (
        v["id"].as_str().expect("id").into(),
        v["key"].as_str().expect("key").into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_recorded_under_served_models_only() {
    let w = worker();
    wait_healthy(&w).await;
    let gw = keyed_gateway(vec![w], "usage");
    wait_healthy(&gw).await;
    let (id, key) = create_key(&gw).await;
    let client = reqwest::Client::new();
    let chat = |model: String| {
        json!({"model": model, "max_tokens": 2, "temperature": 0,
               "messages": [{"role": "user", "content": "Hi"}]})
    };
    let made_up = "m".repeat(200_000);
    for model in [made_up.clone(), format!("{MODEL}-nope"), MODEL.to_string()] {
        let r = client
            .post(format!("{gw}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(model.clone()))
            .send()
            .await
            .expect("send");
        let expected = if model == MODEL { 200 } else { 404 };
        assert_eq!(
            r.status(),
            expected,
            "{}",
            r.text().await.unwrap_or_default()
        );
        r.bytes().await.expect("body");
    }
    // Every request is counted (the ledger is written as each answer ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let v: Value = client
            .get(format!("{gw}/admin/usage?key={id}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("json");
        if v["totals"]["requests"] == 3 {
            break v["data"].as_array().expect("rows").clone();
        }
        assert!(
            Instant::now() < deadline,
            "usage never counted 3 requests: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut deployments: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["deployment"].as_str().expect("deployment"),
                r["requests"].as_u64().expect("requests"),
            )
        })
        .collect();
    deployments.sort();
    assert_eq!(deployments, [("-", 2), (MODEL, 1)]);
}

#[test]
fn a_blank_admin_key_is_refused() {
    for blank in ["", "  \t"] {
        let mut config = GatewayConfig::new(vec!["http://127.0.0.1:1".into()]);
        let mut tenants = TenantsConfig::new(temp_db("blank"));
        tenants.admin_key = Some(blank.into());
        config.tenants = Some(tenants);
        let err = config.validate().expect_err("refused");
        assert!(err.to_string().contains("admin key is empty"), "{err}");
    }
}
