//! Driving one engine request for an HTTP response: either collecting it whole, or turning it into
//! a stream of text pieces — and recording latency metrics on the way. Dropping the driver (the
//! client went away) drops the engine stream, which cancels the request in the engine.

use std::time::Instant;

use lastmile_engine::{
    FinishReason as EngineFinish, GenerationEvent, GenerationStream, TokenLogprobs,
};
use lastmile_protocol::{ApiError, FinishReason, Usage};

use crate::metrics::Metrics;

/// What the driver yields.
pub(crate) enum Piece {
    /// New text; empty only when it carries a token's log probabilities (text held back).
    Text {
        /// The text.
        text: String,
        /// The token that produced it, with its log probabilities, when they were asked for.
        token: Option<(u32, TokenLogprobs)>,
    },
    /// Log probabilities of prompt tokens (from the second on), before any text.
    PromptLogprobs(Vec<(u32, TokenLogprobs)>),
    /// The end, with the reason, the token counts and the stop string that ended it (if one did).
    End(FinishReason, Usage, Option<String>),
}

impl Piece {
    fn text(text: String) -> Self {
        Self::Text { text, token: None }
    }
}

/// How the engine ended a request.
struct Ending {
    reason: EngineFinish,
    prompt_tokens: usize,
    completion_tokens: usize,
    stop_sequence: Option<String>,
}

/// One engine request being relayed to a client.
pub(crate) struct Generation {
    stream: GenerationStream,
    started: Instant,
    last_token: Option<Instant>,
    pending_end: Option<Ending>,
    done: bool,
}

impl Generation {
    pub(crate) fn new(stream: GenerationStream, started: Instant) -> Self {
        Self {
            stream,
            started,
            last_token: None,
            pending_end: None,
            done: false,
        }
    }

    /// The next piece, `None` after the end.
    pub(crate) async fn next(&mut self, metrics: &Metrics) -> Option<Result<Piece, ApiError>> {
        if self.done {
            return None;
        }
        if let Some(end) = self.pending_end.take() {
            return Some(Ok(self.finish(end, metrics)));
        }
        loop {
            let Some(ev) = self.stream.next().await else {
                self.done = true;
                return Some(Err(ApiError::internal(
                    "the engine ended the request unexpectedly",
                )));
            };
            match ev {
                GenerationEvent::Token { id, text, logprobs } => {
                    let now = Instant::now();
                    match self.last_token {
                        None => metrics.observe_ttft((now - self.started).as_secs_f64()),
                        Some(prev) => metrics.observe_itl((now - prev).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                    metrics
                        .generation_tokens
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(lp) = logprobs {
                        return Some(Ok(Piece::Text {
                            text,
                            token: Some((id, lp)),
                        }));
                    }
                    if !text.is_empty() {
                        return Some(Ok(Piece::text(text)));
                    }
                }
                GenerationEvent::Finished {
                    reason,
                    text,
                    prompt_tokens,
                    completion_tokens,
                    stop_sequence,
                } => {
                    let end = Ending {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        stop_sequence,
                    };
                    if !text.is_empty() {
                        // Release held-back text first; the end comes on the next call.
                        self.pending_end = Some(end);
                        return Some(Ok(Piece::text(text)));
                    }
                    return Some(Ok(self.finish(end, metrics)));
                }
                GenerationEvent::PromptLogprobs(entries) => {
                    return Some(Ok(Piece::PromptLogprobs(entries)));
                }
                GenerationEvent::Failed(e) => {
                    self.done = true;
                    // The engine's reason decides the status: an overload is a 503 with
                    // Retry-After, a request too large for the KV cache a 400, a bug a 500.
                    return Some(Err(crate::error::engine_api_error(&e)));
                }
            }
        }
    }

    fn finish(&mut self, end: Ending, metrics: &Metrics) -> Piece {
        self.done = true;
        metrics.e2e.observe(self.started.elapsed().as_secs_f64());
        let reason = match end.reason {
            EngineFinish::Stop => FinishReason::Stop,
            EngineFinish::Length => FinishReason::Length,
        };
        let usage = Usage::new(end.prompt_tokens as u32, end.completion_tokens as u32);
        Piece::End(reason, usage, end.stop_sequence)
    }
}
