//! One streaming chat request, timed: when the first content arrived, the gaps between content
//! chunks, the end, and the token counts from the server's `usage` chunk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

/// The measurements of one request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestResult {
    /// Seconds from sending to the first content.
    pub ttft: Option<f64>,
    /// Seconds between consecutive content chunks.
    pub itl: Vec<f64>,
    /// Seconds from sending to the end of the stream.
    pub e2e: f64,
    /// Prompt tokens as the server counted them.
    pub prompt_tokens: u64,
    /// Generated tokens as the server counted them (chunks counted when it gives no usage).
    pub completion_tokens: u64,
    /// The failure, if the request failed.
    pub error: Option<String>,
    /// The generated text (kept for multi-turn workloads; not serialized).
    #[serde(skip)]
    pub text: String,
}

/// What to send.
pub(crate) struct ChatRequest<'a> {
    pub(crate) url: &'a str,
    pub(crate) model: &'a str,
    pub(crate) messages: &'a [serde_json::Value],
    pub(crate) max_tokens: usize,
    pub(crate) timeout: Duration,
    /// Incremented when the first content arrives.
    pub(crate) first_tokens: Option<&'a AtomicUsize>,
}

pub(crate) async fn stream_chat(client: &reqwest::Client, req: &ChatRequest<'_>) -> RequestResult {
    let start = Instant::now();
    let mut r = RequestResult {
        ttft: None,
        itl: Vec::new(),
        e2e: 0.0,
        prompt_tokens: 0,
        completion_tokens: 0,
        error: None,
        text: String::new(),
    };
    let body = serde_json::json!({
        "model": req.model, "messages": req.messages, "max_tokens": req.max_tokens,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    let outcome = tokio::time::timeout(req.timeout, async {
        let resp = send(client, req.url, &body).await?;
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let mut clock = StreamClock {
            start,
            last: None,
            chunks: 0,
        };
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| e.to_string())?;
            buf.push_str(&String::from_utf8_lossy(&piece));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for data in lastmile_protocol::parse_sse_data(&event) {
                    if data == "[DONE]" {
                        continue;
                    }
                    apply_chunk(&data, &mut r, &mut clock, req.first_tokens)?;
                }
            }
        }
        if r.completion_tokens == 0 {
            r.completion_tokens = clock.chunks;
        }
        Ok(())
    })
    .await;
    r.e2e = start.elapsed().as_secs_f64();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => r.error = Some(e),
        Err(_) => r.error = Some(format!("timed out after {:?}", req.timeout)),
    }
    r
}

/// Posts the chat completion `body` to `url`; a transport error or a non-success status (with
/// the body it came with) is an `Err`.
async fn send(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<reqwest::Response, String> {
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    Ok(resp)
}

/// When a stream started, when its last content arrived, and how many contents arrived.
struct StreamClock {
    start: Instant,
    last: Option<Instant>,
    chunks: u64,
}

/// Applies one SSE data payload to `r`: its usage, its content and the content's timing
/// (counting the first content in `first_tokens`); an error payload or a bad chunk is an `Err`.
fn apply_chunk(
    data: &str,
    r: &mut RequestResult,
    clock: &mut StreamClock,
    first_tokens: Option<&AtomicUsize>,
) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_str(data).map_err(|e| format!("bad chunk {data}: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!("stream error: {err}"));
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        r.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
        r.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
    }
    let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    if !content.is_empty() {
        let now = Instant::now();
        match clock.last {
            None => {
                r.ttft = Some((now - clock.start).as_secs_f64());
                if let Some(n) = first_tokens {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(prev) => r.itl.push((now - prev).as_secs_f64()),
        }
        clock.last = Some(now);
        clock.chunks += 1;
        r.text.push_str(content);
    }
    Ok(())
}
