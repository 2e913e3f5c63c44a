//! `POST /v1/chat/completions` and `POST /v1/completions`: parse and validate the body, build the
//! prompt (chat template with tools, tokenization and grammar compilation off the async threads),
//! check it fits the context, submit one engine request per choice, and answer whole or as an
//! OpenAI-style SSE stream.

mod choices;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use lastmile_engine::tokenizer::TextTokenizer;
use lastmile_engine::{
    DraftSource, EngineError, GenerateRequest, Grammar, GrammarSpec, SamplingParams, Speculation,
};
use lastmile_protocol::structured::regex_escape;
use lastmile_protocol::{
    parse_json, ApiError, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, FinishReason, OutputConstraint, PromptRef, ResponseMeta, SamplingRequest,
    SpeculativeMethod, Usage,
};
use serde_json::json;

pub(crate) use choices::{ChoiceBuilder, LogprobStyle, Update};

use crate::error::{api_response, WorkerError};
use crate::generation::{Generation, Piece};
use crate::tools::ToolSetup;
use crate::{unix_now, AppState};

/// Which endpoint a request came through (they differ only in framing).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
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

pub(crate) fn new_id(prefix: &str) -> String {
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

/// The request's body, up to `limit` bytes (413 beyond it, 400 when it fails to arrive).
pub(crate) async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    lastmile_http::read_body(req.into_body(), limit).await
}

/// A request ready for the engine: one engine request per choice, and how to present them.
pub(crate) struct Prepared {
    /// One per choice (`n`).
    pub(crate) requests: Vec<GenerateRequest>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) model: String,
    /// Tools the answer may call (read out of the generated text).
    pub(crate) tools: Option<Arc<ToolSetup>>,
    pub(crate) logprobs: LogprobStyle,
    /// Completions with `echo`: the prompt text each choice starts with.
    pub(crate) echo: Option<String>,
    /// The gateway asked for the usage comment at the end of a stream (it meters usage).
    pub(crate) report_usage: bool,
}

impl Prepared {
    /// Pulls the prompt's KV blocks from `source` (a prefill worker the gateway chose) into the
    /// prefix cache first, when there is one; whatever does not arrive is computed here.
    pub(crate) async fn pull_prompt(&self, state: &AppState, source: Option<&str>) {
        if let (Some(source), Some(first)) = (source, self.requests.first()) {
            crate::disagg::pull(state, source, &first.prompt).await;
        }
    }

    /// A fresh builder for choice `index`.
    pub(crate) fn choice(&self, index: u32, tok: &TextTokenizer) -> ChoiceBuilder {
        let mut b = ChoiceBuilder::new(
            index,
            self.tools.as_deref(),
            self.logprobs,
            self.echo.as_deref().unwrap_or(""),
        );
        let first = self
            .requests
            .first()
            .filter(|r| r.prompt_logprobs.is_some());
        if let Some(&token) = first.and_then(|r| r.prompt.first()) {
            b.start_prompt_logprobs(token, tok);
        }
        b
    }
}

fn engine_sampling(s: &SamplingRequest, logit_bias: &Arc<[(u32, f32)]>) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k as usize,
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
        logit_bias: logit_bias.clone(),
    }
}

