//! The deciding half of an engine step, with no model in it: which cancelled sequences leave,
//! which running sequence is preempted when a decode needs a block and none is free, which
//! waiting sequences are admitted (reusing cached prefix blocks, and not computing a block that
//! another sequence is computing right now), and how many tokens each running sequence computes
//! this step (decodes first, then prefill chunks within the token budget, sized so that decoding
//! streams keep their inter-token latency). [`Planner::plan`] returns that as a [`StepPlan`];
//! the scheduler runs the model over it and then calls [`Planner::advance`] and
//! [`Planner::retire`].
//!
//! Invariants: every block a sequence holds is referenced once for it in the pool; a running
//! sequence always holds the blocks for every token it has computed plus the one it computes
//! next; `waiting` stays in arrival order (preempted sequences go back to their place).

use std::collections::{HashSet, VecDeque};

use super::pacing::{Pacer, StepShape};
use super::EngineConfig;
use crate::kv::{BlockName, BlockNamer, BlockPool};

/// Most prompt tokens per step for a request that wants every prompt position's logits.
pub(super) const PROMPT_LOGPROBS_CHUNK: usize = 64;

/// A sequence's tokens and its place in the KV cache: what planning reads and changes.
#[derive(Debug, Default)]
pub(super) struct SeqKv {
    /// Arrival order (given by [`Planner::enqueue`]); the newest is preempted first.
    pub(super) id: u64,
    /// Prompt followed by generated tokens.
    pub(super) tokens: Vec<u32>,
    pub(super) prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub(super) computed: usize,
    pub(super) blocks: Vec<u32>,
    /// Names of the full blocks registered in the prefix cache so far (a prefix of `blocks`).
    pub(super) hashes: Vec<BlockName>,
    /// Names of every full block of `tokens` at admission (what this sequence will compute).
    pub(super) prompt_hashes: Vec<BlockName>,
    /// Every prompt position needs its logits (prompt log probabilities): the prompt is computed
    /// in full (no prefix reuse), in chunks of at most [`PROMPT_LOGPROBS_CHUNK`].
    pub(super) every_prompt_row: bool,
    /// Draft tokens at the end of `tokens` (speculative decoding): computed with the next
    /// decode and then kept or dropped; not generated yet.
    pub(super) draft: usize,
    /// Draft tokens the last step computed and verification refused: the cache holds stale
    /// entries there (overwritten later), so [`Planner::advance`] does not count them.
    pub(super) rejected: usize,
}

impl SeqKv {
    /// A sequence that will compute `prompt`.
    pub(super) fn new(prompt: Vec<u32>, every_prompt_row: bool) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            every_prompt_row,
            ..Self::default()
        }
    }

    /// Tokens generated so far (drafts not counted).
    pub(super) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len - self.draft
    }

    /// Tokens not yet in the cache (for a decoding sequence: its last sampled token and its
    /// draft).
    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether its next chunk is a decode: its last sampled token (and its draft).
    fn decoding(&self) -> bool {
        self.remaining() == 1 + self.draft
    }

    /// Removes the draft (when there is no room to verify it).
    pub(super) fn drop_draft(&mut self) {
        self.tokens.truncate(self.tokens.len() - self.draft);
        self.draft = 0;
    }

    /// Logit rows a chunk of `n` tokens from `computed` needs: every position while a prompt
    /// whose log probabilities were asked for is computed, else — once the chunk reaches the
    /// end — one row, and one more per draft token.
    fn logit_rows(&self, n: usize) -> usize {
        if self.every_prompt_row && self.computed < self.prompt_len {
            n
        } else if self.computed + n == self.tokens.len() {
            1 + self.draft
        } else {
            0
        }
    }
}

/// What the planner needs of a sequence.
pub(super) trait Planned {
    /// Its tokens and blocks.
    fn kv(&self) -> &SeqKv;
    /// Its tokens and blocks, to change.
    fn kv_mut(&mut self) -> &mut SeqKv;
    /// Whoever asked for it has gone away.
    fn cancelled(&self) -> bool;
}

