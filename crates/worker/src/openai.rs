//! `POST /v1/chat/completions` and `POST /v1/completions`: parse and validate the body, build the
//! prompt (chat template, tokenization off the async threads), check it fits the context, submit
//! to the engine, and answer whole or as an OpenAI-style SSE stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use lastmile_engine::{GenerateRequest, SamplingParams};
use lastmile_protocol::{
    parse_json, sse_event, ApiError, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChunk, CompletionRequest, CompletionResponse, PromptRef,
    ResponseMeta, SamplingRequest, SSE_DONE,
};

use crate::error::{api_response, WorkerError};
use crate::generation::{Generation, Piece};
use crate::{unix_now, AppState};

/// Which endpoint a request came through (they differ only in framing).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{:016x}{n:04x}",
        t.rotate_left(17) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let too_big = std::error::Error::source(&e)
                .map(|s| s.to_string().contains("length limit"))
                .unwrap_or(false)
                || e.to_string().contains("length limit");
            if too_big {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid_request(format!("could not read the request body: {e}"), None)
            }
        })
}

/// A request ready for the engine.
struct Prepared {
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    model: String,
}

/// The engine request for a prompt under the API's sampling settings.
fn engine_request(prompt: Vec<u32>, s: &SamplingRequest, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: engine_sampling(s),
        max_tokens,
        stop: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    }
}

fn engine_sampling(s: &SamplingRequest) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as usize,
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
    }
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.config.model_id {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// Fits `max_tokens` to the context: an explicit value must fit, a missing one fills the rest.
fn budget(state: &AppState, prompt_len: usize, max_tokens: Option<u32>) -> Result<usize, ApiError> {
    let ctx = state.engine.info().context_length;
    match max_tokens {
        Some(m) if prompt_len + m as usize > ctx => Err(ApiError::context_length_exceeded(
            prompt_len, m as usize, ctx,
        )),
        Some(m) => Ok(m as usize),
        None if prompt_len >= ctx => Err(ApiError::context_length_exceeded(prompt_len, 0, ctx)),
        None => Ok(ctx - prompt_len),
    }
}

async fn prepare_chat(state: &Arc<AppState>, body: &[u8]) -> Result<Prepared, WorkerError> {
    let req: ChatCompletionRequest = parse_json(body)?;
    req.validate()?;
    check_model(state, &req.model)?;
    let messages: Vec<serde_json::Value> = req
        .messages
        .iter()
        .map(|m| {
            let mut v = serde_json::json!({"role": m.role.as_str(), "content": m.text()});
            if let Some(name) = &m.name {
                v["name"] = serde_json::Value::String(name.clone());
            }
            v
        })
        .collect();
    let st = state.clone();
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, WorkerError> {
        let rendered = st
            .engine
            .template()
            .render(&serde_json::Value::Array(messages), true)?;
        Ok(st.engine.tokenizer().encode_chat(&rendered)?)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    let max_tokens = budget(state, prompt.len(), req.max_new_tokens())?;
    Ok(Prepared {
        request: engine_request(prompt, &req.sampling(), max_tokens),
        stream: req.stream,
        include_usage: req.include_usage(),
        model: req.model,
    })
}

async fn prepare_completion(state: &Arc<AppState>, body: &[u8]) -> Result<Prepared, WorkerError> {
    let req: CompletionRequest = parse_json(body)?;
    req.validate()?;
    check_model(state, &req.model)?;
    let prompt = match req.prompt.single() {
        Some(PromptRef::Tokens(ids)) => ids.to_vec(),
        Some(PromptRef::Text(text)) => {
            let (st, text) = (state.clone(), text.to_string());
            tokio::task::spawn_blocking(move || st.engine.tokenizer().encode_prompt(&text))
                .await
                .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??
        }
        None => return Err(ApiError::unsupported("multiple prompts", "prompt").into()),
    };
    let vocab = state.engine.info().vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_request(
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
            Some("prompt"),
        )
        .into());
    }
    let max_tokens = budget(state, prompt.len(), Some(req.max_new_tokens()))?;
    Ok(Prepared {
        request: engine_request(prompt, &req.sampling(), max_tokens),
        stream: req.stream,
        include_usage: req.include_usage(),
        model: req.model,
    })
}

pub(crate) async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    handle(state, req, Kind::Chat).await
}

pub(crate) async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    handle(state, req, Kind::Completion).await
}