/// The engine requests for `n` choices of one prompt. Choice `i` of a seeded request uses
/// seed + i, so choices differ and the whole answer is reproducible.
fn engine_requests(
    prompt: Vec<u32>,
    s: &SamplingRequest,
    max_tokens: usize,
    logprobs: Option<usize>,
    grammar: Option<Grammar>,
) -> Vec<GenerateRequest> {
    // One copy of the biases for every choice.
    let logit_bias: Arc<[(u32, f32)]> = Arc::from(s.logit_bias.as_slice());
    (0..s.n.max(1))
        .map(|i| {
            let mut sampling = engine_sampling(s, &logit_bias);
            sampling.seed = s.seed.map(|seed| seed.wrapping_add(u64::from(i)));
            GenerateRequest {
                stop: s.stop.clone(),
                ignore_eos: s.ignore_eos,
                logprobs,
                grammar: grammar.clone(),
                speculation: s.speculative.map(|p| Speculation {
                    ngram: p.ngram as usize,
                    max_draft: p.max_draft as usize,
                    source: match p.method {
                        None => DraftSource::Default,
                        Some(SpeculativeMethod::PromptLookup) => DraftSource::PromptLookup,
                        Some(SpeculativeMethod::DraftModel) => DraftSource::DraftModel,
                    },
                }),
                ..GenerateRequest::new(prompt.clone(), sampling, max_tokens)
            }
        })
        .collect()
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.config.model_id {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// Fits `max_tokens` to the context: an explicit value must fit, a missing one fills the rest.
/// (The engine checks the sum again on submit, with the same error; a missing `max_tokens` is
/// the endpoint's business.)
fn budget(
    state: &AppState,
    prompt_len: usize,
    max_tokens: Option<u32>,
) -> Result<usize, EngineError> {
    let context = state.engine.info().context_length;
    let exceeded = |max_tokens| EngineError::ContextExceeded {
        prompt: prompt_len,
        max_tokens,
        context,
    };
    match max_tokens {
        Some(m) if prompt_len.saturating_add(m as usize) > context => Err(exceeded(m as usize)),
        Some(m) => Ok(m as usize),
        None if prompt_len >= context => Err(exceeded(0)),
        None => Ok(context - prompt_len),
    }
}

/// The grammar that enforces an output constraint.
fn grammar_spec(c: &OutputConstraint) -> GrammarSpec {
    match c {
        OutputConstraint::JsonObject => GrammarSpec::JsonSchema(json!({"type": "object"})),
        OutputConstraint::JsonSchema(s) => GrammarSpec::JsonSchema(s.clone()),
        OutputConstraint::Regex(r) => GrammarSpec::Regex(r.clone()),
        OutputConstraint::Choice(options) => GrammarSpec::Regex(
            options
                .iter()
                .map(|o| format!("({})", regex_escape(o)))
                .collect::<Vec<_>>()
                .join("|"),
        ),
        OutputConstraint::Grammar(g) => GrammarSpec::Lark(g.clone()),
    }
}

/// Compiles `spec`, naming `param` in the error.
fn compile(state: &AppState, spec: &GrammarSpec, param: &str) -> Result<Grammar, WorkerError> {
    state
        .engine
        .compile_grammar(spec)
        .map_err(|e| WorkerError::from(e).about(param))
}

/// The prompt tokens of a chat conversation with its tools (CPU-bound: call off the async
/// threads).
/// Everything CPU-bound about a chat request, on a blocking thread: the template and
/// tokenization (unless the gateway sent the tokens: `given`, a [`crate::PROMPT_HEADER`] value),
/// and the grammar (a forced tool call, or the output constraint).
fn build_chat_prompt(
    state: &AppState,
    req: &ChatCompletionRequest,
    tools: Option<&ToolSetup>,
    constraint: Option<&OutputConstraint>,
    given: Option<&str>,
) -> Result<(Vec<u32>, Option<Grammar>), WorkerError> {
    let param = req.params.constraint_fields().param();
    let prompt = match state.given_tokens(given) {
        Some(tokens) => tokens,
        None => state.prompter.chat(req, tools)?,
    };
    let grammar = match (tools, constraint) {
        (Some(t), _) => {
            // Compiled even when not enforced, so that a broken parameter schema is refused.
            let calls = compile(state, &GrammarSpec::Lark(t.call_grammar()), "tools")?;
            t.forced_grammar().map(|_| calls)
        }
        (None, Some(c)) => Some(compile(state, &grammar_spec(c), param)?),
        (None, None) => None,
    };
    Ok((prompt, grammar))
}

/// Validates a chat request and prepares its engine requests (`given`: the prompt's tokens from
/// the gateway, see [`crate::prompt`]).
pub(crate) async fn prepare_chat_request(
    state: &Arc<AppState>,
    req: ChatCompletionRequest,
    given: Option<String>,
) -> Result<Prepared, WorkerError> {
    req.validate()?;
    check_model(state, &req.params.model)?;
    let style = state.engine.template().tool_style();
    let tools = ToolSetup::from_request(&req, style)?.map(Arc::new);
    let constraint = req.params.output_constraint()?;
    let st = state.clone();
    let (req, tools, built) = tokio::task::spawn_blocking(move || {
        let built = build_chat_prompt(
            &st,
            &req,
            tools.as_deref(),
            constraint.as_ref(),
            given.as_deref(),
        );
        (req, tools, built)
    })
    .await
    .map_err(|e| ApiError::internal(format!("prompt task failed: {e}")))?;
    let (prompt, grammar) = built?;
    let max_tokens = budget(state, prompt.len(), req.max_new_tokens())?;
    let logprobs = req.top_logprobs_wanted();
    Ok(Prepared {
        requests: engine_requests(prompt, &req.sampling(), max_tokens, logprobs, grammar),
        stream: req.params.stream,
        include_usage: req.params.include_usage(),
        model: req.params.model,
        tools,
        logprobs: if logprobs.is_some() {
            LogprobStyle::Chat
        } else {
            LogprobStyle::Off
        },
        echo: None,
        report_usage: false,
    })
}

pub(crate) async fn prepare_completion(
    state: &Arc<AppState>,
    body: &[u8],
    given: Option<String>,
) -> Result<Prepared, WorkerError> {
    let req: CompletionRequest = parse_json(body)?;
    req.validate()?;
    check_model(state, &req.params.model)?;
    let constraint = req.params.output_constraint()?;
    let prompt_ref = req
        .prompt
        .single()
        .ok_or_else(|| ApiError::unsupported("multiple prompts", "prompt"))?;
    let (text, ids) = match prompt_ref {
        PromptRef::Tokens(ids) => (None, Some(ids.to_vec())),
        PromptRef::Text(text) => (Some(text.to_string()), None),
    };
    // The engine refuses these on submit too; here they are refused before the echo decodes
    // them and the grammar compiles.
    let vocab = state.engine.info().vocab_size;
    if let Some(&token) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::TokenOutOfVocab { token, vocab }.into());
    }
    let echo = req.echo == Some(true);
    let param = req.params.constraint_fields().param();
    let st = state.clone();
    let (prompt, echo_text, grammar) = tokio::task::spawn_blocking(move || {
        let tok = st.engine.tokenizer();
        let given = st.given_tokens(given.as_deref());
        let prompt = match (ids, &text, given) {
            (Some(ids), _, _) => ids,
            (None, Some(_), Some(tokens)) => tokens,
            (None, Some(t), None) => tok.encode_prompt(t)?,
            (None, None, _) => Vec::new(),
        };
        let echo_text = match (echo, text) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(tok.decode(&prompt)?),
        };
        let grammar = match &constraint {
            Some(c) => Some(compile(&st, &grammar_spec(c), param)?),
            None => None,
        };
        Ok::<_, WorkerError>((prompt, echo_text, grammar))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    let max_tokens = budget(state, prompt.len(), Some(req.max_new_tokens()))?;
    let logprobs = req.logprobs.map(|k| k as usize);
    let mut requests = engine_requests(prompt, &req.sampling(), max_tokens, logprobs, grammar);
    if echo {
        for r in &mut requests {
            r.prompt_logprobs = logprobs;
        }
    }
    Ok(Prepared {
        requests,
        stream: req.params.stream,
        include_usage: req.params.include_usage(),
        model: req.params.model,
        tools: None,
        logprobs: if logprobs.is_some() {
            LogprobStyle::Completion
        } else {
            LogprobStyle::Off
        },
        echo: echo_text,
        report_usage: false,
    })
}

/// Submits every choice's engine request; all or none are running afterwards.
pub(crate) fn submit(
    state: &AppState,
    prepared: &Prepared,
    started: Instant,
) -> Result<Vec<Generation>, WorkerError> {
    let mut out = Vec::with_capacity(prepared.requests.len());
    for r in &prepared.requests {
        // On failure the streams already submitted are dropped, which cancels them.
        out.push(Generation::new(state.engine.submit(r.clone())?, started));
    }
    let prompt_len = prepared.requests.first().map_or(0, |r| r.prompt.len());
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_len as u64, Ordering::Relaxed);
    Ok(out)
}

