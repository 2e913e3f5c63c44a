//! Graceful drain: a gateway and its worker told to shut down while a stream runs through them
//! stop taking new connections, and the stream still finishes — every token, then `[DONE]`.

mod common;

use std::time::Duration;

use common::{gateway_until, wait_healthy, worker_until, MODEL};
use futures::StreamExt;
use lastmile_gateway::GatewayConfig;
use serde_json::{json, Value};

fn signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_streams_finish_when_gateway_and_worker_shut_down() {
    let (stop_worker, worker_stopped) = signal();
    let (stop_gateway, gateway_stopped) = signal();
    let w = worker_until(worker_stopped);
    wait_healthy(&w).await;
    let gw = gateway_until(GatewayConfig::new(vec![w.clone()]), gateway_stopped);
    wait_healthy(&gw).await;

    let resp = reqwest::Client::new()
        .post(format!("{gw}/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "max_tokens": 48, "ignore_eos": true, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Tell me about rivers."}]}),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    let mut text = String::from_utf8_lossy(&first).to_string();

    // Both are told to stop while the stream is under way.
    stop_gateway.send(()).expect("gateway running");
    stop_worker.send(()).expect("worker running");
    // The listener closes as the drain starts (polled: no fixed wait).
    let mut refused = false;
    for _ in 0..100 {
        refused = reqwest::Client::new()
            .get(format!("{gw}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_err();
        if refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a draining gateway takes no new connections");

    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream is not cut"),
        ));
    }
    let events = lastmile_protocol::parse_sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let usage = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 48);
}
