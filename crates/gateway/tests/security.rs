//! Security regressions at the gateway, through real HTTP with a real worker (the default
//! model): the usage ledger cannot be grown by made-up model names; a blank admin key is
//! refused; `/metrics` needs a key when keys are on, and answers do not name their worker; and
//! a web page cannot drive an open gateway or worker on loopback (DNS rebinding, simple
//! cross-site POSTs).

mod common;

use std::time::{Duration, Instant};

use common::{gateway, wait_healthy, worker, MODEL};
use lastmile_gateway::{GatewayConfig, TenantsConfig};
use lastmile_router::PolicyKind;
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

const METRICS_KEY: &str = "metrics-scraper-key-for-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_key_and_answers_do_not_name_their_worker() {
    let w = worker();
    wait_healthy(&w).await;
    let mut config = GatewayConfig::new(vec![w.clone()]);
    let mut tenants = TenantsConfig::new(temp_db("metrics"));
    tenants.admin_key = Some(ADMIN.into());
    config.tenants = Some(tenants);
    config.metrics_key = Some(METRICS_KEY.into());
    let gw = gateway(config);
    wait_healthy(&gw).await;
    let (_, key) = create_key(&gw).await;
    let client = reqwest::Client::new();
    let metrics = |bearer: Option<&str>| {
        let mut r = client.get(format!("{gw}/metrics"));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        async move {
            let r = r.send().await.expect("metrics");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    for (who, bearer) in [("nobody", None), ("a tenant", Some(key.as_str()))] {
        let (status, body) = metrics(bearer).await;
        assert_eq!(status, 401, "{who}: {body}");
        assert!(!body.contains(&w), "{who} saw a worker address: {body}");
        let v: Value = serde_json::from_str(&body).expect("an error object");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    }
    for bearer in [ADMIN, METRICS_KEY] {
        let (status, body) = metrics(Some(bearer)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("lastmile_gateway"), "{body}");
    }
    let r = client
        .post(format!("{gw}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "max_tokens": 1,
                      "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-lastmile-worker").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_an_open_loopback_gateway_or_worker() {
    let w = worker();
    wait_healthy(&w).await;
    let gw = gateway(GatewayConfig::new(vec![w.clone()]));
    wait_healthy(&gw).await;
    let client = reqwest::Client::new();
    let chat = json!({"model": MODEL, "max_tokens": 1,
                      "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    for server in [&gw, &w] {
        // DNS rebinding: the page's own name arrives as Host.
        for (method, path) in [("POST", "/v1/chat/completions"), ("GET", "/v1/models")] {
            let r = client
                .request(method.parse().expect("method"), format!("{server}{path}"))
                .header("host", "rebound.example:8080")
                .header("content-type", "application/json")
                .body(chat.clone())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 403, "{server}{path}");
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["error"]["code"], "forbidden_host", "{v}");
        }
        // A simple cross-site POST (no preflight): text/plain, in each API's error shape.
        for path in ["/v1/chat/completions", "/v1/completions", "/v1/messages"] {
            let r = client
                .post(format!("{server}{path}"))
                .header("content-type", "text/plain")
                .body(chat.clone())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 415, "{server}{path}");
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            if path == "/v1/messages" {
                assert_eq!(v["type"], "error", "{v}");
            } else {
                assert_eq!(v["error"]["code"], "unsupported_media_type", "{v}");
            }
        }
        // What clients send passes: JSON, to 127.0.0.1 or localhost.
        let local = server.replace("127.0.0.1", "localhost");
        for base in [server.as_str(), local.as_str()] {
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .header("content-type", "application/json; charset=utf-8")
                .body(chat.clone())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200, "{base}");
        }
    }
}

/// The answer of `server` to `chat` sent with the prompt header `header`.
async fn chat_with_prompt_header(server: &str, chat: &Value, header: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{server}/v1/chat/completions"))
        .header(lastmile_worker::PROMPT_HEADER, header)
        .json(chat)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON")
}

/// A client cannot hand a worker prompt tokens of its own through the gateway (which would skip
/// the chat template and the quoting that keeps user text out of control tokens): the gateway
/// never forwards a client's `x-lastmile-prompt`, under `kv_aware` (which sends its own) or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_prompt_header_never_reaches_the_worker() {
    let w = worker();
    wait_healthy(&w).await;
    let card: lastmile_worker::PromptCard = reqwest::get(format!("{w}/internal/prompt-card"))
        .await
        .expect("card")
        .json()
        .await
        .expect("card JSON");
    let prompter = lastmile_worker::Prompter::from_card(card).expect("prompter");
    let chat = json!({"model": MODEL, "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let honest = prompter
        .tokens(lastmile_worker::Api::Chat, chat.to_string().as_bytes())
        .expect("prompt")
        .len();
    // Forged with the right fingerprint: 3 tokens the worker would take as the whole prompt.
    let forged = prompter.header(&[1, 2, 3]).expect("header");
    // A control: sent straight to the worker, it is taken (workers trust whoever reaches them).
    let direct = chat_with_prompt_header(&w, &chat, &forged).await;
    assert_eq!(direct["usage"]["prompt_tokens"], 3, "{direct}");
    for policy in [PolicyKind::KvAware, PolicyKind::RoundRobin] {
        let mut config = GatewayConfig::new(vec![w.clone()]);
        config.policy = policy;
        let gw = gateway(config);
        wait_healthy(&gw).await;
        let answer = chat_with_prompt_header(&gw, &chat, &forged).await;
        assert_eq!(
            answer["usage"]["prompt_tokens"], honest,
            "{policy:?}: {answer}"
        );
    }
}
