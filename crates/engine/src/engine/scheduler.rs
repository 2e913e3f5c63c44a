//! The engine thread's loop. Every step builds one batch — running decodes first, then prefill
//! chunks up to the token budget — runs one forward pass, samples, and streams results. Sequences
//! join and leave at any step. When a decode needs a KV block and none is free, the newest
//! sequence is preempted (its blocks freed; it is recomputed later from prompt + output, and its
//! stream continues seamlessly), never the whole batch.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio::sync::mpsc::UnboundedSender;

use super::closing::BudgetCloser;
use super::pacing::{Pacer, StepShape};
use super::{
    EngineConfig, EngineStats, FinishReason, GenerateRequest, GenerationEvent, Submission,
    TokenLogprobs,
};
use crate::kv::{BlockName, BlockNamer, BlockPool, KvCache};
use crate::model::{BatchSeq, LlamaModel, Scratch};
use crate::parallel::ThreadPool;
use crate::sampler::{logprobs, Sampler, StopMatcher};
use crate::tokenizer::{DecodeStream, TextTokenizer};
use lastmile_protocol::KvEvent;

struct Sequence {
    id: u64,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Names of the full blocks registered in the prefix cache so far (a prefix of `blocks`).
    hashes: Vec<BlockName>,
    /// Names of every full block of `tokens` at admission (what this sequence will compute).
    prompt_hashes: Vec<BlockName>,
    request: GenerateRequest,
    sampler: Sampler,
    decoder: DecodeStream,
    stops: StopMatcher,
    /// Keeps a constrained answer able to close within `max_tokens`.
    closer: BudgetCloser,
    /// Next prompt position whose log probability is still to be reported (prompt logprobs).
    prompt_logprobs_from: usize,
    tx: UnboundedSender<GenerationEvent>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// What the engine thread shares with its handles.
pub(super) struct Shared {
    /// Blocks in the KV pool.
    pub(super) num_blocks: usize,
    /// Live counters.
    pub(super) stats: Arc<EngineStats>,
    /// Prefix-cache events.
    pub(super) kv_events: broadcast::Sender<KvEvent>,
    /// The cached hashes, as the events published so far leave them.
    pub(super) cached: super::CachedBlocks,
}

pub(super) struct Scheduler {
    model: LlamaModel,
    tokenizer: Arc<TextTokenizer>,
    config: EngineConfig,
    kv: KvCache,
    alloc: BlockPool,
    /// Names blocks for the prefix cache, under this process's secret keys.
    namer: BlockNamer,
    kv_events: broadcast::Sender<KvEvent>,
    cached: super::CachedBlocks,
    pool: ThreadPool,
    scratch: Scratch,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: u64,
    /// Copy of one row of logits before sampling changes it (for log probabilities).
    raw_logits: Vec<f32>,
    /// Sizes prefill chunks from measured step times.
    pacer: Pacer,
}

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

impl Scheduler {
    pub(super) fn new(
        model: LlamaModel,
        tokenizer: Arc<TextTokenizer>,
        config: EngineConfig,
        shared: Shared,
    ) -> Self {
        let Shared {
            num_blocks,
            stats,
            kv_events,
            cached,
        } = shared;
        let c = &model.config;
        let kv = KvCache::new(c.layers, num_blocks, config.block_size, c.kv_dim());
        Self {
            pool: ThreadPool::new(config.threads),
            model,
            tokenizer,
            kv,
            alloc: BlockPool::new(num_blocks, config.prefix_cache),
            namer: BlockNamer::new(),
            kv_events,
            cached,
            scratch: Scratch::default(),
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            raw_logits: Vec::new(),
            pacer: Pacer::default(),
            config,
        }
    }

