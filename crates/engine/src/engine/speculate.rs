//! Prompt-lookup speculative decoding: a sequence whose last few tokens already occurred earlier
//! (in its prompt or its own output) guesses that what followed then follows now, appends those
//! tokens as a draft, and the next step computes them all at once — one forward pass over
//! `1 + draft` positions instead of one. Sampling then walks the rows in order, samples each
//! exactly as it would without a draft, and keeps each draft token the model produced anyway
//! (greedy: the argmax; sampling: the same draw from the same random stream, so a draft token is
//! kept with exactly its probability — the standard acceptance rule for a draft of one certain
//! token — and the output is the one decoding without drafts gives, seed for seed), and one more
//! token from the row after the last accepted one. A CPU decode step reads every weight once whatever the
//! number of rows, so the accepted tokens come almost free where text repeats its input (edits,
//! rewrites, code, extraction).
//!
//! Drafts come from one of two places ([`DraftSource`]): prompt lookup, or a smaller draft model
//! with the same tokenizer (`super::draft`), which guesses greedily where no earlier text
//! repeats. Either is a draft of certain tokens, so verification is the same.
//!
//! Invariants: drafts never pass `max_tokens` (the last token always comes from the model); a
//! request whose drafts keep failing stops drafting ([`MIN_ACCEPTANCE`] after [`PROBATION`]
//! drafted tokens), so open-ended text pays almost nothing.

use std::ops::Range;

/// Where a request's drafts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DraftSource {
    /// The engine's default: its draft model when it was started with one, else prompt lookup.
    #[default]
    Default,
    /// Earlier text that the last tokens repeat (no second model).
    PromptLookup,
    /// The engine's draft model, greedily (`EngineHandle::start_with_draft`).
    DraftModel,
}

/// How one request drafts: match its last `ngram` tokens (then shorter suffixes, down to 2)
/// against earlier text, or ask the draft model, and draft up to `max_draft` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculation {
    /// Longest suffix matched against earlier text; shorter ones are tried next, down to 2 (a
    /// lone token is too weak a hint), or 1 when this is 1. Prompt lookup only.
    pub ngram: usize,
    /// Most draft tokens per step; 0 turns speculation off.
    pub max_draft: usize,
    /// Where the drafts come from.
    pub source: DraftSource,
}

impl Speculation {
    /// No drafting.
    pub const OFF: Self = Self {
        ngram: 0,
        max_draft: 0,
        source: DraftSource::Default,
    };

    /// Prompt lookup with these settings.
    pub const fn lookup(ngram: usize, max_draft: usize) -> Self {
        Self {
            ngram,
            max_draft,
            source: DraftSource::PromptLookup,
        }
    }

    /// Drafts of up to `max_draft` tokens by the engine's draft model.
    pub const fn draft_model(max_draft: usize) -> Self {
        Self {
            ngram: 0,
            max_draft,
            source: DraftSource::DraftModel,
        }
    }

    /// Whether this drafts at all.
    pub fn is_on(&self) -> bool {
        self.max_draft > 0 && (self.source == DraftSource::DraftModel || self.ngram > 0)
    }

    /// `self` with a `Default` source replaced by `default` (the engine's).
    pub(super) fn resolved(self, default: DraftSource) -> Self {
        match self.source {
            DraftSource::Default => Self {
                source: default,
                ..self
            },
            _ => self,
        }
    }
}

/// Drafting stops while more sequences than this run: a large batch already fills each step with
/// rows, and draft rows would take compute from the other streams.
pub(super) const MAX_RUNNING_TO_DRAFT: usize = 8;

/// Drafted tokens after which a request's acceptance rate is judged.
pub(super) const PROBATION: usize = 24;

/// Shortest suffix looked up (unless `ngram` itself is shorter): a single repeated token is
/// too weak a hint in open text.
const MIN_NGRAM: usize = 2;

/// Length of a request's first draft (drafts then grow while they are kept in full).
const FIRST_DRAFT: usize = 2;

/// Acceptance rate below which a request stops drafting (after [`PROBATION`]).
pub(super) const MIN_ACCEPTANCE: f64 = 0.2;

/// One sequence's drafting state. Draft length adapts: it doubles (up to `max_draft`) after a
/// draft kept in full and falls to one more than the tokens kept after a miss, so a step spends
/// draft rows — each costs about a tenth of a decode step on a CPU — where they are likely kept.
#[derive(Debug)]
pub(super) struct Drafter {
    spec: Speculation,
    /// The next draft's length.
    next: usize,
    drafted: usize,
    accepted: usize,
}

impl Drafter {
    /// A drafter for `spec`, or `None` when it is off.
    pub(super) fn new(spec: Speculation) -> Option<Self> {
        spec.is_on().then_some(Self {
            spec,
            next: FIRST_DRAFT.min(spec.max_draft),
            drafted: 0,
            accepted: 0,
        })
    }

    /// Whether it still drafts (it gives up on text its drafts do not match).
    pub(super) fn active(&self) -> bool {
        self.drafted < PROBATION || self.accepted as f64 >= MIN_ACCEPTANCE * self.drafted as f64
    }