/// Tokens one running sequence computes in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunk {
    /// Index in [`Planner::running`].
    pub(super) seq: usize,
    /// First position computed.
    pub(super) pos0: usize,
    /// Tokens computed.
    pub(super) len: usize,
    /// Logit rows the model returns for it (the last `logit_rows` positions).
    pub(super) logit_rows: usize,
}

/// One step's work, decided before the model runs.
#[derive(Debug, Default, PartialEq)]
pub(super) struct StepPlan {
    /// Chunks in running order (the model's batch order).
    pub(super) chunks: Vec<Chunk>,
    /// Chunks that are single decode tokens.
    pub(super) decodes: usize,
    /// The step's work as the pacer sees it.
    pub(super) shape: StepShape,
    /// Prompt tokens computed (not generated tokens recomputed after a preemption).
    pub(super) prefill_tokens: usize,
    /// Sequences that left because they were cancelled (ids).
    pub(super) cancelled: Vec<u64>,
    /// Sequences preempted for lack of KV blocks (ids), back in the waiting queue.
    pub(super) preempted: Vec<u64>,
    /// Sequences admitted into the running batch (ids).
    pub(super) admitted: Vec<u64>,
    /// Prompt tokens of first admissions looked up in the prefix cache, and those found there.
    pub(super) prefix_query_tokens: usize,
    /// See `prefix_query_tokens`.
    pub(super) prefix_hit_tokens: usize,
}

/// Why a new sequence was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// `limit` (`max_waiting`) sequences are waiting already.
    QueueFull {
        /// The most sequences that may wait.
        limit: usize,
    },
    /// Its prompt and `max_tokens` together need more blocks than the pool has.
    TooLarge {
        /// KV capacity in tokens.
        capacity: usize,
    },
}

/// Owns the queues and the block pool, and plans each step over them.
pub(super) struct Planner<S> {
    /// Sequences not yet admitted, in arrival order.
    pub(super) waiting: VecDeque<S>,
    /// Sequences with blocks, in admission order (the batch order).
    pub(super) running: Vec<S>,
    pub(super) alloc: BlockPool,
    /// Names blocks for the prefix cache, under this process's secret keys.
    namer: BlockNamer,
    /// Sizes prefill chunks from measured step times.
    pub(super) pacer: Pacer,
    config: EngineConfig,
    num_blocks: usize,
    next_id: u64,
    /// Whether the pool keeps what eviction takes (for a lower tier).
    keeps_evicted: bool,
}

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

