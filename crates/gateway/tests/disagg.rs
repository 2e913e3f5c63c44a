//! The gateway's disaggregation decisions with real in-process workers: a prompt stays on its
//! decode worker when no prefill worker is there or every one is saturated, and a prefill worker
//! that refuses the gateway (a token mismatch: misconfigured, or not ours) costs the client
//! nothing; each outcome is counted under its reason.

mod common;

use std::time::Duration;

use common::{gateway, metric, wait_healthy, worker_as, MODEL};
use lastmile_gateway::{DisaggRouting, GatewayConfig};
use lastmile_protocol::WorkerRole;
use lastmile_router::PolicyKind;
use lastmile_worker::DisaggConfig;
use serde_json::json;

const TOKEN: &str = "gateway-disagg-test-token";

fn role(role: WorkerRole, token: &str) -> String {
    worker_as(DisaggConfig {
        role,
        internal_token: Some(token.to_string()),
        ..DisaggConfig::default()
    })
}

/// A kv_aware gateway over `workers` that disaggregates prompts of 32+ uncached tokens.
async fn disaggregating(workers: &[&String], max_prefill_queue_tokens: usize) -> String {
    let mut config = GatewayConfig::new(workers.iter().map(|w| w.to_string()).collect());
    config.policy = PolicyKind::KvAware;
    config.health_interval = Duration::from_millis(50);
    config.disagg = Some(DisaggRouting {
        min_uncached_tokens: 32,
        max_prefill_queue_tokens,
        ..DisaggRouting::new(TOKEN)
    });
    let gw = gateway(config);
    wait_healthy(&gw).await;
    for w in workers {
        let series = format!("lastmile_gateway_worker_available{{worker=\"{w}\"}}");
        lastmile_testing::wait_until("the worker available", Duration::from_secs(10), || {
            let (gw, series) = (gw.clone(), series.clone());
            async move { (metric(&gw, &series).await == 1).then_some(()) }
        })
        .await;
    }
    gw
}

/// A chat whose prompt is a few hundred tokens; answered 200 with some text.
async fn ask(gw: &str, salt: u32) {
    let doc = format!("Note {salt}: the harbor lantern is copper. ").repeat(30);
    let body = json!({
        "model": MODEL,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "system", "content": doc}, {"role": "user", "content": "Colour?"}],
    });
    let resp = reqwest::Client::new()
        .post(format!("{gw}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.expect("json");
    assert!(answer["choices"][0]["message"]["content"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_stay_on_their_decode_worker_when_no_prefill_worker_can_take_them() {
    let decode = role(WorkerRole::Decode, TOKEN);
    let prefill = role(WorkerRole::Prefill, TOKEN);
    wait_healthy(&decode).await;
    wait_healthy(&prefill).await;
    // No prefill worker at all.
    let alone = disaggregating(&[&decode], 8192).await;
    ask(&alone, 1).await;
    let local = "lastmile_gateway_disagg_local_total{reason=\"no_prefill_worker\"}";
    assert_eq!(metric(&alone, local).await, 1);
    assert_eq!(
        metric(&alone, "lastmile_gateway_disagg_remote_total").await,
        0
    );
    // Every prefill worker saturated (a queue limit nothing fits under).
    let full = disaggregating(&[&decode, &prefill], 0).await;
    ask(&full, 2).await;
    let saturated = "lastmile_gateway_disagg_local_total{reason=\"saturated\"}";
    assert_eq!(metric(&full, saturated).await, 1);
    assert_eq!(metric(&prefill, "lastmile_kv_prefills_total").await, 0);
    // With room, the same pair splits the prompt, and the decode worker pulls it.
    let open = disaggregating(&[&decode, &prefill], 8192).await;
    ask(&open, 3).await;
    assert_eq!(
        metric(&open, "lastmile_gateway_disagg_remote_total").await,
        1
    );
    assert_eq!(metric(&prefill, "lastmile_kv_prefills_total").await, 1);
    assert!(metric(&decode, "lastmile_kv_blocks_imported_total").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_that_refuses_the_gateway_costs_the_client_nothing() {
    let decode = role(WorkerRole::Decode, TOKEN);
    let stranger = role(WorkerRole::Prefill, "another-deployments-token");
    wait_healthy(&decode).await;
    wait_healthy(&stranger).await;
    let gw = disaggregating(&[&decode, &stranger], 8192).await;
    ask(&gw, 4).await;
    let fallback = "lastmile_gateway_disagg_fallbacks_total{reason=\"server_error\"}";
    assert_eq!(metric(&gw, fallback).await, 1);
    assert_eq!(metric(&gw, "lastmile_gateway_disagg_remote_total").await, 0);
    assert_eq!(metric(&stranger, "lastmile_kv_prefills_total").await, 0);
    assert_eq!(metric(&decode, "lastmile_kv_pulls_total").await, 0);
}
