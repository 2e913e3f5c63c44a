//! A worker that never ends its bodies (broken, or hostile) against the gateway: its health
//! report, its prefix cache snapshot and its KV event feed are each read up to a cap and given
//! up past it, not buffered without end. The worker here is a stand-in (a raw HTTP server that
//! streams forever), since no real worker misbehaves this way; the gateway is real.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::gateway;
use lastmile_gateway::GatewayConfig;
use lastmile_router::PolicyKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the stand-in answers on a path.
#[derive(Clone, Copy)]
enum Answer {
    /// This JSON, whole.
    Json(&'static str),
    /// A chunked body of `content_type` that repeats `unit` until the reader hangs up.
    Endless(&'static str, &'static str),
}

/// A stand-in worker answering `routes` (path without its query) and counting the requests per
/// path: its URL and the counts.
async fn stand_in(
    routes: Vec<(&'static str, Answer)>,
) -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let counts = Arc::new(Mutex::new(HashMap::new()));
    let seen = counts.clone();
    let routes: Arc<HashMap<&'static str, Answer>> = Arc::new(routes.into_iter().collect());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("/");
                let path = target.split('?').next().unwrap_or("/").to_string();
                *seen
                    .lock()
                    .expect("counts")
                    .entry(path.clone())
                    .or_insert(0) += 1;
                match routes.get(path.as_str()) {
                    Some(Answer::Json(body)) => {
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(reply.as_bytes()).await;
                    }
                    Some(Answer::Endless(kind, unit)) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                        );
                        let data = unit.repeat((64 << 10) / unit.len());
                        let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                        let mut out = conn.write_all(head.as_bytes()).await;
                        while out.is_ok() {
                            out = conn.write_all(chunk.as_bytes()).await;
                        }
                    }
                    None => {
                        let _ = conn
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                }
            });
        }
    });
    (url, counts)
}

fn count(counts: &Mutex<HashMap<String, usize>>, path: &str) -> usize {
    counts
        .lock()
        .expect("counts")
        .get(path)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_worker_bodies_are_given_up_not_buffered() {
    const HEALTHY: &str = r#"{"status":"ok","model":"stand-in","running":0,"waiting":0}"#;
    // A: its health report and its snapshot never end. B: healthy, an empty snapshot, and a KV
    // event feed that sends one frame that never ends.
    let (a, a_seen) = stand_in(vec![
        ("/health", Answer::Endless("application/json", "[1,")),
        ("/v1/kv/events", Answer::Json("")),
        ("/v1/kv/blocks", Answer::Endless("application/json", "1,")),
    ])
    .await;
    let (b, b_seen) = stand_in(vec![
        ("/health", Answer::Json(HEALTHY)),
        (
            "/v1/kv/blocks",
            Answer::Json(r#"{"block_size":16,"hashes":[]}"#),
        ),
        (
            "/v1/kv/events",
            Answer::Endless("text/event-stream", "data: x"),
        ),
    ])
    .await;
    let mut config = GatewayConfig::new(vec![a, b]);
    config.policy = PolicyKind::KvAware;
    let _gw = gateway(config);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Each endless body is cut at its cap within moments, and asked for again at the next turn
    // (health every 200 ms, the feed after half a second). A gateway that buffered them would
    // still be reading the first ones: the health check until its 2 s timeout, the snapshot
    // until its 5 s one, the feed forever.
    let health = count(&a_seen, "/health");
    assert!(health >= 6, "{health} health checks of A in 4 s");
    let snapshots = count(&a_seen, "/v1/kv/blocks");
    assert!(
        snapshots >= 3,
        "{snapshots} snapshots of A asked for in 4 s"
    );
    let feeds = count(&b_seen, "/v1/kv/events");
    assert!(feeds >= 3, "{feeds} subscriptions to B's feed in 4 s");
}
