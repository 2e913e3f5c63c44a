//! Draft-model speculative decoding: a smaller model with the same tokenizer (a 0.5B beside a 7B
//! of one family, a low-bit quantization beside a 16-bit model) guesses the next few tokens of
//! each drafting sequence greedily, and the next step of the served model verifies them as it
//! verifies prompt-lookup drafts (`super::speculate`): the output is the one decoding without
//! drafts gives, only faster where the guesses hold.
//!
//! The draft model runs on the CPU beside the served model, on the engine thread and its thread
//! pool, with its own paged KV cache: each sequence keeps the tokens its draft blocks hold, so a
//! draft round computes only what changed since the last (the tokens the served model kept or
//! sampled, a prompt's first pass in pieces of [`CATCH_UP`]) and then one batched decode step per
//! draft token for all drafting sequences together. Draft tokens that verification refused are
//! simply overwritten next round. A sequence's draft blocks go back to the pool when it ends.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::kv::KvCache;
use crate::model::{BatchSeq, LlamaModel, Scratch};
use crate::parallel::ThreadPool;

/// Most tokens of one sequence the draft model catches up on in one round: a long prompt's
/// first pass is spread over several steps (the sequence decodes without drafts meanwhile)
/// rather than stalling every stream for one long draft prefill.
pub(super) const CATCH_UP: usize = 256;

/// The draft cache's free blocks, shared with every sequence's [`DraftKv`] (which gives its
/// blocks back when dropped, on whichever thread holds the sequence then).
type FreeList = Arc<Mutex<Vec<u32>>>;

fn lock(free: &FreeList) -> MutexGuard<'_, Vec<u32>> {
    free.lock().unwrap_or_else(|e| e.into_inner())
}

/// The draft model, its KV cache and the free list of that cache's blocks.
pub(super) struct DraftModel {
    model: LlamaModel,
    kv: KvCache,
    free: FreeList,
    scratch: Scratch,
}

/// One sequence's place in the draft model's KV cache: its blocks, and the tokens whose keys
/// and values they hold (positions `0..tokens.len()`). Dropping it frees the blocks.
pub(super) struct DraftKv {
    free: FreeList,
    blocks: Vec<u32>,
    tokens: Vec<u32>,
}

impl Drop for DraftKv {
    fn drop(&mut self) {
        lock(&self.free).append(&mut self.blocks);
    }
}

/// One sequence's request for a draft: its text so far (prompt and output, the last token not
/// yet computed by the served model) and how many tokens to guess.
pub(super) struct DraftJob<'a> {
    /// Its state in the draft cache.
    pub(super) kv: &'a mut DraftKv,
    /// Prompt and output so far.
    pub(super) context: &'a [u32],
    /// Tokens wanted (at least 1).
    pub(super) want: usize,
    /// The draft: filled by [`DraftModel::propose`] (empty while the draft model is still
    /// catching up on a long prompt, or when its cache is full).
    pub(super) out: Vec<u32>,
}

impl<'a> DraftJob<'a> {
    /// A request for `want` guesses after `context`.
    pub(super) fn new(kv: &'a mut DraftKv, context: &'a [u32], want: usize) -> Self {
        Self {
            kv,
            context,
            want,
            out: Vec::new(),
        }
    }
}

impl DraftModel {
    /// The draft model with a cache of `num_blocks` blocks of `block_size` tokens (pages are
    /// committed only as they are used).
    pub(super) fn new(model: LlamaModel, num_blocks: usize, block_size: usize) -> Self {
        let c = &model.config;
        let kv = KvCache::new(c.layers, num_blocks, block_size, c.kv_dim());
        Self {
            model,
            kv,
            free: Arc::new(Mutex::new((0..num_blocks as u32).rev().collect())),
            scratch: Scratch::default(),
        }
    }

    /// A sequence's empty place in the cache.
    pub(super) fn new_kv(&self) -> DraftKv {
        DraftKv {
            free: self.free.clone(),
            blocks: Vec::new(),
            tokens: Vec::new(),
        }
    }

    /// Blocks free in the draft cache.
    #[cfg(test)]
    pub(super) fn free_blocks(&self) -> usize {
        lock(&self.free).len()
    }