impl<S: Planned> Planner<S> {
    /// A planner over `num_blocks` KV blocks.
    pub(super) fn new(config: EngineConfig, num_blocks: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            alloc: BlockPool::new(num_blocks, config.prefix_cache),
            namer: BlockNamer::new(),
            pacer: Pacer::default(),
            config,
            num_blocks,
            next_id: 0,
            keeps_evicted: false,
        }
    }

    /// Names blocks under `keys` (a lower tier's, whose blocks outlive this process) and has the
    /// pool keep what eviction takes, for that tier to save.
    pub(super) fn spill_under(&mut self, keys: crate::kv::NamerKeys) {
        self.namer = BlockNamer::with_keys(keys);
        self.alloc.keep_evicted();
        self.keeps_evicted = true;
    }

    /// No sequence waits or runs.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a new sequence of at most `max_tokens` more tokens, naming its prompt's blocks.
    pub(super) fn enqueue(&mut self, mut seq: S, max_tokens: usize) -> Result<(), (S, Refusal)> {
        let bs = self.config.block_size;
        if blocks_for(seq.kv().tokens.len() + max_tokens, bs) > self.num_blocks {
            let capacity = self.num_blocks * bs;
            return Err((seq, Refusal::TooLarge { capacity }));
        }
        if self.waiting.len() >= self.config.max_waiting {
            let limit = self.config.max_waiting;
            return Err((seq, Refusal::QueueFull { limit }));
        }
        let kv = seq.kv_mut();
        kv.id = self.next_id;
        self.next_id += 1;
        kv.prompt_hashes = self.namer.prefix(&kv.tokens, bs);
        self.waiting.push_back(seq);
        Ok(())
    }

    /// The names of every full block of `tokens` (under this engine's keys).
    pub(super) fn names(&self, tokens: &[u32]) -> Vec<BlockName> {
        self.namer.prefix(tokens, self.config.block_size)
    }

    /// Decides the next step: drops cancelled sequences, makes room for every decode (preempting
    /// the newest sequences when blocks run out), admits waiting sequences, and sizes the chunks.
    pub(super) fn plan(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        self.drop_cancelled(&mut plan);
        self.make_room_for_decodes(&mut plan);
        self.admit(&mut plan);
        self.size_chunks(&mut plan);
        plan
    }

    /// Records that the model computed `plan`'s chunks: their tokens are in the cache (but for
    /// the draft tokens verification refused), and the blocks they completed become reusable.
    pub(super) fn advance(&mut self, plan: &StepPlan) {
        let bs = self.config.block_size;
        for c in &plan.chunks {
            let s = self.running[c.seq].kv_mut();
            s.computed += c.len - std::mem::take(&mut s.rejected);
            while s.hashes.len() < s.computed / bs {
                let k = s.hashes.len();
                let parent = s.hashes.last().copied();
                let tokens = &s.tokens[k * bs..(k + 1) * bs];
                let name = self.namer.name(parent, tokens);
                self.alloc
                    .register(s.blocks[k], name, parent.map(|p| p.route), tokens);
                s.hashes.push(name);
            }
        }
    }

    /// Removes the running sequences at `indices` (ended), freeing their blocks.
    pub(super) fn retire(&mut self, mut indices: Vec<usize>) {
        indices.sort_unstable_by(|a, b| b.cmp(a));
        indices.dedup();
        for i in indices {
            let mut s = self.running.remove(i);
            self.alloc.release(&mut s.kv_mut().blocks);
        }
    }

    /// Takes every sequence out and forgets the prefix cache (after a failed step); returns the
    /// sequences, and the routing hashes the cache held are for the caller to announce gone.
    pub(super) fn reset(&mut self) -> Vec<S> {
        self.alloc = BlockPool::new(self.num_blocks, self.config.prefix_cache);
        if self.keeps_evicted {
            self.alloc.keep_evicted();
        }
        self.running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect()
    }

    /// Prompt tokens still to compute: waiting sequences' whole prompts and running sequences'
    /// unfinished prefills.
    pub(super) fn queued_prefill_tokens(&self) -> usize {
        self.waiting
            .iter()
            .chain(&self.running)
            .map(|s| s.kv().remaining().saturating_sub(1 + s.kv().draft))
            .sum()
    }

    fn drop_cancelled(&mut self, plan: &mut StepPlan) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                let mut s = self.running.remove(i);
                plan.cancelled.push(s.kv().id);
                self.alloc.release(&mut s.kv_mut().blocks);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|s| {
            let gone = s.cancelled();
            if gone {
                plan.cancelled.push(s.kv().id);
            }
            !gone
        });
    }

    /// Gives every decoding sequence a block for its next token (and its draft), dropping
    /// drafts and then preempting the newest running sequence while none is free.
    fn make_room_for_decodes(&mut self, plan: &mut StepPlan) {
        let bs = self.config.block_size;
        let mut i = 0;
        while i < self.running.len() {
            let s = self.running[i].kv_mut();
            let need = blocks_for(s.computed + 1 + s.draft, bs);
            if need > s.blocks.len() {
                match self.alloc.allocate(need - s.blocks.len()) {
                    Some(mut b) => s.blocks.append(&mut b),
                    // A guess is not worth another sequence's blocks.
                    None if s.draft > 0 => {
                        s.drop_draft();
                        continue;
                    }
                    None => {
                        // The newest sequence may sit anywhere in `running` (re-admitted ones
                        // are appended), so start over: sequences already served just pass.
                        if let Some(id) = self.preempt_newest() {
                            plan.preempted.push(id);
                        }
                        i = 0;
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    /// Frees the newest running sequence and queues it, in arrival order, for recomputation of
    /// its prompt and what it generated so far.
    fn preempt_newest(&mut self) -> Option<u64> {
        let idx = (0..self.running.len()).max_by_key(|&i| self.running[i].kv().id)?;
        let mut seq = self.running.remove(idx);
        let s = seq.kv_mut();
        s.drop_draft();
        self.alloc.release(&mut s.blocks);
        s.hashes.clear();
        s.prompt_hashes = self.namer.prefix(&s.tokens, self.config.block_size);
        s.computed = 0;
        let id = s.id;
        let at = self
            .waiting
            .iter()
            .position(|w| w.kv().id > id)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
        Some(id)
    }

    /// Admits waiting sequences, oldest first, while their whole (re)computation fits, reusing
    /// every cached block of their prefix (at least one token is always left to compute, for its
    /// logits). A sequence whose next uncached block is being computed right now by a running
    /// sequence, or by one admitted earlier in this pass, waits a step or two and then reuses it
    /// instead of computing it again (many requests with one system prompt arriving together).
    fn admit(&mut self, plan: &mut StepPlan) {
        let bs = self.config.block_size;
        let caching = self.config.prefix_cache;
        let watermark = self.num_blocks / 100;
        let mut inflight: HashSet<u128> = if caching {
            self.running
                .iter()
                .map(Planned::kv)
                .filter(|r| !r.decoding())
                .flat_map(|r| r.prompt_hashes.iter().skip(r.hashes.len()).map(|n| n.key))
                .collect()
        } else {
            HashSet::new()
        };
        let mut i = 0;
        while self.running.len() < self.config.max_running && i < self.waiting.len() {
            let cand = self.waiting[i].kv();
            let len = cand.tokens.len();
            let hashes = &cand.prompt_hashes;
            let usable = if cand.every_prompt_row {
                0
            } else {
                (len - 1) / bs
            };
            let mut hits = self.alloc.lookup(&hashes[..usable.min(hashes.len())]);
            if hits.len() < usable && inflight.contains(&hashes[hits.len()].key) {
                self.alloc.release(&mut hits);
                i += 1;
                continue;
            }
            let need = blocks_for(len + 1, bs) - hits.len();
            let reserve = if self.running.is_empty() {
                0
            } else {
                watermark
            };
            let fresh = if self.alloc.free_blocks() >= need + reserve {
                self.alloc.allocate(need)
            } else {
                None
            };
            let Some(mut fresh) = fresh else {
                self.alloc.release(&mut hits);
                break;
            };
            let Some(mut seq) = self.waiting.remove(i) else {
                break;
            };
            let s = seq.kv_mut();
            let hit_tokens = hits.len() * bs;
            if s.generated() == 0 {
                plan.prefix_query_tokens += len;
                plan.prefix_hit_tokens += hit_tokens;
            }
            if caching && len - hit_tokens > 1 {
                inflight.extend(s.prompt_hashes.iter().skip(hits.len()).map(|n| n.key));
            }
            s.hashes = s.prompt_hashes[..hits.len()].to_vec();
            s.computed = hit_tokens;
            s.blocks = hits;
            s.blocks.append(&mut fresh);
            plan.admitted.push(s.id);
            self.running.push(seq);
        }
    }

    /// Decodes first (one token each), then prefill chunks in running order within the token
    /// budget; while streams decode, the budget is what keeps the step within their latency
    /// target.
    fn size_chunks(&mut self, plan: &mut StepPlan) {
        let mut budget = self.config.max_batch_tokens;
        let mut decode_shape = StepShape::default();
        for (idx, s) in self.running.iter().map(Planned::kv).enumerate() {
            if s.decoding() {
                let len = 1 + s.draft;
                plan.chunks.push(Chunk {
                    seq: idx,
                    pos0: s.computed,
                    len,
                    logit_rows: s.logit_rows(len),
                });
                decode_shape.add(s.computed, len);
                budget = budget.saturating_sub(len);
            }
        }
        plan.decodes = plan.chunks.len();
        if plan.decodes > 0 {
            let pos0 = self
                .running
                .iter()
                .map(Planned::kv)
                .find(|s| !s.decoding())
                .map_or(0, |s| s.computed);
            budget = budget.min(self.pacer.chunk(
                decode_shape,
                pos0,
                self.config.prefill_chunk_while_decoding,
                self.config.itl_target_ms,
            ));
        }
        for (idx, s) in self.running.iter().map(Planned::kv).enumerate() {
            let remaining = s.remaining();
            if !s.decoding() && budget > 0 {
                let mut len = remaining.min(budget);
                if s.every_prompt_row && s.computed < s.prompt_len {
                    // Every position gets a logit row: keep the rows' memory bounded.
                    len = len.min(PROMPT_LOGPROBS_CHUNK);
                }
                plan.chunks.push(Chunk {
                    seq: idx,
                    pos0: s.computed,
                    len,
                    logit_rows: s.logit_rows(len),
                });
                budget -= len;
            }
        }
        plan.chunks.sort_unstable_by_key(|c| c.seq);
        for c in &plan.chunks {
            plan.shape.add(c.pos0, c.len);
            let s = self.running[c.seq].kv();
            plan.prefill_tokens += c.len.min(s.prompt_len.saturating_sub(c.pos0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestSeq {
        kv: SeqKv,
        gone: bool,
    }

    impl Planned for TestSeq {
        fn kv(&self) -> &SeqKv {
            &self.kv
        }
        fn kv_mut(&mut self) -> &mut SeqKv {
            &mut self.kv
        }
        fn cancelled(&self) -> bool {
            self.gone
        }
    }

    fn config() -> EngineConfig {
        EngineConfig {
            threads: 1,
            block_size: 4,
            max_batch_tokens: 32,
            prefill_chunk_while_decoding: 16,
            itl_target_ms: None,
            max_running: 8,
            max_waiting: 8,
            prefix_cache: true,
            ..EngineConfig::default()
        }
    }

    fn seq(prompt: std::ops::Range<u32>) -> TestSeq {
        TestSeq {
            kv: SeqKv::new(prompt.collect(), false),
            gone: false,
        }
    }

    fn enqueue(p: &mut Planner<TestSeq>, s: TestSeq) -> u64 {
        assert!(p.enqueue(s, 16).is_ok());
        p.waiting.back().map(|s| s.kv.id).unwrap_or_default()
    }

    /// Plans and "runs" a step: every sequence the step brought to the end of its tokens
    /// samples token 7.
    fn step(p: &mut Planner<TestSeq>) -> StepPlan {
        let plan = p.plan();
        p.advance(&plan);
        for c in &plan.chunks {
            let s = &mut p.running[c.seq].kv;
            if s.computed == s.tokens.len() {
                s.tokens.push(7);
            }
        }
        plan
    }

    fn ids(q: impl IntoIterator<Item = u64>) -> Vec<u64> {
        q.into_iter().collect()
    }

    fn running(p: &Planner<TestSeq>) -> Vec<u64> {
        ids(p.running.iter().map(|s| s.kv.id))
    }

    fn waiting(p: &Planner<TestSeq>) -> Vec<u64> {
        ids(p.waiting.iter().map(|s| s.kv.id))
    }

    /// Blocks held by sequences, counted per reference.
    fn held(p: &Planner<TestSeq>) -> usize {
        p.running.iter().map(|s| s.kv.blocks.len()).sum()
    }

    #[test]
    fn a_draft_is_computed_with_its_decode_and_gives_way_before_anyone_is_preempted() {
        let mut p = Planner::new(config(), 6);
        let a = enqueue(&mut p, seq(0..7));
        let b = enqueue(&mut p, seq(100..107));
        let c = enqueue(&mut p, seq(200..207));
        step(&mut p); // three prompts of 7 tokens (2 blocks each), then token 7 sampled
                      // A draft of 3 after A's sampled token needs a third block for A, and the pool (6
                      // blocks) is full: the draft goes, nobody is preempted.
        let s = &mut p.running[0].kv;
        s.tokens.extend([1, 2, 3]);
        s.draft = 3;
        let plan = p.plan();
        assert!(plan.preempted.is_empty(), "a guess is not worth a sequence");
        assert_eq!(running(&p), vec![a, b, c]);
        assert_eq!(p.running[0].kv.draft, 0);
        assert_eq!(p.running[0].kv.tokens.len(), 8, "the draft tokens are gone");
        assert_eq!(plan.chunks[0].len, 1);
        // With room, the draft rides along: 1 + 3 positions, a logit row each; two refused
        // drafts leave the cache at the sampled token and the one kept.
        let mut p = Planner::new(config(), 8);
        enqueue(&mut p, seq(0..7));
        step(&mut p);
        let s = &mut p.running[0].kv;
        s.tokens.extend([1, 2, 3]);
        s.draft = 3;
        assert_eq!(s.generated(), 1, "drafts are not generated tokens");
        let plan = p.plan();
        let c = plan.chunks[0];
        assert_eq!((c.pos0, c.len, c.logit_rows), (7, 4, 4));
        assert_eq!(plan.decodes, 1);
        let s = &mut p.running[0].kv;
        s.tokens.truncate(9); // kept 1 (token 1), then the model said 5
        s.tokens.push(5);
        s.draft = 0;
        s.rejected = 2;
        p.advance(&plan);
        let s = &p.running[0].kv;
        assert_eq!(s.computed, 9, "the sampled token and the kept draft token");
        assert_eq!(s.rejected, 0);
        assert_eq!(s.hashes.len(), 2, "only verified tokens fill blocks");
    }

    #[test]
    fn a_full_pool_preempts_the_newest_sequence_and_requeues_it_in_arrival_order() {
        let mut p = Planner::new(config(), 6);
        let a = enqueue(&mut p, seq(0..7));
        let b = enqueue(&mut p, seq(100..107));
        let c = enqueue(&mut p, seq(200..207));
        let first = step(&mut p);
        assert_eq!(first.admitted, vec![a, b, c]);
        assert_eq!(first.prefill_tokens, 21);
        assert_eq!(first.decodes, 0);
        // Each holds 2 blocks (7 prompt tokens and the next one): the pool is full.
        assert_eq!(p.alloc.free_blocks(), 0);
        let d = enqueue(&mut p, seq(300..303));
        let second = step(&mut p);
        assert_eq!(second.decodes, 3);
        assert!(second.admitted.is_empty(), "no room for d");
        // Token 9 of each needs a third block: the newest (c) gives its blocks up.
        let third = step(&mut p);
        assert_eq!(third.preempted, vec![c]);
        assert_eq!(running(&p), vec![a, b]);
        assert_eq!(waiting(&p), vec![c, d], "c goes back before the later d");
        assert_eq!(third.decodes, 2);
        let requeued = &p.waiting[0].kv;
        assert_eq!((requeued.computed, requeued.blocks.len()), (0, 0));
        assert_eq!(
            requeued.tokens.len(),
            9,
            "its prompt and 2 generated tokens"
        );
        assert_eq!(
            requeued.prompt_hashes.len(),
            2,
            "names cover the generated tokens too"
        );
        assert_eq!(held(&p), 6);
        // When a finishes, c (the oldest waiting) is admitted again, before d.
        p.retire(vec![0]);
        let fourth = step(&mut p);
        assert_eq!(fourth.admitted, vec![c]);
        assert_eq!(waiting(&p), vec![d]);
        let c_now = &p.running[1].kv;
        assert_eq!(
            c_now.generated(),
            3,
            "recomputed, then sampled its next token"
        );
        // Its blocks were evicted for a's and b's decodes: all 9 tokens are computed again, 7 of
        // them prompt tokens.
        assert_eq!(
            fourth.chunks[1],
            Chunk {
                seq: 1,
                pos0: 0,
                len: 9,
                logit_rows: 1
            }
        );
        assert_eq!(fourth.prefill_tokens, 7);
    }

    #[test]
    fn one_admission_pass_computes_a_shared_prefix_once() {
        let mut p = Planner::new(config(), 64);
        let a = enqueue(&mut p, seq(0..13));
        let b = enqueue(&mut p, seq(0..13));
        let other = enqueue(&mut p, seq(50..60));
        let first = step(&mut p);
        // b waits for a's three blocks instead of computing them too; the unrelated prompt
        // behind it is not held up.
        assert_eq!(first.admitted, vec![a, other]);
        assert_eq!(waiting(&p), vec![b]);
        assert_eq!(first.prefix_query_tokens, 23);
        assert_eq!(first.prefix_hit_tokens, 0);
        let second = step(&mut p);
        assert_eq!(second.admitted, vec![b]);
        assert_eq!(second.prefix_query_tokens, 13);
        assert_eq!(second.prefix_hit_tokens, 12);
        let (ka, kb) = (&p.running[0].kv, &p.running[2].kv);
        assert_eq!(ka.blocks[..3], kb.blocks[..3], "the same blocks, shared");
        assert_eq!(
            second.chunks.last(),
            Some(&Chunk {
                seq: 2,
                pos0: 12,
                len: 1,
                logit_rows: 1
            }),
            "b computes only its last prompt token"
        );
        // Shared blocks count once per user and go back to the pool when both end.
        p.retire(vec![0, 1, 2]);
        assert_eq!(p.alloc.used_blocks(), 0);
    }

    #[test]
    fn without_the_prefix_cache_nothing_waits_for_a_shared_prefix() {
        let mut p = Planner::new(
            EngineConfig {
                prefix_cache: false,
                ..config()
            },
            64,
        );
        enqueue(&mut p, seq(0..13));
        enqueue(&mut p, seq(0..13));
        let first = step(&mut p);
        assert_eq!(first.admitted.len(), 2);
        assert_eq!(first.prefill_tokens, 26);
    }

    /// A pacer that has seen steps cost 4 ms + 0.5 ms per token + 1 µs per attention pair.
    fn trained_pacer() -> Pacer {
        super::super::pacing::tests::trained()
    }

    /// The prefill chunk a step gives a 200-token prompt while one stream decodes, under
    /// `target` ms, and the step's predicted time.
    fn chunk_beside_a_decode(target: Option<f64>, cap: usize) -> (usize, f64) {
        let mut p = Planner::new(
            EngineConfig {
                itl_target_ms: target,
                prefill_chunk_while_decoding: cap,
                max_batch_tokens: 512,
                ..config()
            },
            256,
        );
        p.pacer = trained_pacer();
        enqueue(&mut p, seq(0..5));
        step(&mut p);
        enqueue(&mut p, seq(1000..1200));
        let plan = step(&mut p);
        assert_eq!(plan.decodes, 1);
        assert_eq!(plan.chunks.len(), 2);
        let predicted = p.pacer.predict(plan.shape).unwrap_or(f64::NAN);
        (plan.chunks[1].len, predicted)
    }

    #[test]
    fn prefill_beside_decodes_is_sized_to_the_latency_target() {
        let (tight, tight_ms) = chunk_beside_a_decode(Some(12.0), 256);
        let (loose, loose_ms) = chunk_beside_a_decode(Some(60.0), 256);
        assert!(
            tight >= 1 && tight_ms <= 12.0,
            "{tight} tokens, {tight_ms} ms"
        );
        assert!(
            loose > tight && loose_ms <= 60.0,
            "{loose} tokens, {loose_ms} ms"
        );
        // The cap holds whatever the target allows.
        assert_eq!(chunk_beside_a_decode(Some(1e6), 40).0, 40);
        // With no stream decoding, a prompt takes the whole batch budget.
        let mut p = Planner::new(config(), 256);
        p.pacer = trained_pacer();
        enqueue(&mut p, seq(0..100));
        let plan = step(&mut p);
        assert_eq!(plan.chunks[0].len, 32);
        assert_eq!(plan.chunks[0].logit_rows, 0, "mid-prompt: no logits");
    }

    #[test]
    fn cancelled_sequences_leave_and_free_their_blocks() {
        let mut p = Planner::new(
            EngineConfig {
                max_running: 1,
                ..config()
            },
            64,
        );
        let a = enqueue(&mut p, seq(0..9));
        let b = enqueue(&mut p, seq(20..29));
        step(&mut p);
        assert_eq!((running(&p), waiting(&p)), (vec![a], vec![b]));
        assert!(p.alloc.used_blocks() > 0);
        p.running[0].gone = true;
        p.waiting[0].gone = true;
        let plan = step(&mut p);
        assert_eq!(plan.cancelled, vec![a, b]);
        assert!(plan.chunks.is_empty());
        assert!(p.is_idle());
        assert_eq!(p.alloc.used_blocks(), 0);
    }

    #[test]
    fn the_queue_is_bounded_and_refuses_what_the_pool_cannot_hold() {
        let mut p = Planner::new(
            EngineConfig {
                max_waiting: 2,
                ..config()
            },
            8,
        );
        assert!(p.enqueue(seq(0..4), 4).is_ok());
        assert!(p.enqueue(seq(0..4), 4).is_ok());
        let refused = p.enqueue(seq(0..4), 4).err().map(|e| e.1);
        assert_eq!(refused, Some(Refusal::QueueFull { limit: 2 }));
        // 8 blocks of 4 tokens: 30 + 3 tokens do not fit.
        let refused = p.enqueue(seq(0..30), 3).err().map(|e| e.1);
        assert_eq!(refused, Some(Refusal::TooLarge { capacity: 32 }));
        // Admission drains the queue; then there is room again.
        step(&mut p);
        assert!(p.enqueue(seq(0..4), 4).is_ok());
    }

    #[test]
    fn prompt_logprobs_compute_every_position_in_bounded_chunks() {
        let mut p = Planner::new(
            EngineConfig {
                max_batch_tokens: 512,
                ..config()
            },
            256,
        );
        enqueue(&mut p, seq(0..100));
        step(&mut p);
        step(&mut p);
        step(&mut p);
        p.retire(vec![0]);
        // The same prompt again, cached now, but asking for every position's logits.
        let scored = TestSeq {
            kv: SeqKv::new((0..100).collect(), true),
            gone: false,
        };
        enqueue(&mut p, scored);
        let plan = step(&mut p);
        assert_eq!(
            plan.prefix_hit_tokens, 0,
            "no reuse: every position is computed"
        );
        let c = plan.chunks.last().copied();
        assert_eq!(
            c.map(|c| (c.pos0, c.len, c.logit_rows)),
            Some((0, PROMPT_LOGPROBS_CHUNK, PROMPT_LOGPROBS_CHUNK))
        );
        let plan = step(&mut p);
        let c = plan.chunks.last().copied();
        assert_eq!(c.map(|c| (c.pos0, c.len, c.logit_rows)), Some((64, 36, 36)));
    }

    #[test]
    fn running_sequences_are_bounded() {
        let mut p = Planner::new(
            EngineConfig {
                max_running: 2,
                ..config()
            },
            64,
        );
        for i in 0..3 {
            enqueue(&mut p, seq(i * 10..i * 10 + 5));
        }
        let plan = step(&mut p);
        assert_eq!(plan.admitted, vec![0, 1]);
        assert_eq!(waiting(&p), vec![2]);
    }
}
