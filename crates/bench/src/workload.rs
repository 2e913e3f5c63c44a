//! What a run sends: synthetic prompts of a given length in (roughly) tokens, built from common
//! English words with a seeded generator so every run and every server gets the same text.

use serde::Serialize;

use crate::BenchError;

/// The shape of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Independent requests of `input_tokens` in and `output_tokens` out.
    Fixed,
    /// Every request starts with the same `system_tokens` system prompt, then a distinct user turn.
    SharedPrefix,
    /// `requests` conversations of `turns` turns each; every turn resends the whole history
    /// (system prompt, earlier turns and the model's replies) plus a new user message.
    MultiTurn,
}

/// A workload.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Its shape.
    pub kind: WorkloadKind,
    /// Requests (conversations for `MultiTurn`).
    pub requests: usize,
    /// Turns per conversation (`MultiTurn` only).
    pub turns: usize,
    /// Approximate tokens of each user message.
    pub input_tokens: usize,
    /// Tokens to generate per request (`max_tokens`, with `ignore_eos`).
    pub output_tokens: usize,
    /// Approximate tokens of the shared system prompt (`SharedPrefix`, `MultiTurn`).
    pub system_tokens: usize,
    /// Seed of the text generator.
    pub seed: u64,
}

pub(crate) struct ConversationPlan {
    pub(crate) system: Option<String>,
    pub(crate) turns: Vec<String>,
}

/// splitmix64: small and stable.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "time",
    "people",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "number",
    "group",
    "problem",
    "fact",
    "water",
    "house",
    "river",
    "city",
    "market",
    "garden",
    "music",
    "paper",
    "story",
    "table",
    "window",
    "road",
    "light",
    "money",
    "family",
    "school",
    "country",
    "question",
    "answer",
    "system",
    "program",
    "power",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "name",
    "idea",
    "body",
    "information",
    "back",
    "face",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "right",
    "big",
    "high",
    "different",
    "small",
    "large",
    "next",
    "early",
    "young",
    "important",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "green",
    "blue",
    "quiet",
    "bright",
    "simple",
    "strong",
    "happy",
    "careful",
    "open",
    "see",
    "make",
    "go",
    "know",
    "take",
    "think",
    "come",
    "give",
    "look",
    "use",
    "find",
    "want",
    "tell",
    "ask",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "keep",
    "hold",
    "bring",
    "write",
    "read",
    "learn",
];

fn text(rng: &mut Rng, words: usize) -> String {
    let mut out = String::with_capacity(words * 7);
    for i in 0..words {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
    }
    out
}

impl Workload {
    /// Checks the numbers make sense.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.requests == 0 || self.output_tokens == 0 || self.input_tokens == 0 {
            return Err(BenchError::Config(
                "requests, input and output tokens must be at least 1".into(),
            ));
        }
        if self.kind == WorkloadKind::MultiTurn && self.turns == 0 {
            return Err(BenchError::Config(
                "a multi-turn workload needs at least one turn".into(),
            ));
        }
        Ok(())
    }

    /// Total requests the workload sends.
    pub fn total_requests(&self) -> usize {
        match self.kind {
            WorkloadKind::MultiTurn => self.requests * self.turns,
            _ => self.requests,
        }
    }

    /// A single user message of about `tokens` tokens (distinct from the planned ones).
    pub(crate) fn long_prompt(&self, tokens: usize) -> String {
        let mut rng = Rng::new(self.seed ^ 0x10_4E6);
        // The generated words are about one token each.
        format!(
            "Summarize: {}",
            text(&mut rng, tokens.saturating_sub(24).max(1))
        )
    }

    pub(crate) fn plan(&self) -> Vec<ConversationPlan> {
        let mut rng = Rng::new(self.seed);
        let system = (self.system_tokens > 0 && self.kind != WorkloadKind::Fixed).then(|| {
            format!(
                "You are a helpful assistant. Background notes: {}",
                text(&mut rng, self.system_tokens)
            )
        });
        (0..self.requests)
            .map(|i| {
                let turns = if self.kind == WorkloadKind::MultiTurn {
                    self.turns
                } else {
                    1
                };
                ConversationPlan {
                    system: system.clone(),
                    turns: (0..turns)
                        .map(|t| format!("Request {i}.{t}: {}", text(&mut rng, self.input_tokens)))
                        .collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kind: WorkloadKind) -> Workload {
        Workload {
            kind,
            requests: 3,
            turns: 2,
            input_tokens: 5,
            output_tokens: 4,
            system_tokens: 20,
            seed: 1,
        }
    }

    #[test]
    fn plans_are_deterministic_and_shaped_by_kind() {
        let a = w(WorkloadKind::SharedPrefix).plan();
        let b = w(WorkloadKind::SharedPrefix).plan();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].system, a[2].system, "one shared system prompt");
        assert_ne!(a[0].turns, a[1].turns, "distinct user turns");
        assert_eq!(a[1].turns, b[1].turns, "seeded");
        assert!(w(WorkloadKind::Fixed).plan()[0].system.is_none());
        let m = w(WorkloadKind::MultiTurn).plan();
        assert!(m.iter().all(|c| c.turns.len() == 2));
        assert_eq!(w(WorkloadKind::MultiTurn).total_requests(), 6);
    }
}