    /// Fills each job's `out` with up to `want` greedy guesses of the draft model: one forward
    /// pass over every job's new tokens, then one batched decode step per further token.
    pub(super) fn propose(&mut self, jobs: &mut [DraftJob<'_>], pool: &ThreadPool) {
        let bs = self.kv.block_size;
        // Per job: the first position to compute, and whether this round reaches a draft.
        let mut plan: Vec<Option<(usize, bool)>> = Vec::with_capacity(jobs.len());
        for job in jobs.iter_mut() {
            let len = job.context.len();
            if len == 0 || job.want == 0 {
                plan.push(None);
                continue;
            }
            // Keys and values still right: the common prefix (and never the last token, whose
            // logits the first guess comes from).
            let same = job
                .kv
                .tokens
                .iter()
                .zip(job.context)
                .take_while(|(a, b)| a == b)
                .count()
                .min(len - 1);
            job.kv.tokens.truncate(same);
            let ready = len - same <= CATCH_UP;
            // Positions this round writes: the new tokens, then every guess but the last.
            let end = if ready {
                len + job.want - 1
            } else {
                same + CATCH_UP
            };
            let need = end.div_ceil(bs).saturating_sub(job.kv.blocks.len());
            let mut free = lock(&self.free);
            if need > free.len() {
                plan.push(None);
                continue;
            }
            let at = free.len() - need;
            job.kv.blocks.extend(free.drain(at..));
            plan.push(Some((same, ready)));
        }
        // The catch-up pass.
        let mut tokens = Vec::new();
        let mut seqs = Vec::new();
        for (job, p) in jobs.iter().zip(&plan) {
            let Some((from, ready)) = *p else { continue };
            let to = if ready {
                job.context.len()
            } else {
                from + CATCH_UP
            };
            seqs.push(BatchSeq {
                start: tokens.len(),
                len: to - from,
                pos0: from,
                blocks: &job.kv.blocks,
                logit_rows: usize::from(ready),
            });
            tokens.extend_from_slice(&job.context[from..to]);
        }
        if seqs.is_empty() {
            return;
        }
        self.model
            .forward(&tokens, &seqs, &mut self.kv, &mut self.scratch, pool);
        drop(seqs);
        let vocab = self.model.config.vocab;
        let mut row = 0;
        for (job, p) in jobs.iter_mut().zip(&plan) {
            let Some((from, ready)) = *p else { continue };
            if ready {
                job.kv.tokens.extend_from_slice(&job.context[from..]);
                let logits = &self.scratch.logits[row * vocab..(row + 1) * vocab];
                job.out.push(argmax(logits));
                row += 1;
            } else {
                job.kv
                    .tokens
                    .extend_from_slice(&job.context[from..from + CATCH_UP]);
            }
        }
        // One decode step per further guess, for every job that wants more.
        loop {
            let mut tokens = Vec::new();
            let mut seqs = Vec::new();
            let mut who = Vec::new();
            for (i, job) in jobs.iter().enumerate() {
                if job.out.is_empty() || job.out.len() >= job.want {
                    continue;
                }
                seqs.push(BatchSeq {
                    start: tokens.len(),
                    len: 1,
                    pos0: job.kv.tokens.len(),
                    blocks: &job.kv.blocks,
                    logit_rows: 1,
                });
                tokens.push(*job.out.last().expect("a guess"));
                who.push(i);
            }
            if seqs.is_empty() {
                return;
            }
            self.model
                .forward(&tokens, &seqs, &mut self.kv, &mut self.scratch, pool);
            drop(seqs);
            for (row, (&i, &fed)) in who.iter().zip(&tokens).enumerate() {
                let logits = &self.scratch.logits[row * vocab..(row + 1) * vocab];
                let job = &mut jobs[i];
                job.kv.tokens.push(fed);
                job.out.push(argmax(logits));
            }
        }
    }
}

/// The most likely token (the first of equals).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &x) in logits.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::LoadedModel;

