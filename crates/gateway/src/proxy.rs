//! Forwarding one request: pick a worker by policy, send the body, and relay the answer —
//! whole or streamed — byte for byte. A worker that cannot be reached, or that drops the
//! connection before its response head (it died while working), is marked failed and the request
//! goes to another; once a worker has answered, its answer is the client's (with
//! `debug_headers`, the `x-lastmile-worker` header names it), and if it dies in the middle of a stream the client gets
//! a final error event. When the client goes away the relayed
//! stream is dropped, which closes the connection to the worker and cancels the generation there.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use lastmile_protocol::anthropic::AnthropicError;
use lastmile_protocol::{ApiError, StreamMeter, TokenReservation, TokenUsage};
use lastmile_router::{PolicyKind, RouteRequest};

use crate::activator::Released;
use crate::disagg::{self, Prefilled};
use crate::{kv, Gateway};
use lastmile_protocol::disagg::{INTERNAL_TOKEN_HEADER, KV_SOURCE_HEADER};

/// The error response for `path`, in Anthropic's shape on the Anthropic endpoints.
pub(crate) fn error_response(path: &str, e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = if path.starts_with("/v1/messages") {
        (status, axum::Json(AnthropicError::from(e.clone()).body())).into_response()
    } else {
        (status, axum::Json(e.body())).into_response()
    };
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The request body, up to `limit` bytes; else the error response for `path` (413 beyond the
/// limit, 400 when the body failed to arrive, e.g. the client aborted).
async fn read_body(path: &str, body: Body, limit: usize) -> Result<Bytes, Response> {
    lastmile_http::read_body(body, limit)
        .await
        .map_err(|e| error_response(path, &e))
}

/// Proxies a POST to the same path on a worker: authenticates the caller and admits the
/// request against its quotas first (with tenants), and meters what the answer used.
pub(crate) async fn forward(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let caller = match gw.tenants.as_ref().map(|t| t.authenticate(req.headers())) {
        None => None,
        Some(Ok(caller)) => Some(caller),
        Some(Err(e)) => return error_response(&path, &e),
    };
    let body = match read_body(&path, req.into_body(), gw.config.max_body_bytes).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let facts = RequestFacts::of(&body);
    let model = facts.model.as_deref();
    let admission = match (&gw.tenants, caller) {
        (Some(t), Some(caller)) => {
            // Read as the worker reads it; counting tokens generates none; other paths reserve
            // the default.
            let cost = TokenReservation::of(&path, &body).unwrap_or(TokenReservation {
                output_tokens: (!path.ends_with("/count_tokens")).then_some(0),
                ..TokenReservation::NONE
            });
            match t.admit(
                caller,
                gw.usage_deployment(model),
                cost,
                gw.context_length(model),
            ) {
                Ok(a) => Some(a),
                Err(refusal) => {
                    let mut resp = error_response(&path, &refusal.error);
                    if let Some(secs) = refusal.retry_after {
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                    }
                    return resp;
                }
            }
        }
        _ => None,
    };
    let mut upstream = std::time::Duration::ZERO;
    let resp = relay(&gw, &path, body, model, &mut upstream).await;
    gw.metrics
        .observe_overhead(started.elapsed().saturating_sub(upstream));
    match admission {
        Some(a) => metered(resp, a),
        None => resp,
    }
}

/// What the gateway reads from a request body for routing (the rest is the worker's business;
/// quotas read it with [`TokenReservation`], as the worker does).
#[derive(serde::Deserialize, Default)]
struct RequestFacts {
    model: Option<String>,
}

impl RequestFacts {
    /// The facts of a JSON body (none of a body that is not JSON: the worker rejects it).
    fn of(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or_default()
    }
}

/// `resp` with its usage fed to `admission`: from the usage header of a whole answer, or read
/// from the stream as it is relayed (its final usage comment, or, cut short, the prompt and the
/// pieces relayed); the admission settles when the body is done or dropped.
fn metered(resp: Response, mut admission: crate::tenants::Admission) -> Response {
    admission.succeeded = resp.status().is_success();
    admission.usage = resp
        .headers()
        .get(lastmile_protocol::USAGE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TokenUsage::from_header);
    if admission.usage.is_some() || !admission.succeeded {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    admission.stream = Some(StreamMeter::default());
    let stream = body.into_data_stream().map(move |chunk| {
        // The whole admission lives in the stream (a closure would otherwise capture only the
        // field it names, and the admission would settle before the stream is done).
        let admission = &mut admission;
        if let (Ok(bytes), Some(meter)) = (&chunk, admission.stream.as_mut()) {
            meter.push(bytes);
        }
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Sends `body` to a worker and relays its answer; `upstream` accumulates the time spent
/// waiting for workers' response heads (the rest is the gateway's own overhead).
async fn relay(
    gw: &Arc<Gateway>,
    path: &str,
    body: Bytes,
    model: Option<&str>,
    upstream: &mut std::time::Duration,
) -> Response {
    let mut tried: Vec<usize> = Vec::new();
    let mut rewaits = 0;
    let mut released = match wait_for_model(gw, path, model).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let policy = gw.policy_for(model);
    let blocks = match (policy.kind(), lastmile_worker::Api::of_path(path)) {
        (PolicyKind::KvAware, Some(api)) => kv::prompt_blocks(gw, api, &body, model).await,
        _ => None,
    };
    let route = route_request(blocks.as_ref());
    // Where the prompt is computed: decided once, for the first decode worker chosen.
    let mut prefilled: Option<Prefilled> = None;
    loop {
        let snapshot = gw.workers.snapshot(&tried, model);
        let Some(decision) = policy.select(&snapshot, &route, &gw.index()) else {
            match wait_again(gw, path, model, &tried, &mut rewaits).await {
                Ok(r) => released = Some(r),
                Err(resp) => return resp,
            }
            continue;
        };
        let id = decision.worker;
        let cached = (decision.overlap_blocks * route.block_size).min(route.prompt_tokens);
        let guard = gw.workers.start(id, route.prompt_tokens - cached);
        // Counted in flight on its worker now: no longer against the activator's capacity.
        drop(released.take());
        gw.metrics.routed(decision.overlap_blocks);
        let worker = gw.workers.get(id);
        let worker_url = worker.url.clone();
        let asked = Instant::now();
        if prefilled.is_none() {
            let decided = match (&gw.config.disagg, blocks.as_ref()) {
                (Some(d), Some(b)) => {
                    disagg::prefill(gw, d, path, model, b, decision.overlap_blocks).await
                }
                _ => Ok(Prefilled::Local),
            };
            match decided {
                Ok(p) => {
                    if matches!(p, Prefilled::Remote { .. }) {
                        // Its prompt is computed by the prefill worker, not by this one.
                        gw.workers
                            .prefilled_elsewhere(id, route.prompt_tokens - cached);
                    }
                    prefilled = Some(p);
                }
                Err(resp) => return resp,
            }
        }
        let source = match &prefilled {
            Some(Prefilled::Remote { source, .. }) => Some(source.as_str()),
            _ => None,
        };
        let post = worker_request(gw, &worker_url, path, blocks.as_ref(), source);
        let patience = gw.config.worker_timeout;
        let sent = while_alive(&worker, patience, post.body(body.clone()).send()).await;
        *upstream += asked.elapsed();
        match sent {
            None => {
                // No head in time and its health check fails: hung (stopped, wedged, its engine
                // stalled). Dropping the request closes the connection (the worker, should it
                // wake, cancels); nothing reached the client: run it elsewhere.
                tracing::warn!(worker = %worker_url, "hung: no answer in {patience:?} and its health check fails");
                give_up_prefill(gw, &mut prefilled);
                retry_elsewhere(gw, id, &mut tried);
            }
            Some(Ok(upstream)) => {
                gw.workers.succeeded(id);
                let mut resp = relay_response(path, upstream, guard, worker, patience);
                if gw.config.debug_headers {
                    name_worker(&mut resp, &worker_url);
                }
                return resp;
            }
            Some(Err(e)) if !e.is_timeout() => {
                // No answer began: the worker could not be reached, or it closed the connection
                // before its response head (it died or restarted while working). Nothing reached
                // the client, and the worker's work is gone with it: run the request elsewhere.
                let how = if e.is_connect() {
                    "unreachable"
                } else {
                    "lost the request"
                };
                tracing::warn!(worker = %worker_url, "{how}: {e}");
                give_up_prefill(gw, &mut prefilled);
                retry_elsewhere(gw, id, &mut tried);
            }
            Some(Err(e)) => {
                gw.workers.failed(id);
                give_up_prefill(gw, &mut prefilled);
                return error_response(
                    path,
                    &ApiError::bad_gateway(format!("the worker failed before answering: {e}")),
                );
            }
        }
    }
}

/// The decode worker failed before answering: the prompt's held blocks (if a prefill worker
/// computed it) are released there, and another decode worker computes the prompt itself.
fn give_up_prefill(gw: &Gateway, prefilled: &mut Option<Prefilled>) {
    if let (Some(Prefilled::Remote { lease, .. }), Some(d)) =
        (prefilled.take(), gw.config.disagg.as_ref())
    {
        disagg::release(gw, d, lease);
    }
    *prefilled = Some(Prefilled::Local);
}

/// Before routing a request for `model` (if it names one): a deployment's request waits while
/// a replica starts (what it gets back counts against the activator's capacity until routed);
/// a model that no worker serves, while workers are up, is `model_not_found`. `Err` is the
/// response to give the client.
async fn wait_for_model<'a>(
    gw: &'a Arc<Gateway>,
    path: &str,
    model: Option<&str>,
) -> Result<Option<Released<'a>>, Response> {
    let Some(name) = model else {
        return Ok(None);
    };
    if let Some(d) = gw.deployment(name) {
        gw.activator.arrived(&d.name);
        // Scaled to zero or still starting: wait here while a replica starts.
        return match gw.activator.ready(gw, d, &[]).await {
            Ok(r) => Ok(Some(r)),
            Err(e) => Err(error_response(path, &e)),
        };
    }
    // Workers are up but none serves it, and no worker known to serve it is down: no
    // such model. (With no worker up at all the answer is "unavailable".)
    let all = gw.workers.all();
    let up = all.iter().filter(|w| w.available()).count();
    let could = all
        .iter()
        .any(|w| w.listed() && w.serves(Some(name)) && (w.available() || w.model().is_some()));
    if up > 0 && !could {
        return Err(error_response(path, &ApiError::model_not_found(name)));
    }
    Ok(None)
}

/// What the routing policy sees of a request: its prompt's block hashes and length when the
/// gateway tokenized it (else none, in blocks of 16).
fn route_request(blocks: Option<&kv::PromptBlocks>) -> RouteRequest<'_> {
    RouteRequest {
        prompt_hashes: blocks.map_or(&[], |b| b.hashes.as_slice()),
        prompt_tokens: blocks.map_or(0, |b| b.tokens),
        block_size: blocks.map_or(16, |b| b.block_size),
    }
}

/// The POST of a request for `path` to the worker at `worker_url`, with the prompt's tokens
/// when the gateway has them, the KV source when a prefill worker computed the prompt, and,
/// when it meters tenants, the ask for a usage report.
fn worker_request(
    gw: &Gateway,
    worker_url: &str,
    path: &str,
    blocks: Option<&kv::PromptBlocks>,
    kv_source: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut post = gw
        .workers
        .client
        .post(format!("{worker_url}{path}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let (Some(source), Some(d)) = (kv_source, gw.config.disagg.as_ref()) {
        // A prefill worker computed the prompt: the decode worker pulls its blocks.
        post = post
            .header(KV_SOURCE_HEADER, source)
            .header(INTERNAL_TOKEN_HEADER, &d.internal_token);
    }
    if let Some(h) = blocks.and_then(|b| b.header.as_deref()) {
        // The prompt's tokens: the worker need not build them again.
        post = post.header(lastmile_worker::PROMPT_HEADER, h);
    }
    if gw.tenants.is_some() {
        // Metering: ask for the usage report that ends a stream (whole answers carry it).
        post = post.header(lastmile_protocol::USAGE_HEADER, "1");
    }
    post
}

/// No worker can take the request. A deployment whose replicas all failed under it waits
/// (again) for the replacement the controller starts, at most [`MAX_REWAITS`] times; otherwise
/// `Err` is the response to give the client (overloaded).
async fn wait_again<'a>(
    gw: &'a Arc<Gateway>,
    path: &str,
    model: Option<&str>,
    tried: &[usize],
    rewaits: &mut usize,
) -> Result<Released<'a>, Response> {
    if let Some(d) = model.and_then(|m| gw.deployment(m)) {
        if *rewaits < MAX_REWAITS {
            *rewaits += 1;
            return gw
                .activator
                .ready(gw, d, tried)
                .await
                .map_err(|e| error_response(path, &e));
        }
    }
    let why = if tried.is_empty() {
        "no healthy worker is available"
    } else {
        "no worker could be reached"
    };
    Err(error_response(path, &ApiError::overloaded(why)))
}

/// Names the worker that answered in the `x-lastmile-worker` header (`debug_headers`).
fn name_worker(resp: &mut Response, worker_url: &str) {
    if let Ok(v) = HeaderValue::from_str(worker_url) {
        resp.headers_mut().insert("x-lastmile-worker", v);
    }
}

/// Marks worker `id` failed, counts a retry, and keeps the request off it from now on.
fn retry_elsewhere(gw: &Gateway, id: usize, tried: &mut Vec<usize>) {
    gw.workers.failed(id);
    gw.metrics.retries.fetch_add(1, Ordering::Relaxed);
    tried.push(id);
}

/// How many times one request waits again for a deployment whose replicas failed under it.
const MAX_REWAITS: usize = 3;

/// How often a request past its worker's patience looks at the worker's health.
const HEALTH_LOOK: std::time::Duration = std::time::Duration::from_millis(100);

/// `fut`'s output, or `None` once `patience` has passed and `worker`'s health check fails
/// (the health poller's verdict: no extra request per waiting client).
async fn while_alive<F: std::future::Future>(
    worker: &crate::workers::Worker,
    patience: std::time::Duration,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Ok(out) = tokio::time::timeout(patience, &mut fut).await {
        return Some(out);
    }
    loop {
        if !worker.healthy() {
            return None;
        }
        if let Ok(out) = tokio::time::timeout(HEALTH_LOOK, &mut fut).await {
            return Some(out);
        }
    }
}

/// The worker's answer as the client's: status, content type, `Retry-After`, and the body
/// streamed through (the in-flight guard lives as long as the body). If the worker fails in the
/// middle of an event stream (it died), the client gets a final error event in its API's shape
/// and a cleanly ended stream, not a cut connection.
///
/// A worker that goes silent mid-stream for longer than `patience` and fails its health check
/// is given up on the same way.
fn relay_response(
    path: &str,
    upstream: reqwest::Response,
    guard: crate::workers::InFlight,
    worker: Arc<crate::workers::Worker>,
    patience: std::time::Duration,
) -> Response {
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = axum::http::HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
        header::HeaderName::from_static(lastmile_protocol::USAGE_HEADER),
    ] {
        if let Some(v) = upstream.headers().get(name.as_str()) {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                headers.insert(name, v);
            }
        }
    }
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let anthropic = path.starts_with("/v1/messages");
    let chunks = futures::stream::unfold(
        (upstream.bytes_stream(), worker),
        move |(mut bytes, worker)| async move {
            let next = match while_alive(&worker, patience, bytes.next()).await {
                Some(next) => next.map(|c| c.map_err(|e| e.to_string())),
                None => Some(Err(format!(
                    "no byte in {patience:?} and its health check fails"
                ))),
            };
            Some((next?, (bytes, worker)))
        },
    );
    let stream = chunks.scan(false, move |failed, chunk| {
        let _alive = &guard;
        let item = match chunk {
            _ if *failed => None,
            Ok(bytes) => Some(Ok(bytes)),
            Err(e) if sse => {
                *failed = true;
                tracing::warn!("worker failed mid-stream: {e}");
                Some(Ok(Bytes::from(stream_error_event(anthropic))))
            }
            Err(e) => {
                *failed = true;
                Some(Err(std::io::Error::other(e)))
            }
        };
        futures::future::ready(item)
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The last event of a stream whose worker was lost.
fn stream_error_event(anthropic: bool) -> String {
    let e = ApiError::bad_gateway(
        "the worker serving this stream stopped in the middle of it; retry the request",
    );
    if anthropic {
        let (name, body) = AnthropicError::from(e).event();
        format!("event: {name}\ndata: {body}\n\n")
    } else {
        lastmile_protocol::sse_event(&e.body())
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use serde_json::Value;

    use super::*;

    async fn refused(path: &str, body: Body) -> (StatusCode, Value) {
        let resp = read_body(path, body, 64).await.expect_err("refused");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("error body");
        (
            status,
            serde_json::from_slice(&bytes).expect("JSON error body"),
        )
    }

    fn aborted() -> Body {
        Body::from_stream(stream::iter([
            Ok(Bytes::from_static(b"{\"model\"")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset",
            )),
        ]))
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_in_each_apis_shape() {
        let (status, body) = refused("/v1/chat/completions", Body::from(vec![b'a'; 65])).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
        let (status, body) = refused("/v1/messages", Body::from(vec![b'a'; 65])).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["type"], "request_too_large", "{body}");
        assert!(read_body("/v1/completions", Body::from("{}"), 64)
            .await
            .is_ok());
    }

    /// Regression: any body read error was answered 413, a client that aborted mid-body too.
    #[tokio::test]
    async fn a_body_that_fails_to_arrive_is_400_not_413() {
        let (status, body) = refused("/v1/chat/completions", aborted()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("could not read the request body"),
            "{message}"
        );
        let (status, body) = refused("/v1/messages", aborted()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
}
