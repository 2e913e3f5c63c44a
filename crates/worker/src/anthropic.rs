//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API on top of
//! the chat pipeline. A request is converted to a chat request (system prompt, turns, tool use
//! and tool results, tools and tool choice), prepared and run exactly as `/v1/chat/completions`
//! runs it, and answered as a message or as Anthropic's event stream. Every error, including
//! the pipeline's, goes out in Anthropic's error shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::stream;
use lastmile_protocol::anthropic::{
    frame_events, AnthropicError, CountTokensRequest, CountTokensResponse, MessageOutput,
    MessageStream, MessagesRequest, MessagesResponse,
};
use lastmile_protocol::{parse_json, ApiError};

use crate::error::{error_body_response, WorkerError};
use crate::generation::{Generation, Piece};
use crate::openai::{
    collect, new_id, prepare_chat_request, read_body, submit, ChoiceBuilder, Prepared,
};
use crate::tools::ToolSetup;
use crate::AppState;

const ENDPOINT: &str = "/v1/messages";

fn error_response(e: &AnthropicError) -> Response {
    error_body_response(e.status, e.body())
}

fn from_worker(e: WorkerError) -> AnthropicError {
    AnthropicError::from(e.to_api())
}

pub(crate) async fn messages(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let report_usage = crate::openai::wants_usage_report(&req);
    let given = crate::openai::given_prompt(&req);
    let kv_source = state.transfers.source(req.headers());
    let result = async {
        let body = read_body(req, state.config.max_body_bytes).await?;
        let request: MessagesRequest = parse_json(&body)?;
        let chat = request.to_chat()?;
        let mut prepared = prepare_chat_request(&state, chat, given)
            .await
            .map_err(from_worker)?;
        prepared.report_usage = report_usage;
        prepared.pull_prompt(&state, kv_source.as_deref()).await;
        let generations = submit(&state, &prepared, started).map_err(from_worker)?;
        Ok::<_, AnthropicError>((prepared, generations))
    }
    .await;
    let (prepared, mut generations) = match result {
        Ok(x) => x,
        Err(e) => {
            state.metrics.count_request(ENDPOINT, e.status);
            return error_response(&e);
        }
    };
    let id = new_id("msg").replacen('-', "_", 1);
    if prepared.stream {
        state.metrics.count_request(ENDPOINT, 200);
        let Some(g) = generations.pop() else {
            return error_response(&ApiError::internal("no generation was started").into());
        };
        return event_stream(state, prepared, g, id);
    }
    let resp = match collect(&state, &prepared, generations).await {
        Ok((mut choices, usage)) => match choices.pop() {
            Some((builder, finish_reason)) => {
                let stop_sequence = builder.stop_sequence.clone();
                let (text, tool_calls) = builder.into_message();
                let metered = usage;
                let output = MessageOutput {
                    text,
                    tool_calls,
                    finish_reason,
                    usage,
                    stop_sequence,
                };
                crate::openai::with_usage(
                    metered,
                    axum::Json(MessagesResponse::new(id, prepared.model, output)).into_response(),
                )
            }
            None => error_response(&ApiError::internal("no choice was generated").into()),
        },
        Err(e) => error_response(&e.into()),
    };
    state
        .metrics
        .count_request(ENDPOINT, resp.status().as_u16());
    resp
}

/// Anthropic's event stream for one generation.
fn event_stream(state: Arc<AppState>, prepared: Prepared, g: Generation, id: String) -> Response {
    let input_tokens = prepared.requests.first().map_or(0, |r| r.prompt.len()) as u32;
    let mut events = MessageStream::new(id, prepared.model.clone(), input_tokens);
    // Like Anthropic, a ping follows message_start (clients must accept pings anywhere).
    let mut first = events.start();
    first.push(MessageStream::ping());
    let mut opening = frame_events(&first);
    if prepared.report_usage {
        // A stream cut short never reaches its usage comment: the gateway charges this prompt.
        opening.insert_str(
            0,
            &lastmile_protocol::TokenUsage::prompt_comment(u64::from(input_tokens)),
        );
    }
    let init = EventStream {
        builder: prepared.choice(0, state.engine.tokenizer()),
        state,
        g,
        events,
        done: false,
        report_usage: prepared.report_usage,
    };
    let rest = stream::unfold(init, |mut s| async move {
        if s.done {
            return None;
        }
        let out = s.next_frames().await;
        Some((Ok::<_, Infallible>(out), s))
    });
    let body = stream::StreamExt::chain(
        stream::once(async move { Ok::<_, Infallible>(opening) }),
        rest,
    );
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Where one Anthropic event stream stands: its generation, the message built so far, the
/// events framed so far, and whether it has ended.
struct EventStream {
    state: Arc<AppState>,
    g: Generation,
    builder: ChoiceBuilder,
    events: MessageStream,
    done: bool,
    report_usage: bool,
}

impl EventStream {
    /// The frames for the generation's next piece: content deltas, or the closing events (with
    /// the usage comment when asked); an error or a generation that stops short ends the stream
    /// with an error event.
    async fn next_frames(&mut self) -> String {
        let tok = self.state.engine.tokenizer();
        match self.g.next(&self.state.metrics).await {
            Some(Ok(Piece::Text { text, token })) => {
                let update = self.builder.push(&text, token, tok);
                frame_update(&mut self.events, update)
            }
            // Never asked for on this endpoint.
            Some(Ok(Piece::PromptLogprobs(_))) => String::new(),
            Some(Ok(Piece::End(reason, usage, stop))) => {
                let (update, reason) = self.builder.finish(reason);
                let mut out = frame_update(&mut self.events, update);
                out.push_str(&frame_events(&self.events.finish(
                    reason,
                    usage.completion_tokens,
                    stop.as_deref(),
                )));
                if self.report_usage {
                    out.push_str(&usage.metered().to_sse_comment());
                }
                self.done = true;
                out
            }
            Some(Err(e)) => {
                self.done = true;
                frame_events(&[AnthropicError::from(e).event()])
            }
            None => {
                self.done = true;
                frame_events(&[AnthropicError::from(ApiError::internal(
                    "the generation ended without a result",
                ))
                .event()])
            }
        }
    }
}

fn frame_update(events: &mut MessageStream, update: crate::openai::Update) -> String {
    let mut out = frame_events(&events.text(&update.text));
    for call in update.calls {
        out.push_str(&frame_events(&events.tool_call(
            &call.id,
            &call.function.name,
            &call.function.arguments,
        )));
    }
    out
}

pub(crate) async fn count_tokens(State(state): State<Arc<AppState>>, req: Request) -> Response {
    const COUNT: &str = "/v1/messages/count_tokens";
    let result = async {
        let body = read_body(req, state.config.max_body_bytes).await?;
        let request: CountTokensRequest = parse_json(&body)?;
        let chat = request.to_chat()?;
        chat.validate()?;
        if chat.params.model != state.config.model_id {
            return Err(ApiError::model_not_found(&chat.params.model).into());
        }
        let tools = ToolSetup::from_request(&chat, state.engine.template().tool_style())?;
        let st = state.clone();
        let prompt = tokio::task::spawn_blocking(move || st.prompter.chat(&chat, tools.as_ref()))
            .await
            .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))?
            .map_err(from_worker)?;
        Ok::<_, AnthropicError>(CountTokensResponse {
            input_tokens: prompt.len() as u32,
        })
    }
    .await;
    let resp = match result {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => error_response(&e),
    };
    state.metrics.count_request(COUNT, resp.status().as_u16());
    resp
}