pub(crate) async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    handle(state, req, Kind::Chat).await
}

pub(crate) async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    handle(state, req, Kind::Completion).await
}

async fn handle(state: Arc<AppState>, req: Request, kind: Kind) -> Response {
    let started = Instant::now();
    let report_usage = wants_usage_report(&req);
    let given = given_prompt(&req);
    let kv_source = state.transfers.source(req.headers());
    let result = async {
        let body = read_body(req, state.config.max_body_bytes).await?;
        let mut prepared = match kind {
            Kind::Chat => prepare_chat_request(&state, parse_json(&body)?, given).await?,
            Kind::Completion => prepare_completion(&state, &body, given).await?,
        };
        prepared.report_usage = report_usage;
        prepared.pull_prompt(&state, kv_source.as_deref()).await;
        let generations = submit(&state, &prepared, started)?;
        Ok::<_, WorkerError>((prepared, generations))
    }
    .await;
    let (prepared, generations) = match result {
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
        stream::openai_stream(state, prepared, generations, meta, kind)
    } else {
        let resp = match collect(&state, &prepared, generations).await {
            Ok((choices, usage)) => with_usage(
                usage,
                match kind {
                    Kind::Chat => axum::Json(ChatCompletionResponse::with_choices(
                        &meta,
                        choices.into_iter().map(|(c, r)| c.into_chat(r)).collect(),
                        usage,
                    ))
                    .into_response(),
                    Kind::Completion => axum::Json(CompletionResponse::with_choices(
                        &meta,
                        choices
                            .into_iter()
                            .map(|(c, r)| c.into_completion(r))
                            .collect(),
                        usage,
                    ))
                    .into_response(),
                },
            ),
            Err(e) => api_response(&e),
        };
        state
            .metrics
            .count_request(kind.endpoint(), resp.status().as_u16());
        resp
    }
}

