//! What a request may cost, read before it runs: its prompt (estimated) and the most it may
//! generate, per choice. A gateway reserves this from a tenant's token quota at admission.
//!
//! Invariant: the output limit is read with the very functions the worker uses to run the
//! request (`max_new_tokens`, `scores_only`, Anthropic's `to_chat`), so what is reserved is what
//! may be generated. A body the worker would reject generates nothing.

use crate::anthropic::MessagesRequest;
use crate::chat::ChatCompletionRequest;
use crate::completions::{CompletionRequest, PromptRef};

/// Bytes of text counted as one prompt token in an estimate (English averages about four; the
/// estimate is settled against the real count once the answer is done).
pub const BYTES_PER_TOKEN_ESTIMATE: usize = 4;

/// The cost of one request, as far as it can be known before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenReservation {
    /// Prompt tokens: exact for token-id prompts, else estimated from the text's length.
    pub prompt_tokens: u64,
    /// Most tokens each choice may generate; `None`: up to the context window (a chat request
    /// without `max_tokens`).
    pub output_tokens: Option<u64>,
    /// Choices (`n`), at least 1.
    pub choices: u64,
}

impl TokenReservation {
    /// Nothing: a request the worker refuses before running it, or that generates nothing.
    pub const NONE: Self = Self {
        prompt_tokens: 0,
        output_tokens: Some(0),
        choices: 1,
    };

    /// The reservation of a body sent to `path` (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/messages`); `None` for other paths.
    pub fn of(path: &str, body: &[u8]) -> Option<Self> {
        Some(match path {
            "/v1/chat/completions" => serde_json::from_slice::<ChatCompletionRequest>(body)
                .ok()
                .filter(|r| r.validate().is_ok())
                .map_or(Self::NONE, |r| Self::of_chat(&r)),
            "/v1/completions" => serde_json::from_slice::<CompletionRequest>(body)
                .ok()
                .filter(|r| r.validate().is_ok())
                .map_or(Self::NONE, |r| Self::of_completion(&r)),
            "/v1/messages" => serde_json::from_slice::<MessagesRequest>(body)
                .ok()
                .and_then(|r| r.to_chat().ok())
                .map_or(Self::NONE, |r| Self::of_chat(&r)),
            _ => return None,
        })
    }

    /// A chat request's cost (Anthropic's requests run as their chat conversion).
    pub fn of_chat(req: &ChatCompletionRequest) -> Self {
        let text: usize = req
            .messages
            .iter()
            .map(|m| {
                m.text().len()
                    + m.tool_calls
                        .as_ref()
                        .map_or(0, |c| serde_json::to_string(c).map_or(0, |s| s.len()))
            })
            .sum::<usize>()
            + req
                .tools
                .as_ref()
                .map_or(0, |t| serde_json::to_string(t).map_or(0, |s| s.len()));
        Self {
            prompt_tokens: estimate(text),
            output_tokens: req.max_new_tokens().map(u64::from),
            choices: choices(req.params.n),
        }
    }

    /// A text completion's cost: `max_tokens` (16 when absent, as the worker runs it), none
    /// when `echo` only scores the prompt; the prompt is computed either way.
    pub fn of_completion(req: &CompletionRequest) -> Self {
        let prompt_tokens = match req.prompt.single() {
            Some(PromptRef::Tokens(ids)) => ids.len() as u64,
            Some(PromptRef::Text(text)) => estimate(text.len()),
            None => 0,
        };
        let output = if req.scores_only() {
            0
        } else {
            req.max_new_tokens()
        };
        Self {
            prompt_tokens,
            output_tokens: Some(u64::from(output)),
            choices: choices(req.params.n),
        }
    }

    /// Tokens to reserve: (prompt + output limit) × choices. An unlimited output is bounded by
    /// `context_length` when known, else `fallback` tokens per choice.
    pub fn total(&self, context_length: Option<u64>, fallback: u64) -> u64 {
        let output = match (self.output_tokens, context_length) {
            (Some(n), _) => n,
            (None, Some(ctx)) => ctx.saturating_sub(self.prompt_tokens).max(1),
            (None, None) => fallback,
        };
        self.prompt_tokens
            .saturating_add(output)
            .saturating_mul(self.choices)
    }
}

fn estimate(text_bytes: usize) -> u64 {
    text_bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE) as u64
}

fn choices(n: Option<u32>) -> u64 {
    u64::from(n.unwrap_or(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(path: &str, body: serde_json::Value) -> TokenReservation {
        TokenReservation::of(path, body.to_string().as_bytes()).expect("a generating path")
    }

    #[test]
    fn chat_reads_the_limit_as_the_worker_does_and_counts_every_choice() {
        let msgs = json!([{"role": "user", "content": "12345678"}]);
        let r = of(
            "/v1/chat/completions",
            json!({"model": "m", "messages": msgs, "max_completion_tokens": 1,
                "max_tokens": 8000, "n": 3}),
        );
        assert_eq!(r.prompt_tokens, 2);
        assert_eq!(
            r.output_tokens,
            Some(1),
            "max_completion_tokens wins, as in the worker"
        );
        assert_eq!(r.total(Some(4096), 256), 9);
        // Regression: no limit reserved a fixed 256 whatever n was.
        let r = of(
            "/v1/chat/completions",
            json!({"model": "m", "messages": msgs, "n": 16}),
        );
        assert_eq!(r.output_tokens, None);
        assert_eq!(r.total(Some(4096), 256), 4096 * 16);
        assert_eq!(r.total(None, 256), (2 + 256) * 16);
    }

    #[test]
    fn completions_and_messages_read_max_tokens_only() {
        // Regression: the gateway read max_completion_tokens (1) where the worker runs 8000.
        let r = of(
            "/v1/completions",
            json!({"model": "m", "prompt": [1, 2, 3], "max_completion_tokens": 1,
                "max_tokens": 8000}),
        );
        assert_eq!(r.total(None, 256), 8003);
        let r = of("/v1/completions", json!({"model": "m", "prompt": "x"}));
        assert_eq!(
            r.output_tokens,
            Some(16),
            "OpenAI's default, as the worker runs it"
        );
        let r = of(
            "/v1/messages",
            json!({"model": "m", "max_tokens": 8000, "max_completion_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(r.output_tokens, Some(8000));
    }

    #[test]
    fn echo_scoring_reserves_its_prompt() {
        let ids: Vec<u32> = (0..150).collect();
        let r = of(
            "/v1/completions",
            json!({"model": "m", "prompt": ids, "echo": true, "max_tokens": 0, "logprobs": 1}),
        );
        assert_eq!(r.total(None, 256), 150);
    }

    #[test]
    fn what_the_worker_refuses_reserves_nothing() {
        assert_eq!(
            of("/v1/chat/completions", json!({"messages": 3})),
            TokenReservation::NONE
        );
        assert_eq!(TokenReservation::of("/v1/models", b"{}"), None);
    }
}
