//! Sandboxes on the gateway's port, behind the gateway's keys (`lastmile gateway --sandboxes`),
//! spoken to over raw HTTP the way E2B's SDKs do: control plane, Connect-RPC with envelopes,
//! `/files`, and the header routing that keeps a sandbox's `/health` apart from the server's.

mod common;

use common::{api_key, start_listening, Proc};
use serde_json::{json, Value};

const ADMIN: &str = "gateway-admin-key-for-sandbox-tests";

async fn up(url: &str) {
    for _ in 0..300 {
        if reqwest::get(format!("{url}/v1/models")).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{url} never answered");
}

fn envelope(v: &Value) -> Vec<u8> {
    let payload = serde_json::to_vec(v).expect("json");
    let mut b = vec![0u8];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&payload);
    b
}

/// The JSON messages of a Connect stream, end-of-stream frame last.
fn messages(body: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 5 <= body.len() {
        let n =
            u32::from_be_bytes([body[at + 1], body[at + 2], body[at + 3], body[at + 4]]) as usize;
        let v = serde_json::from_slice(&body[at + 5..at + 5 + n]).expect("message json");
        out.push((body[at], v));
        at += 5 + n;
    }
    out
}

#[tokio::test]
async fn gateway_serves_sandboxes_on_its_port_behind_its_keys() {
    let db = tempfile_path("gw-sandboxes.db");
    let (_gw, url): (Proc, String) = start_listening(&[
        "gateway",
        "--worker",
        "http://127.0.0.1:9",
        "--sandboxes",
        "--admin-key",
        ADMIN,
        "--usage-db",
        &db,
    ]);
    up(&url).await;
    let http = reqwest::Client::new();

    // No key, a wrong key: 401 in the control plane's shape.
    let r = http
        .post(format!("{url}/v2/sandboxes"))
        .json(&json!({"templateID": "base"}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{url}/v2/sandboxes"))
        .header("x-api-key", "nope")
        .json(&json!({"templateID": "base"}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 401);

    // A key made by the admin works, sent as E2B's SDK sends it.
    let key = api_key(&url, ADMIN, "agent").await;
    let r = http
        .post(format!("{url}/v2/sandboxes"))
        .header("X-API-KEY", &key)
        .json(&json!({"templateID": "base", "timeout": 60, "envVars": {"GREETING": "hi"}}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.expect("created json");
    let id = created["sandboxID"].as_str().expect("id").to_string();
    let token = created["envdAccessToken"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(created["envdVersion"].as_str().expect("version") >= "0.5.7");

    let data = |path: &str| {
        http.post(format!("{url}{path}"))
            .header("E2b-Sandbox-Id", &id)
            .header("E2b-Sandbox-Port", "49983")
            .header("X-Access-Token", &token)
    };
    // A command, streamed: start, output, end.
    let body = data("/process.Process/Start")
        .header("content-type", "application/connect+json")
        .body(envelope(&json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo $GREETING; exit 3"]}})))
        .send()
        .await
        .expect("start")
        .bytes()
        .await
        .expect("body");
    let msgs = messages(&body);
    assert!(msgs[0].1["event"]["start"]["pid"].as_u64().expect("pid") > 0);
    let out: String = msgs
        .iter()
        .filter_map(|(_, m)| m["event"]["data"]["stdout"].as_str())
        .map(|b| {
            use base64::Engine;
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .expect("b64"),
            )
            .expect("utf8")
        })
        .collect();
    assert_eq!(out, "hi\n");
    let end = msgs
        .iter()
        .find_map(|(_, m)| m["event"].get("end"))
        .expect("end event");
    assert_eq!(end["exitCode"], 3);
    assert_eq!(
        msgs.last().expect("last").0,
        2,
        "the stream ends with an end-of-stream frame"
    );

    // Files: raw upload, raw download.
    let r = data("/files?path=/home/user/x.bin")
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 100_000])
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 200);
    let got = http
        .get(format!("{url}/files?path=/home/user/x.bin"))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(got.len(), 100_000);
    assert!(got.iter().all(|&b| b == 7));

    // A unary RPC error comes in Connect's shape.
    let r = data("/filesystem.Filesystem/Stat")
        .header("content-type", "application/json")
        .body(r#"{"path": "/nope"}"#)
        .send()
        .await
        .expect("stat");
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.expect("error json");
    assert_eq!(e["code"], "not_found");

    // The sandbox's /health and the gateway's are told apart by the headers alone.
    let sandbox_health = http
        .get(format!("{url}/health"))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("health");
    assert_eq!(sandbox_health.status(), 204);
    let gateway_health = http
        .get(format!("{url}/health"))
        .send()
        .await
        .expect("health");
    assert_ne!(gateway_health.status(), 204);
    // A wrong token opens nothing, and says no more than a missing sandbox would.
    let r = http
        .get(format!("{url}/health"))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", "0".repeat(64))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 502);

    // A DNS-rebinding page (its own name in `Host`) reaches neither plane; a cross-site form
    // post (not JSON) creates nothing.
    let r = http
        .post(format!("{url}/v2/sandboxes"))
        .header("X-API-KEY", &key)
        .header("host", "evil.example:80")
        .json(&json!({"templateID": "base"}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 403);
    let r = http
        .get(format!("{url}/files?path=/home/user/x.bin"))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .header("host", "evil.example")
        .send()
        .await
        .expect("download");
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{url}/v2/sandboxes"))
        .header("X-API-KEY", &key)
        .header("content-type", "text/plain")
        .body(r#"{"templateID": "base"}"#)
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 415);

    // Gone once, not found after.
    let kill = || {
        http.delete(format!("{url}/sandboxes/{id}"))
            .header("X-API-KEY", &key)
    };
    assert_eq!(kill().send().await.expect("kill").status(), 204);
    assert_eq!(kill().send().await.expect("kill").status(), 404);
}

fn tempfile_path(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("lastmile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name).to_string_lossy().into_owned()
}
