//! Closing a constrained answer within its token budget. Near the end of `max_tokens` a sequence
//! under a grammar keeps a closing (a token sequence that completes the grammar, see
//! [`Grammar::closing`]) that fits in the budget left; a sampled token that would leave no room
//! to close is replaced by the closing's first token, and from then on the closing is emitted to
//! its end. So a JSON answer cut by `max_tokens` still parses and matches its schema; its finish
//! reason stays `length`.
//!
//! Invariant while a closing is planned: its cost ([`Grammar::closing_cost`]: its length, less a
//! final end-of-generation token, which the budget's end makes needless) is at most the budget
//! left. Each sampled token is checked against it (a closing of the state after that token must
//! fit in what is left after it), only in the last [`CLOSING_WINDOW`] steps; the planned closing
//! is tried first and mostly still closes (the token was text inside a string), so a search is
//! rarely needed. A closing whose text just fills the budget is emitted without its
//! end-of-generation token: the budget ends the answer there, complete.

use std::collections::VecDeque;

use crate::constraint::Grammar;

/// How close to `max_tokens` (in tokens left) a sequence starts keeping a closing.
pub(super) const CLOSING_WINDOW: usize = 64;

/// One sequence's closing state.
#[derive(Debug, Default)]
pub(super) enum BudgetCloser {
    /// Not near the end of the budget yet.
    #[default]
    Idle,
    /// A closing of the current grammar state that fits in the budget left.
    Planned(Vec<u32>),
    /// Emitting this closing: these are the tokens still to come.
    Forcing(VecDeque<u32>),
    /// No closing that fits was found: the sequence samples as if there were no budget to meet.
    GaveUp,
}

impl BudgetCloser {
    /// The token this step must take, if the sequence is emitting its closing (else it samples,
    /// and [`Self::check`] judges the token). `left` is the budget left, this step's token
    /// included.
    pub(super) fn forced(&mut self, grammar: &Grammar, left: usize) -> Option<u32> {
        if left > CLOSING_WINDOW {
            return None;
        }
        if let Self::Idle = self {
            *self = match grammar.closing() {
                Some(c) if grammar.closing_cost(&c) <= left => Self::Planned(c),
                _ => Self::GaveUp,
            };
        }
        // A planned closing is not forced yet, even one that takes all the budget left: the
        // model may still pick a token that keeps to it (`F` where the closing says `C`, `",`
        // where it says `"` then `,`); [`Self::check`] turns to the closing when it does not.
        match self {
            Self::Forcing(rest) => rest.pop_front(),
            _ => None,
        }
    }

    /// The token to take instead of `sampled` (which the grammar allows): `sampled` itself when a
    /// closing of the state after it fits in what is left after it, else the first token of the
    /// current closing, which the sequence then emits to its end.
    pub(super) fn check(&mut self, grammar: &Grammar, left: usize, sampled: u32) -> u32 {
        let Self::Planned(current) = self else {
            return sampled;
        };
        match grammar.closing_after(sampled, current) {
            Some(next) if grammar.closing_cost(&next) < left => {
                *current = next;
                sampled
            }
            _ => {
                let mut rest: VecDeque<u32> = std::mem::take(current).into();
                // Never empty: an empty closing means the grammar is complete, and a complete
                // grammar leaves nothing to sample.
                let first = rest.pop_front().unwrap_or(sampled);
                *self = Self::Forcing(rest);
                first
            }
        }
    }

    /// Whether the sequence has switched to its closing (its end is then the budget's doing).
    pub(super) fn is_forcing(&self) -> bool {
        matches!(self, Self::Forcing(_))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::constraint::{GrammarCompiler, GrammarSpec};
    use crate::tokenizer::TextTokenizer;

    /// The default model's tokenizer and a fresh grammar for `spec` over it.
    fn compiled(spec: GrammarSpec) -> (Arc<TextTokenizer>, Grammar) {
        let path = lastmile_models::ensure_default_model().expect("default model");
        let tok = Arc::new(
            crate::loader::LoadedModel::load(&path)
                .expect("load")
                .tokenizer,
        );
        let g = GrammarCompiler::new(tok.clone())
            .compile(&spec)
            .expect("compiles");
        (tok, g)
    }

    /// The default model's tokenizer and a grammar for `{"a": <string>}` that has taken `{"a": "hel`.
    fn open_string() -> (Arc<TextTokenizer>, Grammar) {
        let schema = serde_json::json!({"type": "object",
            "properties": {"a": {"type": "string"}}, "required": ["a"]});
        let (tok, mut g) = compiled(GrammarSpec::JsonSchema(schema));
        for t in tok.encode(r#"{"a": "hel"#).expect("encode") {
            g.accept(t).expect("in the grammar");
        }
        (tok, g)
    }

    #[test]
    fn the_closing_is_taken_when_the_budget_left_is_its_length() {
        let (tok, mut g) = open_string();
        let word = tok.encode(" lo").expect("encode")[0];
        let close = tok.token_id("\"}").expect("one token for `\"}`");
        let mut closer = BudgetCloser::default();
        // Far from the end: nothing planned, any token passes.
        assert_eq!(closer.forced(&g, CLOSING_WINDOW + 1), None);
        assert_eq!(closer.check(&g, CLOSING_WINDOW + 1, word), word);
        // Two left, the closing `"}` takes one: sampling goes on.
        assert_eq!(closer.forced(&g, 2), None);
        assert_eq!(closer.check(&g, 2, word), word);
        g.accept(word).expect("word");
        assert!(!closer.is_forcing());
        // One left: the model still samples, but only a token that closes is taken as it is.
        let mut keeping = BudgetCloser::default();
        assert_eq!(keeping.forced(&g, 1), None);
        assert_eq!(keeping.check(&g, 1, close), close);
        assert!(!keeping.is_forcing());
        assert_eq!(closer.forced(&g, 1), None);
        assert_eq!(closer.check(&g, 1, word), close);
        assert!(closer.is_forcing());
        g.accept(close).expect("closing token");
        assert!(g.is_finished());
    }

    #[test]
    fn a_token_that_would_leave_no_room_to_close_is_replaced() {
        let (tok, g) = open_string();
        let mut closer = BudgetCloser::default();
        assert_eq!(closer.forced(&g, 2), None);
        // `\` opens an escape: `\"` is text, and the closing after it (`"` `"}`) takes two,
        // which no longer fits in the one left after it.
        let backslash = tok.token_id("\\").expect("backslash");
        let close = tok.token_id("\"}").expect("one token for `\"}`");
        assert_eq!(closer.check(&g, 2, backslash), close);
        assert!(closer.is_forcing());
        // Emitted: nothing more to force.
        assert_eq!(closer.forced(&g, 1), None);
    }

    #[test]
    fn a_final_end_of_generation_token_needs_no_budget() {
        // A number can go on: its closing is end-of-generation alone, which costs nothing.
        let (tok, mut g) = compiled(GrammarSpec::JsonSchema(
            serde_json::json!({"type": "integer"}),
        ));
        g.accept(tok.token_id("7").expect("7")).expect("digit");
        let closing = g.closing().expect("closing");
        assert!(
            closing.len() == 1 && tok.eog_ids.contains(&closing[0]),
            "{closing:?}"
        );
        assert_eq!(g.closing_cost(&closing), 0);
        // With one token left a digit still fits (the budget's end then ends the number).
        let mut closer = BudgetCloser::default();
        assert_eq!(closer.forced(&g, 1), None);
        let digit = tok.token_id("3").expect("3");
        assert_eq!(closer.check(&g, 1, digit), digit);
    }
}
