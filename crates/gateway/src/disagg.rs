//! Conditional disaggregation: for a request routed to a decode worker, the gateway decides
//! whether its prompt is computed by a prefill worker first, and if so has one compute it and
//! hold its blocks, so the decode worker pulls them instead of computing (the flow is in
//! `lastmile_protocol::disagg`).
//!
//! The decision (as llm-d's and Dynamo's deciders make it): only when the part of the prompt
//! the decode worker does not hold (by the KV index) is at least
//! [`DisaggRouting::min_uncached_tokens`], and some prefill worker for the model is up and not
//! saturated; the prefill worker is chosen by the route's policy among prefill workers (with
//! `kv_aware`, the one already holding most of the prompt). Every failure of the prefill side
//! (unreachable, slow, 5xx, a bad reply) falls back to the decode worker computing the prompt
//! itself: the client never sees it. A 4xx about the request itself goes back to the client,
//! as the decode worker would have answered it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::response::Response;
use lastmile_http::metrics::{Exposition, Histogram};
use lastmile_protocol::disagg::INTERNAL_TOKEN_HEADER;
use lastmile_protocol::{ApiError, PrefillReply, PrefillRequest};
use lastmile_router::RouteRequest;

use crate::kv::PromptBlocks;
use crate::proxy::error_response;
use crate::workers::{json_capped, LIST_REPLY, SMALL_REPLY};
use crate::Gateway;

/// When and how requests are disaggregated.
#[derive(Debug, Clone)]
pub struct DisaggRouting {
    /// The secret gateways and workers share for KV transfer.
    pub internal_token: String,
    /// Disaggregate only when the decode worker would compute at least this many prompt
    /// tokens (shorter prompts cost less to compute than to move).
    pub min_uncached_tokens: usize,
    /// A prefill worker with more prompt tokens than this still to compute is saturated and
    /// gets no more prompts (the decode worker computes them).
    pub max_prefill_queue_tokens: usize,
    /// How long the gateway waits for a prefill before the decode worker computes the prompt.
    pub prefill_timeout: Duration,
}

impl DisaggRouting {
    /// Routing with `token`: prompts of 512 uncached tokens and more go to prefill workers with
    /// fewer than 8,192 queued, within 30 s.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            internal_token: token.into(),
            min_uncached_tokens: 512,
            max_prefill_queue_tokens: 8192,
            prefill_timeout: Duration::from_secs(30),
        }
    }
}

/// Where a request's prompt is computed.
pub(crate) enum Prefilled {
    /// By the decode worker.
    Local,
    /// By a prefill worker: the decode worker pulls from `source`.
    Remote {
        /// The KV source URL for the decode worker.
        source: String,
        /// The lease's URL (to release it if the decode worker never pulls).
        lease: String,
    },
}

/// Why a request was not disaggregated, or fell back (metric labels).
const LOCAL_REASONS: [&str; 3] = ["short_prompt", "no_prefill_worker", "saturated"];
const FALLBACK_REASONS: [&str; 4] = ["unreachable", "timeout", "server_error", "bad_reply"];
/// Bounds of the prefill duration histogram, seconds.
const PREFILL_BOUNDS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Disaggregation decisions and their outcomes.
pub(crate) struct DisaggMetrics {
    remote: AtomicU64,
    local: [AtomicU64; LOCAL_REASONS.len()],
    fallbacks: [AtomicU64; FALLBACK_REASONS.len()],
    client_errors: AtomicU64,
    prefill_seconds: Histogram,
}

impl Default for DisaggMetrics {
    fn default() -> Self {
        Self {
            remote: AtomicU64::new(0),
            local: Default::default(),
            fallbacks: Default::default(),
            client_errors: AtomicU64::new(0),
            prefill_seconds: Histogram::new(&PREFILL_BOUNDS),
        }
    }
}