    pub(super) fn run(&mut self, rx: Receiver<Submission>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(s) => {
                        // Idle until now: the stall clock starts here, not at the last step.
                        self.stats
                            .loop_at_ms
                            .store(EngineStats::now_ms(), Ordering::Relaxed);
                        self.admit(s)
                    }
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(s) => self.admit(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if step.is_err() {
                tracing::error!("engine step panicked; failing every request in flight");
                for s in self.running.drain(..).chain(self.waiting.drain(..)) {
                    let _ =
                        s.tx.send(GenerationEvent::Failed("internal engine error".into()));
                }
                self.reset_cache();
            }
            self.publish_stats();
            self.publish_events();
        }
    }

    fn admit(&mut self, s: Submission) {
        let id = self.next_id;
        self.next_id += 1;
        let prompt = s.request.prompt.clone();
        let seq = Sequence {
            id,
            prompt_len: prompt.len(),
            sampler: Sampler::new(s.request.sampling.clone(), &prompt),
            stops: StopMatcher::new(s.request.stop.clone()),
            closer: BudgetCloser::default(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            prompt_hashes: self.namer.prefix(&s.request.prompt, self.kv.block_size),
            request: s.request,
            decoder: DecodeStream::default(),
            prompt_logprobs_from: 1,
            tx: s.tx,
        };
        if blocks_for(
            seq.tokens.len() + seq.request.max_tokens,
            self.kv.block_size,
        ) > self.kv.num_blocks
        {
            let _ = seq.tx.send(GenerationEvent::Failed(format!(
                "the request needs more KV cache than the engine has ({} tokens)",
                self.kv.num_blocks * self.kv.block_size
            )));
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.waiting.push_back(seq);
    }

    fn publish_stats(&self) {
        self.stats
            .loop_at_ms
            .store(EngineStats::now_ms(), Ordering::Relaxed);
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats
            .kv_blocks_used
            .store(self.alloc.used_blocks(), Ordering::Relaxed);
        self.stats
            .kv_blocks_cached
            .store(self.alloc.cached_blocks(), Ordering::Relaxed);
        let queued: usize = self
            .waiting
            .iter()
            .chain(&self.running)
            .map(|s| s.tokens.len().saturating_sub(s.computed + 1))
            .sum();
        self.stats
            .queued_prefill_tokens
            .store(queued, Ordering::Relaxed);
    }

    fn publish_events(&mut self) {
        let events = self.alloc.take_events();
        if events.is_empty() {
            return;
        }
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        for e in events {
            match e {
                KvEvent::Stored { hash, .. } => cached.insert(hash),
                KvEvent::Removed { hash } => cached.remove(&hash),
            };
            // Nobody listening is fine: events are advisory.
            let _ = self.kv_events.send(e);
        }
    }

    /// Forgets the whole prefix cache (after a failed step), telling followers.
    fn reset_cache(&mut self) {
        self.alloc = BlockPool::new(self.kv.num_blocks, self.config.prefix_cache);
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        for hash in cached.drain() {
            let _ = self.kv_events.send(KvEvent::Removed { hash });
        }
    }

    fn release(&mut self, mut seq: Sequence) {
        self.alloc.release(&mut seq.blocks);
    }

    /// Frees the newest running sequence and queues it for recomputation.
    fn preempt_newest(&mut self) -> bool {
        let Some(idx) = (0..self.running.len()).max_by_key(|&i| self.running[i].id) else {
            return false;
        };
        let mut seq = self.running.remove(idx);
        self.alloc.release(&mut seq.blocks);
        seq.hashes.clear();
        // It will recompute its prompt and what it generated so far: name all of it.
        seq.prompt_hashes = self.namer.prefix(&seq.tokens, self.kv.block_size);
        seq.computed = 0;
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(seq = seq.id, "preempted for lack of KV blocks");
        // Keep the waiting queue in arrival order.
        let at = self
            .waiting
            .iter()
            .position(|w| w.id > seq.id)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
        true
    }

    fn step(&mut self) {
        // Cancelled requests (their receiver is gone) leave and free their blocks.
        let (gone, kept): (Vec<_>, Vec<_>) = self.running.drain(..).partition(|s| s.tx.is_closed());
        self.running = kept;
        for s in gone {
            self.release(s);
        }
        self.waiting.retain(|s| !s.tx.is_closed());

        // Decodes need room for one more token; preempt the newest sequence when full.
        let bs = self.kv.block_size;
        let mut i = 0;
        while i < self.running.len() {
            let need = blocks_for(self.running[i].computed + 1, bs);
            if need > self.running[i].blocks.len() {
                match self.alloc.allocate(need - self.running[i].blocks.len()) {
                    Some(mut b) => self.running[i].blocks.append(&mut b),
                    None => {
                        // The newest sequence may sit anywhere in `running` (re-admitted ones
                        // are appended), so start over: sequences already served just pass.
                        self.preempt_newest();
                        i = 0;
                        continue;
                    }
                }
            }
            i += 1;
        }

        // Admit waiting sequences while their whole (re)computation fits, oldest first, reusing
        // every cached block of their prefix (at least one token is always left to compute, for
        // its logits). A sequence whose next uncached block is being computed right now by a
        // running sequence waits a step or two and then reuses it, instead of computing it again
        // (many requests with one system prompt arriving together).
        let watermark = self.kv.num_blocks / 100;
        let mut inflight: HashSet<u128> = if self.config.prefix_cache {
            self.running
                .iter()
                .filter(|r| r.tokens.len() - r.computed > 1)
                .flat_map(|r| r.prompt_hashes.iter().skip(r.hashes.len()).map(|n| n.key))
                .collect()
        } else {
            HashSet::new()
        };
        let mut i = 0;
        while self.running.len() < self.config.max_running && i < self.waiting.len() {
            let cand = &self.waiting[i];
            let len = cand.tokens.len();
            // Hashed once on arrival (and again after a preemption), not on every step.
            let hashes = &cand.prompt_hashes;
            // Prompt log probabilities need every position computed: no reuse.
            let usable = if cand.request.prompt_logprobs.is_some() {
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
            let hit_tokens = hits.len() * bs;
            if seq.generated() == 0 {
                self.stats
                    .prefix_query_tokens
                    .fetch_add(len as u64, Ordering::Relaxed);
                self.stats
                    .prefix_hit_tokens
                    .fetch_add(hit_tokens as u64, Ordering::Relaxed);
            }
            if self.config.prefix_cache && len - hit_tokens > 1 {
                // Admitted in this same pass: later candidates with the same prefix wait for
                // these blocks instead of computing them too (several choices of one prompt, or
                // requests with one system prompt arriving together).
                inflight.extend(seq.prompt_hashes.iter().skip(hits.len()).map(|n| n.key));
            }
            seq.hashes = seq.prompt_hashes[..hits.len()].to_vec();
            seq.computed = hit_tokens;
            seq.blocks = hits;
            seq.blocks.append(&mut fresh);
            self.running.push(seq);
        }

        // Build the batch: decodes first, then prefill chunks within the token budget.
        let mut budget = self.config.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, tokens this step)
        for (idx, s) in self.running.iter().enumerate() {
            if s.tokens.len() - s.computed == 1 {
                plan.push((idx, 1));
                budget = budget.saturating_sub(1);
            }
        }
        let decodes = plan.len();
        if decodes > 0 {
            // Streams are decoding: keep the step within their inter-token latency target.
            let mut shape = StepShape::default();
            for &(idx, _) in &plan {
                shape.add(self.running[idx].computed, 1);
            }
            let pos0 = self
                .running
                .iter()
                .find(|s| s.tokens.len() - s.computed > 1)
                .map_or(0, |s| s.computed);
            budget = budget.min(self.pacer.chunk(
                shape,
                pos0,
                self.config.prefill_chunk_while_decoding,
                self.config.itl_target_ms,
            ));
        }
        for (idx, s) in self.running.iter().enumerate() {
            let remaining = s.tokens.len() - s.computed;
            if remaining > 1 && budget > 0 {
                let mut chunk = remaining.min(budget);
                if s.request.prompt_logprobs.is_some() && s.computed < s.prompt_len {
                    // Every position gets a logit row: keep the rows' memory bounded.
                    chunk = chunk.min(PROMPT_LOGPROBS_CHUNK);
                }
                plan.push((idx, chunk));
                budget -= chunk;
            }
        }
        if plan.is_empty() {
            return;
        }
        plan.sort_unstable();

        let mut tokens = Vec::with_capacity(self.config.max_batch_tokens);
        let mut batch = Vec::with_capacity(plan.len());
        for &(idx, n) in &plan {
            let s = &self.running[idx];
            batch.push(BatchSeq {
                start: tokens.len(),
                len: n,
                pos0: s.computed,
                blocks: &s.blocks,
                logit_rows: logit_rows(s, n),
            });
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + n]);
        }
        let started = std::time::Instant::now();
        self.model
            .forward(&tokens, &batch, &mut self.kv, &mut self.scratch, &self.pool);
        drop(batch);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let mut shape = StepShape::default();
        for &(idx, n) in &plan {
            shape.add(self.running[idx].computed, n);
        }
        let attention_ms = self.scratch.attention_time.as_secs_f64() * 1e3;
        self.pacer.observe(shape, ms, attention_ms);
        tracing::trace!(
            decodes,
            prefill = tokens.len() - decodes,
            ms,
            attention_ms,
            estimates = ?self.pacer.estimates(),
            "step"
        );

        let vocab = self.model.config.vocab;
        let mut logit_row = 0;
        let mut finished = Vec::new();
        for &(idx, n) in &plan {
            let s = &mut self.running[idx];
            if s.computed < s.prompt_len {
                self.stats
                    .prefill_tokens
                    .fetch_add(n.min(s.prompt_len - s.computed) as u64, Ordering::Relaxed);
            }
            let rows = logit_rows(s, n);
            s.computed += n;
            // Newly completed full blocks become reusable.
            while s.hashes.len() < s.computed / bs {
                let k = s.hashes.len();
                let parent = s.hashes.last().copied();
                let name = self.namer.name(parent, &s.tokens[k * bs..(k + 1) * bs]);
                self.alloc
                    .register(s.blocks[k], name, parent.map(|p| p.route));
                s.hashes.push(name);
            }
            let first_row = logit_row;
            logit_row += rows;
            if rows > 1 {
                let all = &self.scratch.logits[first_row * vocab..logit_row * vocab];
                report_prompt_logprobs(s, all, s.computed - n, vocab);
            }
            if s.computed != s.tokens.len() {
                continue;
            }
            if s.request.max_tokens == 0 {
                // Scoring only (the prompt's log probabilities): nothing to generate.
                finish(s, FinishReason::Length, String::new());
                finished.push((idx, FinishReason::Length));
                continue;
            }
            let row = logit_row - 1;
            let logits = &mut self.scratch.logits[row * vocab..(row + 1) * vocab];
            let sampled = sample_next(s, logits, &mut self.raw_logits);
            let (token, logprobs) = match sampled {
                Ok(x) => x,
                Err(e) => {
                    let _ = s.tx.send(GenerationEvent::Failed(e.to_string()));
                    finished.push((idx, FinishReason::Stop));
                    continue;
                }
            };
            s.tokens.push(token);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = emit(s, &self.tokenizer, token, logprobs) {
                finished.push((idx, reason));
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (idx, _) in finished {
            let s = self.running.remove(idx);
            self.release(s);
        }
    }
}

/// Picks `s`'s next token from its logits: under its grammar if it has one (closing it when the
/// budget left is what closing takes), with log probabilities (taken from the raw logits, before
/// penalties and masks) if it asked for them.
fn sample_next(
    s: &mut Sequence,
    logits: &mut [f32],
    raw: &mut Vec<f32>,
) -> crate::error::Result<(u32, Option<TokenLogprobs>)> {
    if s.request.logprobs.is_some() {
        raw.clear();
        raw.extend_from_slice(logits);
    }
    let left = s.request.max_tokens.saturating_sub(s.generated());
    let token = match s.request.grammar.as_mut() {
        Some(g) => {
            let token = match s.closer.forced(g, left) {
                Some(t) => t,
                None => {
                    let sampled = s.sampler.sample(logits, Some(&g.allowed()?));
                    s.closer.check(g, left, sampled)
                }
            };
            g.accept(token)?;
            token
        }
        None => s.sampler.sample(logits, None),
    };
    s.sampler.observe(token);
    let logprobs = s.request.logprobs.map(|k| logprobs(raw, token, k));
    Ok((token, logprobs))
}

/// Streams one new token of `s`; returns a finish reason when the sequence is done.
fn emit(
    s: &mut Sequence,
    tok: &TextTokenizer,
    token: u32,
    logprobs: Option<TokenLogprobs>,
) -> Option<FinishReason> {
    let is_eog = !s.request.ignore_eos && tok.eog_ids.contains(&token);
    let mut reason = None;
    let mut text = String::new();
    if !is_eog {
        match s.decoder.step(tok, token) {
            Ok(Some(t)) => {
                let (out, stopped) = s.stops.push(&t);
                text = out;
                if stopped {
                    reason = Some(FinishReason::Stop);
                }
            }
            Ok(None) => {}
            Err(e) => {
                let _ = s.tx.send(GenerationEvent::Failed(e.to_string()));
                return Some(FinishReason::Stop);
            }
        }
    } else {
        reason = Some(FinishReason::Stop);
    }
    if reason.is_none() && s.request.grammar.as_ref().is_some_and(|g| g.is_finished()) {
        reason = Some(FinishReason::Stop);
    }
    if s.closer.is_forcing() && s.stops.matched().is_none() && reason.is_some() {
        // Closed early to fit the budget (its end-of-generation token, or the grammar's end):
        // the budget cut the answer.
        reason = Some(FinishReason::Length);
    }
    if reason.is_none() && s.generated() >= s.request.max_tokens {
        reason = Some(FinishReason::Length);
    }
    let _ = s.tx.send(GenerationEvent::Token {
        id: token,
        text,
        logprobs,
    });
    if let Some(r) = reason {
        let grammar_done = s.request.grammar.is_some();
        let tail = if r == FinishReason::Length || is_eog || grammar_done {
            s.stops.flush()
        } else {
            String::new()
        };
        finish(s, r, tail);
    }
    reason
}

/// Sends the end of `s`'s stream.
fn finish(s: &Sequence, reason: FinishReason, tail: String) {
    let _ = s.tx.send(GenerationEvent::Finished {
        reason,
        text: tail,
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated(),
        stop_sequence: s.stops.matched().map(str::to_string),
    });
}

/// Most prompt tokens per step for a request that wants every prompt position's logits.
const PROMPT_LOGPROBS_CHUNK: usize = 64;

/// Logit rows `s` needs for a chunk of `n` tokens: every position while a prompt whose log
/// probabilities were asked for is computed, else one row once the chunk reaches the end.
fn logit_rows(s: &Sequence, n: usize) -> usize {
    let end = s.computed + n;
    if s.request.prompt_logprobs.is_some() && s.computed < s.prompt_len {
        n
    } else if end == s.tokens.len() {
        1
    } else {
        0
    }
}

/// Reports the log probability of each prompt token predicted by the chunk that started at
/// position `start` (row `j` predicts position `start + j + 1`), once per position even when a
/// preempted sequence recomputes its prompt.
fn report_prompt_logprobs(s: &mut Sequence, rows: &[f32], start: usize, vocab: usize) {
    let Some(k) = s.request.prompt_logprobs else {
        return;
    };
    let mut entries = Vec::new();
    for (j, row) in rows.chunks_exact(vocab).enumerate() {
        let target = start + j + 1;
        if target < s.prompt_len && target >= s.prompt_logprobs_from {
            let token = s.tokens[target];
            entries.push((token, logprobs(row, token, k)));
            s.prompt_logprobs_from = target + 1;
        }
    }
    if !entries.is_empty() {
        let _ = s.tx.send(GenerationEvent::PromptLogprobs(entries));
    }
}
