//! OpenAI's SSE framing for one or more choices: (chat) a role delta per choice first, then
//! content, tool-call and log-probability deltas as each choice's tokens arrive (choices
//! interleave, each chunk names its index), a finish chunk per choice, an optional usage chunk,
//! then `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;
use futures::stream::{self, BoxStream, StreamExt};
use lastmile_protocol::{
    sse_event, ApiError, ChatCompletionChunk, CompletionChunk, ResponseMeta, ToolCallDelta, Usage,
    SSE_DONE,
};

use super::choices::{ChoiceBuilder, Update};
use super::{Kind, Prepared};
use crate::generation::{Generation, Piece};
use crate::AppState;

/// One choice's pieces, tagged with its index.
fn choice_pieces(
    state: Arc<AppState>,
    g: Generation,
    index: usize,
) -> BoxStream<'static, (usize, Result<Piece, ApiError>)> {
    stream::unfold((state, g), move |(state, mut g)| async move {
        let piece = g.next(&state.metrics).await?;
        Some(((index, piece), (state, g)))
    })
    .boxed()
}

struct Framer {
    state: Arc<AppState>,
    meta: ResponseMeta,
    kind: Kind,
    include_usage: bool,
    /// End with the usage comment (the gateway meters).
    report_usage: bool,
    builders: Vec<ChoiceBuilder>,
    /// Tool calls already streamed per choice (the next call's index).
    calls_sent: Vec<u32>,
    running: usize,
    usage: Usage,
}

impl Framer {
    fn event_chat(&self, chunk: ChatCompletionChunk) -> String {
        sse_event(&chunk.with_usage_field(self.include_usage))
    }

    fn event_completion(&self, chunk: CompletionChunk) -> String {
        sse_event(&chunk.with_usage_field(self.include_usage))
    }

    /// The opening chunks: chat role deltas, or echoed prompts.
    fn opening(&self) -> String {
        let mut out = String::new();
        for b in &self.builders {
            match self.kind {
                Kind::Chat => out
                    .push_str(&self.event_chat(ChatCompletionChunk::role(&self.meta).at(b.index))),
                Kind::Completion if !b.text().is_empty() => out.push_str(
                    &self.event_completion(CompletionChunk::text(&self.meta, b.text()).at(b.index)),
                ),
                Kind::Completion => {}
            }
        }
        out
    }

    fn frame_update(&mut self, i: usize, update: Update) -> String {
        let mut out = String::new();
        if update.is_empty() {
            return out;
        }
        let index = self.builders[i].index;
        match self.kind {
            Kind::Chat => {
                if !update.text.is_empty() || update.chat_logprobs.is_some() {
                    let chunk = ChatCompletionChunk::content(&self.meta, update.text)
                        .at(index)
                        .with_logprobs(update.chat_logprobs);
                    out.push_str(&self.event_chat(chunk));
                }
                for call in update.calls {
                    let k = self.calls_sent[i];
                    self.calls_sent[i] += 1;
                    let start = ToolCallDelta::start(k, &call.id, &call.function.name);
                    let args = ToolCallDelta::arguments(k, call.function.arguments);
                    for delta in [start, args] {
                        let chunk =
                            ChatCompletionChunk::tool_calls(&self.meta, vec![delta]).at(index);
                        out.push_str(&self.event_chat(chunk));
                    }
                }
            }
            Kind::Completion => {
                let chunk = CompletionChunk::text(&self.meta, update.text)
                    .at(index)
                    .with_logprobs(update.completion_logprobs);
                out.push_str(&self.event_completion(chunk));
            }
        }
        out
    }

    /// Frames one piece of choice `i`; `true` once every choice has ended.
    fn piece(&mut self, i: usize, piece: Piece) -> (String, bool) {
        let tok = self.state.engine.tokenizer();
        match piece {
            Piece::Text { text, token } => {
                let update = self.builders[i].push(&text, token, tok);
                (self.frame_update(i, update), false)
            }
            Piece::PromptLogprobs(entries) => {
                let update = self.builders[i].push_prompt(entries, tok);
                (self.frame_update(i, update), false)
            }
            Piece::End(reason, usage, _) => {
                let (update, reason) = self.builders[i].finish(reason);
                let mut out = self.frame_update(i, update);
                let index = self.builders[i].index;
                out.push_str(&match self.kind {
                    Kind::Chat => {
                        self.event_chat(ChatCompletionChunk::finish(&self.meta, reason).at(index))
                    }
                    Kind::Completion => {
                        self.event_completion(CompletionChunk::finish(&self.meta, reason).at(index))
                    }
                });
                self.usage = Usage::new(
                    usage.prompt_tokens,
                    self.usage.completion_tokens + usage.completion_tokens,
                );
                self.running -= 1;
                if self.running > 0 {
                    return (out, false);
                }
                if self.include_usage {
                    out.push_str(&match self.kind {
                        Kind::Chat => {
                            sse_event(&ChatCompletionChunk::usage(&self.meta, self.usage))
                        }
                        Kind::Completion => {
                            sse_event(&CompletionChunk::usage(&self.meta, self.usage))
                        }
                    });
                }
                if self.report_usage {
                    out.push_str(&self.usage.metered().to_sse_comment());
                }
                out.push_str(SSE_DONE);
                (out, true)
            }
        }
    }
}

/// The streamed response for `generations` (one per choice).
pub(crate) fn openai_stream(
    state: Arc<AppState>,
    prepared: Prepared,
    generations: Vec<Generation>,
    meta: ResponseMeta,
    kind: Kind,
) -> Response {
    let builders: Vec<ChoiceBuilder> = (0..generations.len())
        .map(|i| prepared.choice(i as u32, state.engine.tokenizer()))
        .collect();
    let merged = stream::select_all(
        generations
            .into_iter()
            .enumerate()
            .map(|(i, g)| choice_pieces(state.clone(), g, i)),
    );
    let prompt_tokens = prepared
        .requests
        .first()
        .map_or(0, |r| r.prompt.len() as u64);
    let framer = Framer {
        state,
        meta,
        kind,
        include_usage: prepared.include_usage,
        report_usage: prepared.report_usage,
        calls_sent: vec![0; builders.len()],
        running: builders.len(),
        builders,
        usage: Usage::new(0, 0),
    };
    let mut opening = framer.opening();
    if framer.report_usage {
        // A stream cut short never reaches its usage comment: the gateway charges this prompt.
        opening.insert_str(
            0,
            &lastmile_protocol::TokenUsage::prompt_comment(prompt_tokens),
        );
    }
    let body = stream::once(async move { Ok::<_, Infallible>(opening) }).chain(stream::unfold(
        (framer, merged, false),
        |(mut framer, mut merged, done)| async move {
            if done {
                return None;
            }
            let (out, done) = match merged.next().await {
                Some((i, Ok(piece))) => framer.piece(i, piece),
                Some((_, Err(e))) => (format!("{}{SSE_DONE}", sse_event(&e.body())), true),
                None => (SSE_DONE.to_string(), true),
            };
            Some((Ok::<_, Infallible>(out), (framer, merged, done)))
        },
    ));
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