    /// The model's own greedy continuation of `prompt`, `n` tokens, one plain decode at a time
    /// in a cache of its own.
    fn greedy(model: &LlamaModel, prompt: &[u32], n: usize, pool: &ThreadPool) -> Vec<u32> {
        let c = &model.config;
        let bs = 16;
        let blocks: Vec<u32> = (0..(prompt.len() + n).div_ceil(bs) as u32).collect();
        let mut kv = KvCache::new(c.layers, blocks.len(), bs, c.kv_dim());
        let mut s = Scratch::default();
        let mut out = Vec::new();
        let mut input = prompt.to_vec();
        let mut pos = 0;
        while out.len() < n {
            let seq = BatchSeq {
                start: 0,
                len: input.len(),
                pos0: pos,
                blocks: &blocks,
                logit_rows: 1,
            };
            model.forward(&input, &[seq], &mut kv, &mut s, pool);
            pos += input.len();
            let t = argmax(&s.logits[..c.vocab]);
            out.push(t);
            input = vec![t];
        }
        out
    }

    #[test]
    fn guesses_are_the_models_greedy_text_across_rounds_long_prompts_and_rewinds() {
        let path = lastmile_models::ensure_default_model().expect("default model");
        let loaded = LoadedModel::load(&path).expect("load");
        let pool = ThreadPool::new(2);
        let tok = &loaded.tokenizer;
        let short = tok
            .encode_prompt("The capital of France is")
            .expect("encode");
        let long_text = "one two three four five six seven eight nine ten ".repeat(60);
        let long = tok.encode_prompt(&long_text).expect("encode");
        assert!(long.len() > 2 * CATCH_UP, "{} tokens", long.len());
        let want_short = greedy(&loaded.model, &short, 9, &pool);
        let want_long = greedy(&loaded.model, &long, 4, &pool);
        let mut d = DraftModel::new(loaded.model, 200, 16);
        let total = d.free_blocks();
        let (mut a, mut b) = (d.new_kv(), d.new_kv());
        // Round 1: both at once; the long prompt is caught up on in pieces, without a draft.
        let mut jobs = vec![
            DraftJob::new(&mut a, &short, 4),
            DraftJob::new(&mut b, &long, 4),
        ];
        d.propose(&mut jobs, &pool);
        assert_eq!(jobs[0].out, want_short[..4]);
        assert!(jobs[1].out.is_empty(), "still catching up");
        // The served model kept two guesses and sampled another token: the draft cache rewinds
        // to what still holds and goes on from there.
        let mut ctx = short.clone();
        ctx.extend_from_slice(&want_short[..3]);
        let mut rounds = 0;
        let long_out = loop {
            rounds += 1;
            let mut jobs = vec![
                DraftJob::new(&mut a, &ctx, 6),
                DraftJob::new(&mut b, &long, 4),
            ];
            d.propose(&mut jobs, &pool);
            if rounds == 1 {
                assert_eq!(jobs[0].out, want_short[3..9]);
            }
            if !jobs[1].out.is_empty() {
                break jobs[1].out.clone();
            }
            assert!(rounds < long.len() / CATCH_UP + 1, "caught up in pieces");
        };
        assert_eq!(long_out, want_long);
        assert!(d.free_blocks() < total);
        drop((a, b));
        assert_eq!(
            d.free_blocks(),
            total,
            "an ended sequence's blocks come back"
        );
    }

    #[test]
    fn a_full_cache_means_no_draft_not_a_failure() {
        let path = lastmile_models::ensure_default_model().expect("default model");
        let loaded = LoadedModel::load(&path).expect("load");
        let pool = ThreadPool::new(2);
        let prompt = loaded
            .tokenizer
            .encode_prompt("Hello there")
            .expect("encode");
        let mut d = DraftModel::new(loaded.model, 1, 16);
        let mut kv = d.new_kv();
        let context: Vec<u32> = prompt.iter().cycle().take(20).copied().collect();
        let mut jobs = vec![DraftJob::new(&mut kv, &context, 4)];
        d.propose(&mut jobs, &pool);
        assert!(
            jobs[0].out.is_empty(),
            "23 positions do not fit one block of 16"
        );
        assert_eq!(d.free_blocks(), 1);
    }

    #[test]
    fn argmax_takes_the_first_of_equals_and_skips_nan() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
        assert_eq!(argmax(&[3.0]), 0);
    }
}
