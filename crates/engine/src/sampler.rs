//! Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, and a seeded
//! random generator so the same seed and request give the same output.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use llguidance::toktrie::SimpleVob;

use crate::engine::TokenLogprobs;

/// Sampling settings of one request (already validated by the API layer).
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass, 1 disables.
    pub top_p: f32,
    /// Keep the k most likely, 0 disables.
    pub top_k: usize,
    /// Drop tokens below `min_p * p_max`, 0 disables.
    pub min_p: f32,
    /// OpenAI presence penalty over generated tokens.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens.
    pub frequency_penalty: f32,
    /// Multiplicative penalty over prompt and generated tokens (1 disables).
    pub repetition_penalty: f32,
    /// Seed; a fresh random one when absent.
    pub seed: Option<u64>,
    /// Added to these tokens' logits before sampling (OpenAI `logit_bias`, -100..100); one
    /// copy shared by every choice of a request.
    pub logit_bias: Arc<[(u32, f32)]>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logit_bias: Arc::from([]),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and stable across platforms and versions.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// Per-sequence sampling state.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: HashMap<u32, u32>,
    prompt_set: HashSet<u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for a sequence with this prompt.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let prompt_set = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            rng: Rng::new(params.seed.unwrap_or_else(fresh_seed)),
            params,
            counts: HashMap::new(),
            prompt_set,
            candidates: Vec::new(),
        }
    }

    /// Records a token the sequence produced (for penalties).
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Picks the next token from `logits` (modified in place by penalties and biases); with
    /// `allowed`, only among those tokens.
    pub fn sample(&mut self, logits: &mut [f32], allowed: Option<&SimpleVob>) -> u32 {
        let Some(total) = self.candidates(logits, allowed) else {
            return argmax(logits);
        };
        let mut r = self.rng.next_f32() * total;
        let cands = &self.candidates;
        for c in cands.iter() {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        cands.last().map(|c| c.0).unwrap_or_else(|| argmax(logits))
    }

    /// Adjusts `logits` and, unless this sampler is greedy (`None`: take the argmax), fills
    /// `self.candidates` with the tokens it may pick and their weights; returns their sum.
    fn candidates(&mut self, logits: &mut [f32], allowed: Option<&SimpleVob>) -> Option<f32> {
        self.adjust_logits(logits, allowed);
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return None;
        }
        filter_candidates(&mut self.candidates, logits, p);
        Some(self.candidates.iter().map(|c| c.1).sum())
    }

    /// Applies logit biases, the `allowed` mask and the repetition, presence and frequency
    /// penalties to `logits` in place.
    fn adjust_logits(&self, logits: &mut [f32], allowed: Option<&SimpleVob>) {
        let p = &self.params;
        for &(t, bias) in p.logit_bias.iter() {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if let Some(mask) = allowed {
            let n = mask.len();
            for (i, l) in logits.iter_mut().enumerate() {
                if i >= n || !mask.is_allowed(i as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            for &t in self.prompt_set.iter().chain(self.counts.keys()) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
    }
}

/// Fills `cands` with the tokens of `logits` at temperature `p.temperature`, keeps the top-k,
/// turns them into probabilities, and drops those under min-p or outside the top-p nucleus.
fn filter_candidates(cands: &mut Vec<(u32, f32)>, logits: &[f32], p: &SamplingParams) {
    let inv_t = 1.0 / p.temperature;
    cands.clear();
    cands.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t)),
    );
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    if p.top_k > 0 && p.top_k < cands.len() {
        cands.select_nth_unstable_by(p.top_k - 1, desc);
        cands.truncate(p.top_k);
    }
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for c in cands.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1;
    }
    for c in cands.iter_mut() {
        c.1 /= sum;
    }
    if p.min_p > 0.0 {
        // After normalisation the most likely token has probability exp(0)/sum.
        let floor = p.min_p / sum;
        cands.retain(|c| c.1 >= floor);
    }
    if p.top_p < 1.0 {
        cands.sort_unstable_by(desc);
        let mut acc = 0.0;
        let mut keep = cands.len();
        for (i, c) in cands.iter().enumerate() {
            acc += c.1;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        cands.truncate(keep.max(1));
    }
}

