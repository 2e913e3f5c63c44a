//! The `speculative` request extension (speculative decoding by prompt lookup or by the
//! server's draft model) and its checks.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Where a request's drafts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeculativeMethod {
    /// Earlier text that the last tokens repeat (the prompt and the output so far).
    PromptLookup,
    /// The server's draft model (`--draft-model`), greedily.
    DraftModel,
}

/// The `speculative` extension: speculative decoding for this request. By prompt lookup, the
/// last `ngram` tokens (then shorter suffixes, down to 2) are looked up in the prompt and the
/// text so far and up to `max_draft` tokens of what followed are verified in one step; by draft
/// model, the server's smaller model guesses up to `max_draft` tokens. The output is the same as
/// without (greedy, or sampled with a seed). `{"max_draft": 0}` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeParams {
    /// `prompt_lookup` or `draft_model`; absent: the server's draft model if it has one, else
    /// prompt lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<SpeculativeMethod>,
    /// Longest suffix matched, 1 to [`MAX_SPECULATIVE_NGRAM`] (default 3).
    #[serde(default = "SpeculativeParams::default_ngram")]
    pub ngram: u32,
    /// Most draft tokens per step, 0 to [`MAX_SPECULATIVE_DRAFT`] (default 8; 0: off).
    #[serde(default = "SpeculativeParams::default_max_draft")]
    pub max_draft: u32,
}

/// Longest n-gram `speculative.ngram` may ask for.
pub const MAX_SPECULATIVE_NGRAM: u32 = 8;

/// Most draft tokens `speculative.max_draft` may ask for.
pub const MAX_SPECULATIVE_DRAFT: u32 = 16;

impl SpeculativeParams {
    fn default_ngram() -> u32 {
        3
    }

    fn default_max_draft() -> u32 {
        8
    }

    /// Checks both numbers' ranges (a draft model's presence is the server's to check).
    pub fn validate(&self) -> Result<(), ApiError> {
        if !(1..=MAX_SPECULATIVE_NGRAM).contains(&self.ngram) {
            return Err(ApiError::invalid_request(
                format!(
                    "speculative.ngram must be between 1 and {MAX_SPECULATIVE_NGRAM}, got {}",
                    self.ngram
                ),
                Some("speculative"),
            ));
        }
        if self.max_draft > MAX_SPECULATIVE_DRAFT {
            return Err(ApiError::invalid_request(
                format!(
                    "speculative.max_draft must be between 0 and {MAX_SPECULATIVE_DRAFT}, got {}",
                    self.max_draft
                ),
                Some("speculative"),
            ));
        }
        Ok(())
    }
}
