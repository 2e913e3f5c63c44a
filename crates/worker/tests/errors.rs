//! Bad input gets OpenAI's error object with the right status, and never disturbs other clients.

mod common;

use common::{post, server, MODEL};
use serde_json::{json, Value};

async fn raw(path: &str, body: &'static [u8]) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", server()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("error bodies are JSON"))
}

fn assert_error(status: u16, body: &Value, want: u16, needle: &str) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().expect("message").contains(needle),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_json_is_400() {
    let (s, b) = raw("/v1/chat/completions", b"{not json").await;
    assert_error(s, &b, 400, "Invalid JSON");
}

#[tokio::test]
async fn wrong_types_are_400() {
    let (s, b) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": "hello"}),
    )
    .await;
    assert_error(s, &b, 400, "Invalid JSON");
    let (s, b) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "max_tokens": "ten"}),
    )
    .await;
    assert_error(s, &b, 400, "Invalid JSON");
}

#[tokio::test]
async fn unknown_model_is_404_and_never_falls_back() {
    let (s, b) = post(
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_error(s, &b, 404, "gpt-4o");
    assert_eq!(b["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn prompt_beyond_context_is_400_with_numbers() {
    let (s, b) = post("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000})).await;
    assert_error(s, &b, 400, "8192");
    let msg = b["error"]["message"].as_str().expect("message");
    assert!(msg.contains("9000"), "{msg}");
    assert_eq!(b["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn out_of_range_sampling_values_are_400() {
    for (field, value) in [
        ("temperature", json!(2.5)),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("presence_penalty", json!(-3)),
        ("min_p", json!(2)),
    ] {
        let mut body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1});
        body[field] = value;
        let (s, b) = post("/v1/completions", body).await;
        assert_error(s, &b, 400, field);
        assert_eq!(b["error"]["param"], field);
    }
}

#[tokio::test]
async fn oversized_body_is_413() {
    let big = "a".repeat(100 * 1024);
    let (s, b) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": big}]}),
    )
    .await;
    assert_eq!(s, 413, "{b}");
    assert!(b["error"]["message"].is_string());
}

#[tokio::test]
async fn unknown_paths_and_methods_get_error_objects() {
    let r = reqwest::get(format!("{}/v1/nope", server()))
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.json::<Value>().await.expect("json")["error"]["message"].is_string());
    let r = reqwest::get(format!("{}/v1/chat/completions", server()))
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 405);
}

/// The KV feed's keep-alive period is bounded both ways: `0` would be a busy loop of
/// keep-alives, a huge one no keep-alive at all.
#[tokio::test]
async fn kv_feed_keepalive_out_of_range_is_400() {
    for bad in ["0", "99", "600001", "-5", "abc", "", "1e3"] {
        let r = reqwest::get(format!("{}/v1/kv/events?keepalive_ms={bad}", server()))
            .await
            .expect("get");
        let status = r.status().as_u16();
        let body: Value = r.json().await.expect("an error object");
        assert_error(status, &body, 400, "keepalive_ms");
        assert_eq!(body["error"]["param"], "keepalive_ms", "{bad:?}");
    }
}

#[tokio::test]
async fn out_of_vocabulary_token_ids_are_400() {
    let (s, b) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": [1, 2, 999999], "max_tokens": 1}),
    )
    .await;
    assert_error(s, &b, 400, "999999");
}

#[tokio::test]
async fn a_bad_request_does_not_disturb_a_running_stream() {
    let good = tokio::spawn(post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 30, "temperature": 0, "ignore_eos": true}),
    ));
    for _ in 0..10 {
        let (s, _) = raw("/v1/completions", b"{\"model\": 12").await;
        assert_eq!(s, 400);
    }
    let (s, b) = good.await.expect("task");
    assert_eq!(s, 200);
    assert_eq!(b["usage"]["completion_tokens"], 30);
}
