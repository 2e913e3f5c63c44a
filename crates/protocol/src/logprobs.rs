//! Log probabilities in OpenAI's two shapes: per-token objects with bytes and alternatives
//! (`/v1/chat/completions`), and the legacy parallel arrays of `/v1/completions`.

use serde::{Deserialize, Serialize};
use serde_json::Map;

/// Most alternatives `top_logprobs` may ask for on `/v1/chat/completions`.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A token as clients see it: its text (lossy when it is part of a UTF-8 character) and bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    /// The token's text.
    pub text: String,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
}

impl TokenText {
    /// A token from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            text: String::from_utf8_lossy(bytes).into_owned(),
            bytes: bytes.to_vec(),
        }
    }
}

/// A `logprobs` object of a chat choice or chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per generated content token.
    pub content: Vec<ChatTokenLogprob>,
    /// Always null (no refusals).
    #[serde(default)]
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

/// One generated token with its log probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its UTF-8 bytes (a token may hold part of a character).
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token at one position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Option<Vec<u8>>,
}

impl ChatTokenLogprob {
    /// An entry from a token, its log probability and the alternatives.
    pub fn new(token: TokenText, logprob: f32, top: Vec<(TokenText, f32)>) -> Self {
        Self {
            token: token.text,
            logprob,
            bytes: Some(token.bytes),
            top_logprobs: top
                .into_iter()
                .map(|(t, lp)| TopLogprob {
                    token: t.text,
                    logprob: lp,
                    bytes: Some(t.bytes),
                })
                .collect(),
        }
    }
}

/// The `logprobs` object of a legacy completion choice: parallel arrays, one entry per token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Each token's log probability.
    pub token_logprobs: Vec<Option<f32>>,
    /// Each position's alternatives as token text → log probability.
    pub top_logprobs: Vec<Option<Map<String, serde_json::Value>>>,
    /// Each token's character offset in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends one token; `offset` is where its text starts in the choice's text.
    pub fn push(
        &mut self,
        token: TokenText,
        logprob: f32,
        top: Vec<(TokenText, f32)>,
        offset: usize,
    ) {
        self.tokens.push(token.text);
        self.token_logprobs.push(Some(logprob));
        let mut map = Map::new();
        for (t, lp) in top {
            // Alternatives with the same text keep the likelier (first) value, as OpenAI does.
            map.entry(t.text).or_insert_with(|| serde_json::json!(lp));
        }
        self.top_logprobs.push(Some(map));
        self.text_offset.push(offset);
    }

    /// Appends a token without a log probability (a prompt's first token, which nothing predicts).
    pub fn push_unscored(&mut self, token: TokenText, offset: usize) {
        self.tokens.push(token.text);
        self.token_logprobs.push(None);
        self.top_logprobs.push(None);
        self.text_offset.push(offset);
    }

    /// Moves `other`'s entries to the end of this one.
    pub fn append(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_entries_serialize_as_openai_does() {
        let entry = ChatTokenLogprob::new(
            TokenText::from_bytes(b"Hi"),
            -0.5,
            vec![
                (TokenText::from_bytes(b"Hi"), -0.5),
                (TokenText::from_bytes(&[0xe2]), -2.0),
            ],
        );
        let v = serde_json::to_value(ChatLogprobs {
            content: vec![entry],
            refusal: None,
        })
        .expect("serializes");
        assert_eq!(
            v,
            json!({"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                 {"token": "\u{FFFD}", "logprob": -2.0, "bytes": [226]}]}],
                "refusal": null})
        );
    }

    #[test]
    fn completion_arrays_stay_parallel() {
        let mut lp = CompletionLogprobs::default();
        lp.push(
            TokenText::from_bytes(b" a"),
            -1.0,
            vec![
                (TokenText::from_bytes(b" a"), -1.0),
                (TokenText::from_bytes(b" a"), -3.0),
            ],
            0,
        );
        lp.push(TokenText::from_bytes(b"b"), -0.25, vec![], 2);
        assert_eq!(
            serde_json::to_value(&lp).expect("serializes"),
            json!({"tokens": [" a", "b"], "token_logprobs": [-1.0, -0.25],
                   "top_logprobs": [{" a": -1.0}, {}], "text_offset": [0, 2]})
        );
    }
}