/// Runs every choice to the end (concurrently in the engine) and sums the usage.
pub(crate) async fn collect(
    state: &AppState,
    prepared: &Prepared,
    generations: Vec<Generation>,
) -> Result<(Vec<(ChoiceBuilder, FinishReason)>, Usage), ApiError> {
    let runs = generations.into_iter().enumerate().map(|(i, g)| {
        let builder = prepared.choice(i as u32, state.engine.tokenizer());
        run_choice(state, builder, g)
    });
    let results = futures::future::join_all(runs).await;
    let mut choices = Vec::with_capacity(results.len());
    let mut usage = Usage::new(0, 0);
    for r in results {
        let (builder, reason, u) = r?;
        usage = Usage::new(
            u.prompt_tokens,
            usage.completion_tokens + u.completion_tokens,
        );
        choices.push((builder, reason));
    }
    Ok((choices, usage))
}

async fn run_choice(
    state: &AppState,
    mut builder: ChoiceBuilder,
    mut g: Generation,
) -> Result<(ChoiceBuilder, FinishReason, Usage), ApiError> {
    let tok = state.engine.tokenizer();
    while let Some(piece) = g.next(&state.metrics).await {
        match piece? {
            Piece::Text { text, token } => {
                builder.push(&text, token, tok);
            }
            Piece::PromptLogprobs(entries) => {
                builder.push_prompt(entries, tok);
            }
            Piece::End(reason, usage, stop) => {
                let (_, reason) = builder.finish(reason);
                builder.stop_sequence = stop;
                return Ok((builder, reason, usage));
            }
        }
    }
    Err(ApiError::internal("the generation ended without a result"))
}

/// `resp` with the usage header the gateway meters.
pub(crate) fn with_usage(usage: Usage, mut resp: Response) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(&usage.metered().to_header()) {
        resp.headers_mut()
            .insert(lastmile_protocol::USAGE_HEADER, v);
    }
    resp
}

/// Whether the caller (the gateway) asks for usage reports: a request header
/// `x-lastmile-usage`. Whole answers always carry the usage header; streams end with a usage
/// comment only when asked, so direct clients see exactly OpenAI's and Anthropic's framing.
/// The [`crate::PROMPT_HEADER`] value a request carries, if any.
pub(crate) fn given_prompt(req: &Request) -> Option<String> {
    req.headers()
        .get(crate::PROMPT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub(crate) fn wants_usage_report(req: &Request) -> bool {
    req.headers().contains_key(lastmile_protocol::USAGE_HEADER)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use futures::stream;

    use super::*;

    #[tokio::test]
    async fn an_oversized_body_is_413_and_a_broken_one_400() {
        let too_big = Request::new(Body::from(vec![b'a'; 65]));
        let err = read_body(too_big, 64).await.expect_err("too large");
        assert_eq!(api_response(&err).status(), StatusCode::PAYLOAD_TOO_LARGE);
        let aborted = Request::new(Body::from_stream(stream::iter([
            Ok(Bytes::from_static(b"{\"model\"")),
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "client went away",
            )),
        ])));
        let err = read_body(aborted, 64).await.expect_err("aborted");
        assert_eq!(api_response(&err).status(), StatusCode::BAD_REQUEST);
        assert!(err.message.contains("client went away"), "{}", err.message);
        // On `/v1/messages` the same errors take Anthropic's kinds.
        let kind = |e: ApiError| lastmile_protocol::anthropic::AnthropicError::from(e).kind;
        use lastmile_protocol::anthropic::AnthropicErrorKind as A;
        assert_eq!(kind(ApiError::payload_too_large(64)), A::RequestTooLarge);
        assert_eq!(kind(err), A::InvalidRequest);
    }
}