/// The log probability of `token` and of the `top` most likely tokens under raw `logits`
/// (a log-softmax; ties keep the lower id first).
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let lse = max + sum.ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|b| l <= b.1) {
                continue;
            }
            let pos = best.partition_point(|b| b.1 >= l);
            best.insert(pos, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse),
        top: best.into_iter().map(|(i, l)| (i, l - lse)).collect(),
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value first, sixteen independent lanes at a time (the compiler keeps them in
    // vector registers; one running best would be a dependent chain through the whole
    // vocabulary), then the first index that holds it. NaNs are never the largest.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            if l > *m {
                *m = l;
            }
        }
    }
    let top = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    logits.iter().position(|&l| l == top).unwrap_or(0) as u32
}

/// Holds back generated text that might be the start of a stop string, and cuts the text at the
/// first stop string to complete (which is never emitted).
///
/// Matching is incremental: each stop string is a KMP automaton fed every generated byte once,
/// so a token costs the same whatever was generated before it, and at most the longest stop
/// string is held back.
#[derive(Default)]
pub struct StopMatcher {
    stops: Vec<StopString>,
    pending: String,
    matched: Option<usize>,
}

/// One stop string and how much of it the text generated so far ends with.
struct StopString {
    text: String,
    /// `fail[i]`: the longest proper prefix of `text[..=i]` that is also its suffix.
    fail: Vec<usize>,
    /// Bytes of `text` the generated text ends with now (always less than its length).
    state: usize,
}

impl StopString {
    fn new(text: String) -> Self {
        let p = text.as_bytes();
        let mut fail = vec![0; p.len()];
        let mut k = 0;
        for i in 1..p.len() {
            while k > 0 && p[i] != p[k] {
                k = fail[k - 1];
            }
            if p[i] == p[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self {
            text,
            fail,
            state: 0,
        }
    }

    /// Feeds one generated byte; true when the stop string is now complete.
    fn advance(&mut self, b: u8) -> bool {
        let p = self.text.as_bytes();
        let mut k = self.state;
        while k > 0 && p[k] != b {
            k = self.fail[k - 1];
        }
        if p[k] == b {
            k += 1;
        }
        self.state = k;
        k == p.len()
    }
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(StopString::new)
                .collect(),
            pending: String::new(),
            matched: None,
        }
    }

    /// The stop string that ended generation, once one has.
    pub fn matched(&self) -> Option<&str> {
        self.matched
            .and_then(|i| self.stops.get(i))
            .map(|s| s.text.as_str())
    }

    /// Adds generated text; returns what may be emitted now and whether a stop string matched.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        let from = self.pending.len();
        self.pending.push_str(text);
        let bytes = self.pending.as_bytes();
        for (i, &b) in bytes.iter().enumerate().skip(from) {
            // Of the stop strings completed by this byte, the one that started first.
            let mut done: Option<(usize, usize)> = None;
            for (which, s) in self.stops.iter_mut().enumerate() {
                if s.advance(b) {
                    let start = i + 1 - s.text.len();
                    if done.is_none_or(|(first, _)| start < first) {
                        done = Some((start, which));
                    }
                }
            }
            if let Some((start, which)) = done {
                // A stop string starts with a whole character: `start` is a boundary.
                let out = self.pending[..start].to_string();
                self.pending.clear();
                self.matched = Some(which);
                return (out, true);
            }
        }
        // The text ends with a (proper) prefix of a stop string: hold it back. Such a prefix
        // starts with a whole character, so the cut is a boundary.
        let hold = self.stops.iter().map(|s| s.state).max().unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases held-back text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized argmax picks what a plain scan does: the first index of the largest
    /// value, NaNs skipped, ties (also 0.0 against -0.0) to the first, 0 when nothing is larger
    /// than minus infinity; at every length around the lane width.
    #[test]
    fn argmax_is_the_first_largest() {
        let scan = |l: &[f32]| -> u32 {
            let mut best: Option<usize> = None;
            for (i, &x) in l.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b| x > l[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut seed = 7u64;
        for len in (1..70).chain([49152, 49155]) {
            for case in 0..6 {
                let mut l: Vec<f32> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((seed >> 40) % 7) as f32 - 3.0
                    })
                    .collect();
                match case {
                    1 => l.iter_mut().step_by(3).for_each(|x| *x = f32::NAN),
                    2 => l.fill(f32::NEG_INFINITY),
                    3 => {
                        l.fill(-1.0);
                        l[len / 2] = 0.0;
                        l[len - 1] = -0.0;
                    }
                    4 => l.fill(f32::NAN),
                    5 => l[len - 1] = 100.0,
                    _ => {}
                }
                assert_eq!(argmax(&l), scan(&l), "len {len} case {case}: {l:?}");
            }
        }
    }