    /// Where in `tokens` (prompt and output so far, the last one not yet computed) the draft to
    /// follow them lies, at most `room` tokens; empty when nothing matches or it gave up.
    pub(super) fn propose(&self, tokens: &[u32], room: usize) -> Range<usize> {
        lookup(tokens, self.spec.ngram, self.wanted(room))
    }

    /// How many tokens the next draft should have, at most `room`: 0 once it gave up.
    pub(super) fn wanted(&self, room: usize) -> usize {
        if self.active() {
            self.next.min(room)
        } else {
            0
        }
    }

    /// Whether its drafts come from the draft model.
    pub(super) fn by_model(&self) -> bool {
        self.spec.source == DraftSource::DraftModel
    }

    /// Counts a verified draft: `drafted` proposed, the first `accepted` kept; sizes the next.
    pub(super) fn record(&mut self, drafted: usize, accepted: usize) {
        self.drafted += drafted;
        self.accepted += accepted;
        self.next = if accepted == drafted {
            (self.next * 2).min(self.spec.max_draft)
        } else {
            (accepted + 1).min(self.spec.max_draft)
        };
    }
}

/// Where in `tokens` lies what followed the latest earlier occurrence of their last `n` tokens
/// (`n` from `ngram` down to [`MIN_NGRAM`], the longest match wins), at most `max` tokens.
pub(super) fn lookup(tokens: &[u32], ngram: usize, max: usize) -> Range<usize> {
    let len = tokens.len();
    if max == 0 {
        return 0..0;
    }
    for n in (MIN_NGRAM.min(ngram)..=ngram.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // The latest earlier window equal to the suffix (not the suffix itself).
        let found = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix);
        if let Some(i) = found {
            let from = i + n;
            return from..len.min(from + max);
        }
    }
    0..0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draft `lookup` finds in `t`.
    fn draft(t: &[u32], ngram: usize, max: usize) -> &[u32] {
        &t[lookup(t, ngram, max)]
    }

    #[test]
    fn the_latest_longest_match_supplies_the_draft() {
        // "1 2 3 9 ... 1 2 3 7 8 ... 2 3" : the suffix [2 3] last occurred before 7 8.
        let t = [1, 2, 3, 9, 5, 1, 2, 3, 7, 8, 6, 2, 3];
        assert_eq!(draft(&t, 2, 4), &[7, 8, 6, 2]);
        assert_eq!(draft(&t, 2, 1), &[7]);
        // A 3-gram [6 2 3] never occurred before: the 2-gram answers.
        assert_eq!(draft(&t, 3, 2), &[7, 8]);
    }

    #[test]
    fn no_match_no_room_or_too_short_means_no_draft() {
        assert!(draft(&[1, 2, 3, 4], 2, 8).is_empty());
        assert!(draft(&[1, 2, 1, 2], 2, 0).is_empty());
        assert!(draft(&[5], 3, 8).is_empty());
        assert!(draft(&[], 3, 8).is_empty());
        // A single repeated token is no hint (the shortest suffix looked up is 2)...
        assert!(draft(&[4, 9, 5, 4], 3, 8).is_empty());
        // ...unless the request asks for 1-grams.
        assert_eq!(draft(&[4, 9, 5, 4], 1, 8), &[9, 5, 4]);
    }

    #[test]
    fn a_draft_may_run_into_the_suffix_itself() {
        // Repetition: [7 7 7 7], suffix [7 7] last seen at 1..3, followed by [7].
        assert_eq!(draft(&[7, 7, 7, 7], 2, 8), &[7]);
        assert_eq!(draft(&[1, 2, 1, 2, 1, 2], 2, 8), &[1, 2]);
    }

    #[test]
    fn a_drafter_gives_up_on_text_it_cannot_predict() {
        let mut d = Drafter::new(Speculation::lookup(2, 4)).expect("on");
        let t = [1, 2, 3, 1, 2];
        let proposed = |d: &Drafter, room| t[d.propose(&t, room)].to_vec();
        assert_eq!(proposed(&d, 8), [3, 1], "the first draft is short");
        assert_eq!(proposed(&d, 1), [3], "room bounds the draft");
        d.record(2, 2);
        assert_eq!(
            proposed(&d, 8),
            [3, 1, 2],
            "kept in full: longer (up to the match)"
        );
        d.record(4, 1);
        assert_eq!(proposed(&d, 8), [3, 1], "a miss: one more than was kept");
        d.record(PROBATION, PROBATION / 10);
        assert!(!d.active());
        assert!(proposed(&d, 8).is_empty());
        let mut good = Drafter::new(Speculation::lookup(2, 4)).expect("on");
        good.record(PROBATION * 2, PROBATION);
        assert!(good.active(), "half accepted keeps drafting");
        assert!(Drafter::new(Speculation::OFF).is_none());
        assert!(Drafter::new(Speculation::draft_model(0)).is_none());
        let m = Drafter::new(Speculation::draft_model(4)).expect("on");
        assert!(m.by_model() && !good.by_model());
        assert_eq!(
            (m.wanted(8), m.wanted(1)),
            (2, 1),
            "short first, within room"
        );
    }
}
