//! The agent-facing API on the wire, where SDKs would hide details: streamed tool calls never leak
//! markup and arrive as indexed fragments, `n` streams interleave well-formed per-choice chunks,
//! constrained output holds at high temperature, and the Anthropic endpoints frame events and
//! errors exactly as Anthropic does.

mod common;

use common::{post, post_stream, post_text, MODEL};
use lastmile_worker::{Api, PromptCard, Prompter, PROMPT_HEADER};
use serde_json::{json, Value};

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}})
}

fn chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect()
}

#[tokio::test]
async fn streamed_forced_calls_are_fragments_without_markup() {
    let data = post_stream(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Rome?"}],
               "tools": [weather_tool()], "tool_choice": "required", "max_tokens": 80,
               "temperature": 1.0, "seed": 9, "stream": true}),
    )
    .await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut args: Vec<String> = Vec::new();
    let mut finish = Vec::new();
    for c in chunks(&data) {
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        let content = delta["content"].as_str().unwrap_or("");
        assert!(!content.contains("tool_call"), "markup leaked: {content:?}");
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().expect("index") as usize;
            if tc.get("id").is_some() {
                assert_eq!(i, args.len(), "calls are numbered in order");
                assert_eq!(tc["type"], "function");
                assert_eq!(tc["function"]["name"], "get_weather");
                args.push(String::new());
            }
            args[i].push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            finish.push(r.to_string());
        }
    }
    assert!(!args.is_empty());
    for a in &args {
        let v: Value = serde_json::from_str(a).expect("arguments are JSON");
        assert!(v["city"].is_string(), "{v}");
    }
    // A call cut off by max_tokens is dropped, so the answer ends as tool_calls or length.
    assert!(
        finish == ["tool_calls"] || finish == ["length"],
        "{finish:?}"
    );
}

#[tokio::test]
async fn n_streams_carry_one_choice_per_chunk() {
    let data = post_stream(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "n": 3,
               "temperature": 1.0, "seed": 4, "stream": true, "logprobs": 1}),
    )
    .await;
    let mut finished = [0; 3];
    let mut tokens = [0; 3];
    for c in chunks(&data) {
        let choices = c["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 1, "{c}");
        let i = choices[0]["index"].as_u64().expect("index") as usize;
        if choices[0]["finish_reason"].is_string() {
            finished[i] += 1;
        } else {
            tokens[i] += choices[0]["logprobs"]["tokens"]
                .as_array()
                .expect("logprobs")
                .len();
        }
    }
    assert_eq!(finished, [1, 1, 1]);
    assert_eq!(tokens, [6, 6, 6]);
}

#[tokio::test]
async fn constrained_choice_and_schema_hold_at_high_temperature() {
    for seed in 0..3 {
        let (status, body) = post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Pick a colour."}],
                   "guided_choice": ["red", "green", "blue"], "temperature": 2.0, "seed": seed,
                   "max_tokens": 10}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .expect("text");
        assert!(["red", "green", "blue"].contains(&text), "{text:?}");
    }
    let (status, body) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
               "response_format": {"type": "json_schema",
                   "json_schema": {"name": "bad", "schema": {"type": "object", "properties": 3}}}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "response_format");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    for (field, value) in [
        ("guided_regex", json!("(unclosed")),
        // Compiles, but admits no output at all.
        ("guided_grammar", json!("start: a\na: a")),
    ] {
        let mut req = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
        req[field] = value;
        let (status, body) = post("/v1/completions", req).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], field, "{body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            !message.contains('\n'),
            "one line, no parser dump: {message:?}"
        );
    }
}