async fn handle(state: Arc<AppState>, req: Request, kind: Kind) -> Response {
    let started = Instant::now();
    let result = async {
        let body = read_body(req, state.config.max_body_bytes).await?;
        let prepared = match kind {
            Kind::Chat => prepare_chat(&state, &body).await?,
            Kind::Completion => prepare_completion(&state, &body).await?,
        };
        let prompt_len = prepared.request.prompt.len();
        let stream = state.engine.submit(prepared.request.clone())?;
        state
            .metrics
            .prompt_tokens
            .fetch_add(prompt_len as u64, Ordering::Relaxed);
        Ok::<_, WorkerError>((prepared, Generation::new(stream, started)))
    }
    .await;
    let (prepared, generation) = match result {
        Ok(x) => x,
        Err(e) => {
            let api = e.to_api();
            state.metrics.count_request(kind.endpoint(), api.status);
            return api_response(&api);
        }
    };
    let meta = ResponseMeta::new(
        new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        unix_now(),
        prepared.model.clone(),
    );
    if prepared.stream {
        state.metrics.count_request(kind.endpoint(), 200);
        stream_response(state, generation, meta, kind, prepared.include_usage)
    } else {
        let resp = whole_response(&state, generation, &meta, kind).await;
        state
            .metrics
            .count_request(kind.endpoint(), resp.status().as_u16());
        resp
    }
}

async fn whole_response(
    state: &AppState,
    mut g: Generation,
    meta: &ResponseMeta,
    kind: Kind,
) -> Response {
    let mut text = String::new();
    while let Some(piece) = g.next(&state.metrics).await {
        match piece {
            Ok(Piece::Text(t)) => text.push_str(&t),
            Ok(Piece::End(reason, usage)) => {
                return match kind {
                    Kind::Chat => {
                        axum::Json(ChatCompletionResponse::new(meta, text, reason, usage))
                            .into_response()
                    }
                    Kind::Completion => {
                        axum::Json(CompletionResponse::new(meta, text, reason, usage))
                            .into_response()
                    }
                };
            }
            Err(e) => return api_response(&e),
        }
    }
    api_response(&ApiError::internal("the generation ended without a result"))
}

/// Frames the generation as OpenAI's SSE stream: (chat) a role delta first, content deltas, a
/// finish chunk, an optional usage chunk, then `[DONE]`.
fn stream_response(
    state: Arc<AppState>,
    g: Generation,
    meta: ResponseMeta,
    kind: Kind,
    include_usage: bool,
) -> Response {
    struct S {
        state: Arc<AppState>,
        g: Generation,
        meta: ResponseMeta,
        kind: Kind,
        include_usage: bool,
        started: bool,
        finished: bool,
    }
    let init = S {
        state,
        g,
        meta,
        kind,
        include_usage,
        started: false,
        finished: false,
    };
    let body = futures::stream::unfold(init, |mut s| async move {
        if s.finished {
            return None;
        }
        let mut out = String::new();
        if !s.started && s.kind == Kind::Chat {
            s.started = true;
            out.push_str(&sse_event(
                &ChatCompletionChunk::role(&s.meta).with_usage_field(s.include_usage),
            ));
        }
        match s.g.next(&s.state.metrics).await {
            Some(Ok(Piece::Text(t))) => out.push_str(&match s.kind {
                Kind::Chat => sse_event(
                    &ChatCompletionChunk::content(&s.meta, t).with_usage_field(s.include_usage),
                ),
                Kind::Completion => {
                    sse_event(&CompletionChunk::text(&s.meta, t).with_usage_field(s.include_usage))
                }
            }),
            Some(Ok(Piece::End(reason, usage))) => {
                out.push_str(&match s.kind {
                    Kind::Chat => sse_event(
                        &ChatCompletionChunk::finish(&s.meta, reason)
                            .with_usage_field(s.include_usage),
                    ),
                    Kind::Completion => sse_event(
                        &CompletionChunk::finish(&s.meta, reason).with_usage_field(s.include_usage),
                    ),
                });
                if s.include_usage {
                    out.push_str(&match s.kind {
                        Kind::Chat => sse_event(&ChatCompletionChunk::usage(&s.meta, usage)),
                        Kind::Completion => sse_event(&CompletionChunk::usage(&s.meta, usage)),
                    });
                }
                out.push_str(SSE_DONE);
                s.finished = true;
            }
            Some(Err(e)) => {
                out.push_str(&sse_event(&e.body()));
                out.push_str(SSE_DONE);
                s.finished = true;
            }
            None => {
                out.push_str(SSE_DONE);
                s.finished = true;
            }
        }
        Some((Ok::<_, Infallible>(out), s))
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    resp
}
