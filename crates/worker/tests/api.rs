//! The OpenAI API with the real model over real HTTP: replies, streaming framing, usage,
//! concurrency, cancellation, and the operational endpoints.

mod common;

use common::{metric, post, post_stream, server, MODEL};
use serde_json::{json, Value};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn chat_completion_answers_with_usage() {
    let (status, body) = post(
        "/v1/chat/completions",
        chat(
            "What is the capital of France?",
            json!({"max_tokens": 24, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().expect("content");
    assert!(!text.is_empty());
    assert!(
        !text.contains("<|im_end|>"),
        "special tokens must not leak: {text:?}"
    );
    let usage = &body["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().expect("p"),
        usage["completion_tokens"].as_u64().expect("c"),
    );
    assert!(p > 10 && (1..=24).contains(&c));
    assert_eq!(usage["total_tokens"].as_u64(), Some(p + c));
    let reason = choice["finish_reason"].as_str().expect("reason");
    assert!(
        reason == "stop" || (reason == "length" && c == 24),
        "{reason} after {c} tokens"
    );
}

#[tokio::test]
async fn greedy_completion_continues_the_prompt() {
    let (status, body) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let text = body["choices"][0]["text"].as_str().expect("text");
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn token_id_prompts_are_accepted() {
    let ids: Vec<u32> = vec![504, 3575, 282, 4649, 314]; // "The capital of France is"
    let (status, body) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 5);
}

#[tokio::test]
async fn streaming_chat_is_framed_like_openai() {
    let events = post_stream(
        "/v1/chat/completions",
        chat("Count from one to five.", json!({"max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json chunk"))
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "role delta first"
    );
    let mut text = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
        if let Some(choice) = c["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finish = Some(choice["finish_reason"].clone());
            }
        }
    }
    let last = chunks.last().expect("usage chunk");
    assert_eq!(
        last["choices"].as_array().map(Vec::len),
        Some(0),
        "usage chunk has no choices"
    );
    let completion = last["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!(finish.is_some());
    assert!(!text.is_empty());
    // Same request without streaming gives the same text (greedy).
    let (_, whole) = post(
        "/v1/chat/completions",
        chat(
            "Count from one to five.",
            json!({"max_tokens": 12, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(
        whole["choices"][0]["message"]["content"].as_str(),
        Some(text.as_str())
    );
    assert_eq!(
        whole["usage"]["completion_tokens"].as_u64(),
        Some(completion)
    );
}

#[tokio::test]
async fn streaming_completion_without_usage_omits_it() {
    let events = post_stream("/v1/completions", json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "stream": true, "temperature": 0})).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).expect("json");
        assert_eq!(c["object"], "text_completion");
        assert!(
            c.get("usage").is_none(),
            "usage must be absent when not requested: {c}"
        );
    }
}

#[tokio::test]
async fn eight_concurrent_streams_are_independent_and_correct() {
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Write the number {i} in words, then a short sentence about it."))
        .collect();
    // Reference: each prompt alone.
    let mut solo = Vec::new();
    for p in &prompts {
        let (_, b) = post(
            "/v1/chat/completions",
            chat(p, json!({"max_tokens": 16, "temperature": 0})),
        )
        .await;
        solo.push(
            b["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string(),
        );
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let body = chat(
                p,
                json!({"max_tokens": 16, "temperature": 0, "stream": true}),
            );
            tokio::spawn(async move {
                let events = post_stream("/v1/chat/completions", body).await;
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                events[..events.len() - 1]
                    .iter()
                    .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                    .filter_map(|c| {
                        c["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect::<String>()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let text = t.await.expect("task");
        assert_eq!(text, solo[i], "stream {i} differs from its solo run");
    }
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_blocks_and_others_finish() {
    use futures::StreamExt;
    let client = reqwest::Client::new();
    let other = tokio::spawn(post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "List ten fruits:", "max_tokens": 40, "temperature": 0, "ignore_eos": true}),
    ));
    let resp = client
        .post(format!("{}/v1/completions", server()))
        .json(&json!({"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 4000, "stream": true, "ignore_eos": true}))
        .send()
        .await
        .expect("request");
    let mut body = resp.bytes_stream();
    let mut got = 0;
    while let Some(chunk) = body.next().await {
        got += chunk.expect("chunk").len();
        if got > 400 {
            break;
        }
    }
    drop(body); // disconnect mid-stream
    let (status, b) = other.await.expect("other request");
    assert_eq!(status, 200);
    assert_eq!(b["usage"]["completion_tokens"], 40);
    // The abandoned request stops and its blocks return to the pool.
    // Other tests share the server, so allow for their sequences to drain too; without
    // cancellation the abandoned request alone would run for a minute.
    let mut freed = false;
    for _ in 0..400 {
        if metric("lastmile_running_sequences").await == 0.0
            && metric("lastmile_kv_blocks_used").await == 0.0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(freed, "the cancelled request's blocks were not freed");
    assert!(
        metric("lastmile_generation_tokens_total").await < 4000.0,
        "the cancelled request kept generating"
    );
}

#[tokio::test]
async fn same_seed_same_output_and_stop_strings_are_cut() {
    let body = json!({"model": MODEL, "prompt": "My favourite colours are", "max_tokens": 20, "temperature": 1.0, "seed": 1234});
    let (_, a) = post("/v1/completions", body.clone()).await;
    let (_, b) = post("/v1/completions", body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Greedy text, then the same request stopped at a string inside it.
    let (_, full) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    let full = full["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(full.contains(" 7,"), "{full:?}");
    let (_, cut) = post("/v1/completions", json!({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": [" 7,"]})).await;
    assert_eq!(
        cut["choices"][0]["text"].as_str(),
        Some(&full[..full.find(" 7,").expect("stop")])
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
}

/// Gateway API Inference Extension endpoint pickers read vLLM's gauge names; the worker
/// exports them from the same engine state as its own.
#[tokio::test]
async fn metrics_carry_the_vllm_gauges_endpoint_pickers_read() {
    post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    let resp = reqwest::get(format!("{}/metrics", server()))
        .await
        .expect("metrics");
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = resp.text().await.expect("text");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {name} gauge\n")),
            "{name} is a gauge"
        );
    }
    // One page reads the engine once: both names agree.
    assert_eq!(
        value("vllm:num_requests_waiting"),
        value("lastmile_waiting_sequences")
    );
    assert_eq!(
        value("vllm:num_requests_running"),
        value("lastmile_running_sequences")
    );
    let usage = value("vllm:kv_cache_usage_perc");
    let (used, total) = (
        value("lastmile_kv_blocks_used"),
        value("lastmile_kv_blocks_total"),
    );
    assert!(total > 0.0);
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    assert!(
        (usage - used / total).abs() < 1e-9,
        "{usage} vs {used}/{total}"
    );
}

#[tokio::test]
async fn models_health_and_metrics() {
    let models: Value = reqwest::get(format!("{}/v1/models", server()))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    let health = reqwest::get(format!("{}/health", server()))
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
    let health: Value = health.json().await.expect("health json");
    assert_eq!(health["device"]["device"], "cpu", "{health}");
    assert!(health["device"]["memory_total_bytes"].is_null(), "{health}");
    post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    let text = reqwest::get(format!("{}/metrics", server()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "lastmile_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "lastmile_prompt_tokens_total",
        "lastmile_generation_tokens_total",
        "lastmile_time_to_first_token_seconds_bucket",
        "lastmile_inter_token_latency_seconds_bucket",
        "lastmile_running_sequences",
        "lastmile_waiting_sequences",
        "lastmile_kv_blocks_used",
        "lastmile_kv_blocks_cached",
        "lastmile_prefix_cache_hit_rate",
        "lastmile_prefix_cache_hit_tokens_total",
        "lastmile_device_info{device=\"cpu\"} 1",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    assert!(metric("lastmile_generation_tokens_total").await >= 2.0);
}

#[tokio::test]
async fn kv_events_stream_reports_stored_blocks() {
    use futures::StreamExt;
    let resp = reqwest::get(format!("{}/v1/kv/events", server()))
        .await
        .expect("events");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    // A fresh prompt of 40+ tokens fills at least two blocks, which become cached.
    let prompt =
        "Unique words for the event test: zebra quartz violin meadow copper lantern. ".repeat(4);
    let (status, _) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !text.contains("\"stored\"") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("an event in time");
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("open").expect("chunk"),
        ));
    }
    let first = lastmile_protocol::parse_sse_data(&text);
    let ev: Value = serde_json::from_str(&first[0]).expect("json event");
    assert_eq!(ev["type"], "stored");
    assert!(ev["hash"].is_u64());
}