impl DisaggMetrics {
    fn count(counters: &[AtomicU64], labels: &[&str], label: &str) {
        if let Some(i) = labels.iter().position(|l| *l == label) {
            counters[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the families (only when disaggregation is configured).
    pub(crate) fn write(&self, page: &mut Exposition) {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let labelled = |labels: &[&str], counters: &[AtomicU64]| {
            labels
                .iter()
                .zip(counters)
                .map(|(l, n)| (vec![("reason", (*l).to_string())], ld(n)))
                .collect::<Vec<_>>()
        };
        page.counter(
            "lastmile_gateway_disagg_remote_total",
            "Requests whose prompt a prefill worker computed for the decode worker.",
            ld(&self.remote),
        )
        .counters(
            "lastmile_gateway_disagg_local_total",
            "Requests whose decode worker computed the prompt by decision, by reason.",
            labelled(&LOCAL_REASONS, &self.local),
        )
        .counters(
            "lastmile_gateway_disagg_fallbacks_total",
            "Prefills that failed, so the decode worker computed the prompt, by reason.",
            labelled(&FALLBACK_REASONS, &self.fallbacks),
        )
        .counter(
            "lastmile_gateway_disagg_client_errors_total",
            "Requests a prefill worker refused as invalid (answered to the client).",
            ld(&self.client_errors),
        )
        .histogram(
            "lastmile_gateway_prefill_duration_seconds",
            "Time for a prefill worker to compute and hold a prompt.",
            &self.prefill_seconds,
        );
    }
}

/// Decides where the prompt of a request routed to a decode worker holding `overlap_blocks`
/// of it is computed, and has a prefill worker compute it when that is the decision. `Err` is
/// the client's answer (the prefill worker refused the request as invalid).
pub(crate) async fn prefill(
    gw: &Gateway,
    d: &DisaggRouting,
    path: &str,
    model: Option<&str>,
    blocks: &PromptBlocks,
    overlap_blocks: usize,
) -> Result<Prefilled, Response> {
    let m = &gw.metrics.disagg;
    let cached = (overlap_blocks * blocks.block_size).min(blocks.tokens);
    let uncached = blocks.tokens - cached;
    if uncached < d.min_uncached_tokens {
        DisaggMetrics::count(&m.local, &LOCAL_REASONS, "short_prompt");
        return Ok(Prefilled::Local);
    }
    let snapshot = gw
        .workers
        .prefill_snapshot(model, d.max_prefill_queue_tokens);
    if !snapshot.iter().any(|w| w.healthy) {
        let why = if gw.workers.any_prefill_worker(model) {
            "saturated"
        } else {
            "no_prefill_worker"
        };
        DisaggMetrics::count(&m.local, &LOCAL_REASONS, why);
        return Ok(Prefilled::Local);
    }
    let route = RouteRequest {
        prompt_hashes: &blocks.hashes,
        prompt_tokens: blocks.tokens,
        block_size: blocks.block_size,
    };
    let Some(choice) = gw.policy_for(model).select(&snapshot, &route, &gw.index()) else {
        DisaggMetrics::count(&m.local, &LOCAL_REASONS, "no_prefill_worker");
        return Ok(Prefilled::Local);
    };
    let id = choice.worker;
    let worker = gw.workers.get(id);
    let held_there = (choice.overlap_blocks * blocks.block_size).min(blocks.tokens);
    let _in_flight = gw.workers.start(id, blocks.tokens - held_there);
    let started = Instant::now();
    let sent = gw
        .workers
        .client
        .post(format!("{}/internal/prefill", worker.url))
        .header(INTERNAL_TOKEN_HEADER, &d.internal_token)
        .json(&PrefillRequest {
            tokens: blocks.ids.clone(),
        })
        .timeout(d.prefill_timeout)
        .send()
        .await;
    m.prefill_seconds.observe(started.elapsed().as_secs_f64());
    let fallback = |why: &str| {
        tracing::warn!(worker = %worker.url, reason = why, "prefill failed: the decode worker computes the prompt");
        DisaggMetrics::count(&m.fallbacks, &FALLBACK_REASONS, why);
        Prefilled::Local
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Ok(fallback("timeout")),
        Err(_) => {
            gw.workers.failed(id);
            return Ok(fallback("unreachable"));
        }
    };
    let status = resp.status();
    if status.is_client_error() && ![403, 404, 408, 429].contains(&status.as_u16()) {
        // The request itself is at fault (its prompt does not fit, say): the decode worker
        // would refuse it the same way.
        m.client_errors.fetch_add(1, Ordering::Relaxed);
        let body: serde_json::Value = json_capped(resp, SMALL_REPLY).await.unwrap_or_default();
        let e = &body["error"];
        let text = |k: &str| e[k].as_str().map(str::to_string);
        let api = ApiError {
            status: status.as_u16(),
            message: text("message").unwrap_or_else(|| "invalid request".into()),
            error_type: text("type").unwrap_or_else(|| "invalid_request_error".into()),
            param: text("param"),
            code: text("code"),
        };
        return Err(error_response(path, &api));
    }
    if !status.is_success() {
        return Ok(fallback("server_error"));
    }
    let Some(reply) = json_capped::<PrefillReply>(resp, LIST_REPLY).await else {
        return Ok(fallback("bad_reply"));
    };
    if reply.lease.is_empty() || !reply.lease.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(fallback("bad_reply"));
    }
    gw.workers.succeeded(id);
    m.remote.fetch_add(1, Ordering::Relaxed);
    let lease = format!("{}/internal/kv/{}", worker.url, reply.lease);
    Ok(Prefilled::Remote {
        source: format!("{lease}?from={overlap_blocks}"),
        lease,
    })
}

/// Releases a lease the decode worker never pulled (it failed before answering).
pub(crate) fn release(gw: &Gateway, d: &DisaggRouting, lease: String) {
    let post = gw
        .workers
        .client
        .delete(lease)
        .header(INTERNAL_TOKEN_HEADER, &d.internal_token)
        .timeout(Duration::from_secs(2));
    tokio::spawn(async move {
        let _ = post.send().await;
    });
}
