//! The KV transport seam: a decode worker given another transport than HTTP (here one that
//! serves KV streams from memory, as a shared-memory or RDMA transport would from its own
//! medium) pulls through it, imports what checks out, answers exactly as a worker that computed
//! the prompt, and releases the lease through it; a stream the transport cuts short is
//! recomputed, with the same answer.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use lastmile_engine::kv_transfer::encode_stream;
use lastmile_engine::{GenerateRequest, GenerationEvent, SamplingParams};
use lastmile_protocol::disagg::{INTERNAL_TOKEN_HEADER, KV_SOURCE_HEADER};
use lastmile_protocol::WorkerRole;
use lastmile_worker::{DisaggConfig, KvBytes, KvTransport, ServerConfig, TransportError};

const TOKEN: &str = "transport-test-token";

/// KV streams held in memory, by source name; records what was opened and released.
#[derive(Debug, Default)]
struct Memory {
    streams: HashMap<String, Vec<u8>>,
    opened: Mutex<Vec<String>>,
    released: Mutex<Vec<String>>,
}

impl KvTransport for Memory {
    fn open<'a>(&'a self, source: &'a str) -> BoxFuture<'a, Result<KvBytes, TransportError>> {
        self.opened.lock().expect("lock").push(source.to_string());
        let bytes = self.streams.get(source).cloned();
        Box::pin(async move {
            let bytes = bytes.ok_or(TransportError::Refused)?;
            // In pieces that cut frames anywhere, as a network would.
            let pieces: Vec<Result<Bytes, TransportError>> = bytes
                .chunks(100_003)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Ok(futures::stream::iter(pieces).boxed())
        })
    }

    fn release(&self, source: &str) {
        self.released.lock().expect("lock").push(source.to_string());
    }
}

fn prompt(salt: u32) -> Vec<u32> {
    (0..300u32).map(|i| 300 + (i * 53 + salt) % 8000).collect()
}

async fn complete(url: &str, prompt: &[u32], source: Option<&str>) -> String {
    let body = serde_json::json!({
        "model": common::MODEL,
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
    });
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body);
    if let Some(s) = source {
        req = req
            .header(KV_SOURCE_HEADER, s)
            .header(INTERNAL_TOKEN_HEADER, TOKEN);
    }
    let resp = req.send().await.expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let v: serde_json::Value = resp.json().await.expect("json");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_goes_through_the_transport_it_is_given() {
    // The prefill side: an engine computes two prompts and holds their blocks.
    let prefill = common::engine();
    let mut wires = Vec::new();
    for salt in [1, 2] {
        let mut s = prefill
            .submit(GenerateRequest::new(
                prompt(salt),
                SamplingParams::greedy(),
                1,
            ))
            .expect("submit");
        while let Some(ev) = s.next().await {
            if let GenerationEvent::Failed(e) = ev {
                panic!("{e}");
            }
        }
        let (held, blocks) = prefill.hold_prefix(prompt(salt)).await.expect("hold");
        assert_eq!(held.blocks, 18);
        wires.push(encode_stream(&prefill.kv_layout(common::MODEL), 0, &blocks));
    }
    let mut memory = Memory::default();
    memory
        .streams
        .insert("mem://whole".into(), wires[0].clone());
    let cut = wires[1].len() * 2 / 3;
    memory
        .streams
        .insert("mem://cut".into(), wires[1][..cut].to_vec());
    let memory = Arc::new(memory);

    let decode_engine = common::engine();
    let stats_of = decode_engine.clone();
    let imported = || {
        stats_of
            .stats()
            .kv_blocks_imported
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let decode = common::start(
        decode_engine,
        ServerConfig {
            model_id: common::MODEL.to_string(),
            max_body_bytes: 64 * 1024,
            startup_ms: Vec::new(),
            disagg: DisaggConfig {
                role: WorkerRole::Decode,
                internal_token: Some(TOKEN.into()),
                transport: Some(memory.clone()),
                ..DisaggConfig::default()
            },
        },
    );

    // The whole stream: every held block arrives through the transport, and the answer is the
    // one a worker that computes the prompt itself gives.
    let expected = complete(common::server(), &prompt(1), None).await;
    assert_eq!(
        complete(&decode, &prompt(1), Some("mem://whole")).await,
        expected
    );
    assert_eq!(imported(), 18, "every held block was imported");

    // A stream cut short: what arrived whole is kept, the rest computed; same answer.
    let expected = complete(common::server(), &prompt(2), None).await;
    assert_eq!(
        complete(&decode, &prompt(2), Some("mem://cut")).await,
        expected
    );
    let partial = imported() - 18;
    assert!(
        (1..18).contains(&partial),
        "only the whole frames were imported: {partial}"
    );
    let failures = lastmile_testing::metric_value(
        &decode,
        "lastmile_kv_pull_failures_total{reason=\"truncated\"}",
    )
    .await;
    assert_eq!(failures, Some(1.0));
    assert_eq!(
        *memory.opened.lock().expect("lock"),
        ["mem://whole", "mem://cut"],
        "every pull opened its source through the transport"
    );
    assert_eq!(
        *memory.released.lock().expect("lock"),
        ["mem://whole", "mem://cut"],
        "and released it through the transport"
    );
}