    #[test]
    fn greedy_picks_argmax_and_penalties_apply() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], None), 1);
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 1.0,
                ..SamplingParams::greedy()
            },
            &[],
        );
        s.observe(1);
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], None), 2);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            &[1],
        );
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], None), 2);
    }

    #[test]
    fn same_seed_same_samples() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.1).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), None))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert!(
            run().iter().collect::<HashSet<_>>().len() > 3,
            "sampling should vary"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_candidates() {
        let logits = vec![5.0, 4.9, 0.0, -1.0];
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 2,
                seed: Some(1),
                ..Default::default()
            },
            &[],
        );
        for _ in 0..50 {
            assert!(s.sample(&mut logits.clone(), None) < 2);
        }
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                seed: Some(1),
                ..Default::default()
            },
            &[],
        );
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), None), 0);
        }
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.5,
                seed: Some(1),
                ..Default::default()
            },
            &[],
        );
        for _ in 0..50 {
            assert!(s.sample(&mut logits.clone(), None) < 2);
        }
    }

    #[test]
    fn logit_bias_and_mask_steer_the_choice() {
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: Arc::from([(0, 100.0)]),
                ..SamplingParams::greedy()
            },
            &[],
        );
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], None), 0);
        let mut mask = SimpleVob::alloc(3);
        mask.allow_token(2);
        for params in [SamplingParams::greedy(), SamplingParams::default()] {
            let mut s = Sampler::new(params, &[]);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], Some(&mask)), 2);
            }
        }
        // Logits past the mask's length (padding rows of the output matrix) are never chosen.
        let short = SimpleVob::alloc_ones(2);
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut [0.1, 2.0, 9.0], Some(&short)), 1);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprobs(&logits, 2, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let total: f32 = (0..4).map(|t| logprobs(&logits, t, 0).logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn stop_strings_across_pushes_are_cut_and_held() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.matched(), None);
        assert_eq!(m.push("Dxyz"), (String::new(), true));
        assert_eq!(m.matched(), Some("END"));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("ab EN"), ("ab ".to_string(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.flush(), "E");
    }

    #[test]
    fn stop_strings_with_repeats_and_overlaps_match_incrementally() {
        // Self-overlapping: "aab" inside "aaab" needs the automaton to fall back, not restart.
        let mut m = StopMatcher::new(vec!["aab".into(), "xyz".into()]);
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.push("a"), (String::new(), false));
        assert_eq!(m.push("a"), ("a".to_string(), false));
        assert_eq!(m.push("bc"), (String::new(), true));
        assert_eq!(m.matched(), Some("aab"));
        // Multi-byte characters are never split, held or emitted.
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("café"), ("caf".to_string(), false));
        assert_eq!(m.push("s"), ("és".to_string(), false));
        assert_eq!(m.push("é!"), (String::new(), true));
        // Of two stop strings completed by one byte, the one that started first wins.
        let mut m = StopMatcher::new(vec!["b".into(), "ab".into()]);
        assert_eq!(m.push("xab"), ("x".to_string(), true));
        assert_eq!(m.matched(), Some("ab"));
        // A long run of near-misses holds back only the longest partial match.
        let mut m = StopMatcher::new(vec![format!("{}b", "a".repeat(511))]);
        let mut out = 0;
        for _ in 0..(1 << 16) {
            out += m.push("a").0.len();
        }
        assert_eq!(out, (1 << 16) - 511);
        assert_eq!(m.flush().len(), 511);
    }
}
