//! Driving one engine request for an HTTP response: either collecting it whole, or turning it into
//! a stream of text pieces — and recording latency metrics on the way. Dropping the driver (the
//! client went away) drops the engine stream, which cancels the request in the engine.

use std::time::Instant;

use lastmile_engine::{FinishReason as EngineFinish, GenerationEvent, GenerationStream};
use lastmile_protocol::{ApiError, FinishReason, Usage};

use crate::metrics::Metrics;

/// What the driver yields.
pub(crate) enum Piece {
    /// New text (never empty).
    Text(String),
    /// The end, with the reason and token counts.
    End(FinishReason, Usage),
}

/// One engine request being relayed to a client.
pub(crate) struct Generation {
    stream: GenerationStream,
    started: Instant,
    last_token: Option<Instant>,
    pending_end: Option<(EngineFinish, usize, usize)>,
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
        if let Some((reason, p, c)) = self.pending_end.take() {
            return Some(Ok(self.finish(reason, p, c, metrics)));
        }
        loop {
            let Some(ev) = self.stream.next().await else {
                self.done = true;
                return Some(Err(ApiError::internal(
                    "the engine ended the request unexpectedly",
                )));
            };
            match ev {
                GenerationEvent::Token { text, .. } => {
                    let now = Instant::now();
                    match self.last_token {
                        None => metrics.ttft.observe((now - self.started).as_secs_f64()),
                        Some(prev) => metrics.itl.observe((now - prev).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                    metrics
                        .generation_tokens
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !text.is_empty() {
                        return Some(Ok(Piece::Text(text)));
                    }
                }
                GenerationEvent::Finished {
                    reason,
                    text,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if !text.is_empty() {
                        // Release held-back text first; the end comes on the next call.
                        self.pending_end = Some((reason, prompt_tokens, completion_tokens));
                        return Some(Ok(Piece::Text(text)));
                    }
                    return Some(Ok(self.finish(
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        metrics,
                    )));
                }
                GenerationEvent::Failed(msg) => {
                    self.done = true;
                    return Some(Err(ApiError::internal(format!("generation failed: {msg}"))));
                }
            }
        }
    }

    fn finish(
        &mut self,
        reason: EngineFinish,
        prompt: usize,
        completion: usize,
        metrics: &Metrics,
    ) -> Piece {
        self.done = true;
        metrics.e2e.observe(self.started.elapsed().as_secs_f64());
        let reason = match reason {
            EngineFinish::Stop => FinishReason::Stop,
            EngineFinish::Length => FinishReason::Length,
        };
        Piece::End(reason, Usage::new(prompt as u32, completion as u32))
    }
}