#[tokio::test]
async fn anthropic_stream_frames_named_events() {
    let (status, text) = post_text(
        "/v1/messages",
        json!({"model": MODEL, "max_tokens": 6, "stream": true, "temperature": 0,
               "messages": [{"role": "user", "content": "Hello"}]}),
    )
    .await;
    assert_eq!(status, 200);
    let mut names = Vec::new();
    for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut lines = frame.lines();
        let event = lines
            .next()
            .and_then(|l| l.strip_prefix("event: "))
            .expect("event line");
        let data: Value = serde_json::from_str(
            lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .expect("data line"),
        )
        .expect("data is JSON");
        assert_eq!(data["type"], event, "event name matches its payload type");
        names.push(event.to_string());
    }
    assert_eq!(names[..2], ["message_start", "ping"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(names.iter().filter(|n| *n == "content_block_delta").count() >= 1);
}

#[tokio::test]
async fn anthropic_errors_use_anthropic_shape() {
    let cases = [
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "not_found_error",
        ),
        (
            json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
            400,
            "invalid_request_error",
        ),
        (
            json!({"model": MODEL, "max_tokens": 2, "temperature": 3, "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_request_error",
        ),
    ];
    for (body, want_status, want_type) in cases {
        let (status, resp) = post("/v1/messages", body.clone()).await;
        assert_eq!(status, want_status, "{body} -> {resp}");
        assert_eq!(resp["type"], "error");
        assert_eq!(resp["error"]["type"], want_type, "{resp}");
        assert!(resp["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (status, resp) = post(
        "/v1/messages/count_tokens",
        json!({"model": MODEL, "messages": []}),
    )
    .await;
    assert_eq!(status, 400, "{resp}");
    assert_eq!(resp["type"], "error");
}

/// Sends `body` to `path` with the prompt header `header`.
async fn post_with_prompt(path: &str, body: &Value, header: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", common::server()))
        .header(PROMPT_HEADER, header)
        .json(body)
        .send()
        .await
        .expect("sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON answer"))
}

#[tokio::test]
async fn a_prompt_card_rebuilds_the_workers_prompts_and_its_tokens_are_not_tokenized_again() {
    let card: PromptCard = reqwest::get(format!("{}/internal/prompt-card", common::server()))
        .await
        .expect("card")
        .json()
        .await
        .expect("card JSON");
    assert_eq!(card.block_size, 16);
    let fingerprint = card.fingerprint.clone();
    let prompter = Prompter::from_card(card).expect("the card rebuilds");
    // Chat with tools, Anthropic messages, and a raw completion: the same prompt as the worker's.
    let chat = json!({"model": MODEL, "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "system", "content": "You are a careful assistant. ".repeat(6)},
                     {"role": "user", "content": "Name a colour. <|im_end|>"}],
        "tools": [weather_tool()]});
    let tokens = prompter
        .tokens(Api::Chat, chat.to_string().as_bytes())
        .expect("chat prompt");
    let (status, answer) = post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], tokens.len());
    let messages = json!({"model": MODEL, "max_tokens": 2,
        "messages": [{"role": "user", "content": "Name a colour."}]});
    let (_, answer) = post("/v1/messages", messages.clone()).await;
    let n = prompter
        .tokens(Api::Messages, messages.to_string().as_bytes())
        .expect("messages prompt")
        .len();
    assert_eq!(answer["usage"]["input_tokens"], n);
    // The tokens in the header give the same answer as tokenizing.
    let header = prompter.header(&tokens).expect("header");
    assert!(header.starts_with(&format!("{fingerprint}:")));
    let (status, with) = post_with_prompt("/v1/chat/completions", &chat, &header).await;
    assert_eq!(status, 200, "{with}");
    assert_eq!(with["choices"], answer_of(&chat).await["choices"]);
    // The worker uses them as they are: a shorter prompt under the right fingerprint is what it
    // computes (the gateway is trusted with this header; see the prompt module).
    let short = prompter.header(&tokens[..5]).expect("header");
    let (status, used) = post_with_prompt("/v1/chat/completions", &chat, &short).await;
    assert_eq!(status, 200, "{used}");
    assert_eq!(used["usage"]["prompt_tokens"], 5);
    // A foreign fingerprint, ids outside the vocabulary, or garbage: tokenized again.
    let foreign = format!("0123{}", &short[4..]);
    let outside = format!("{fingerprint}://///w");
    for bad in [foreign.as_str(), outside.as_str(), "nonsense", ":"] {
        let (status, again) = post_with_prompt("/v1/chat/completions", &chat, bad).await;
        assert_eq!(status, 200, "{bad}: {again}");
        assert_eq!(again["usage"]["prompt_tokens"], tokens.len(), "{bad}");
    }
    // Raw completions too.
    let completion = json!({"model": MODEL, "max_tokens": 1, "prompt": "Once upon a time"});
    let ids = prompter
        .tokens(Api::Completions, completion.to_string().as_bytes())
        .expect("completion prompt");
    let header = prompter.header(&ids[..2]).expect("header");
    let (status, used) = post_with_prompt("/v1/completions", &completion, &header).await;
    assert_eq!(status, 200, "{used}");
    assert_eq!(used["usage"]["prompt_tokens"], 2);
}

async fn answer_of(body: &Value) -> Value {
    post("/v1/chat/completions", body.clone()).await.1
}
