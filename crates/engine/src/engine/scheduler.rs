//! The engine thread's loop. Every step is planned first ([`super::plan`]: cancellations,
//! preemption, admission, chunk sizes — running decodes first, then prefill chunks up to the
//! token budget), then carried out here: one forward pass over the plan's batch, sampling, and
//! streaming. Sequences join and leave at any step. When a decode needs a KV block and none is
//! free, the newest sequence is preempted (its blocks freed; it is recomputed later from prompt +
//! output, and its stream continues seamlessly), never the whole batch.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio::sync::mpsc::UnboundedSender;

use super::closing::BudgetCloser;
use super::device::Executor;
use super::disk::{Disk, ReadBack};
use super::draft::{DraftJob, DraftKv, DraftModel};
use super::handoff::{import_block, tally, Leases};
use super::plan::{Chunk, Planned, Planner, Refusal, SeqKv, StepPlan};
use super::profile::StepProfile;
use super::speculate::{DraftSource, Drafter, Speculation, MAX_RUNNING_TO_DRAFT};
use super::tiers::Tier;
use super::{
    Command, EngineConfig, EngineStats, FinishReason, GenerateRequest, GenerationEvent,
    ImportOutcome, Submission, TokenLogprobs,
};
use crate::error::EngineError;
use crate::kv::BlockPool;
use crate::kv_disk::DiskTier;
use crate::kv_transfer::KvBlock;
use crate::model::{BatchSeq, LlamaModel, Scratch};
use crate::parallel::{SharedMut, ThreadPool};
use crate::sampler::{logprobs, Sampler, StopMatcher};
use crate::tokenizer::{DecodeStream, TextTokenizer};
use lastmile_protocol::KvEvent;

struct Sequence {
    kv: SeqKv,
    request: GenerateRequest,
    sampler: Sampler,
    decoder: DecodeStream,
    stops: StopMatcher,
    /// Keeps a constrained answer able to close within `max_tokens`.
    closer: BudgetCloser,
    /// Next prompt position whose log probability is still to be reported (prompt logprobs).
    prompt_logprobs_from: usize,
    /// Its draft maker, when it speculates.
    drafter: Option<Drafter>,
    /// Its place in the draft model's cache, once the draft model drafted for it.
    draft_kv: Option<DraftKv>,
    tx: UnboundedSender<GenerationEvent>,
}

impl Planned for Sequence {
    fn kv(&self) -> &SeqKv {
        &self.kv
    }

    fn kv_mut(&mut self) -> &mut SeqKv {
        &mut self.kv
    }

    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Sequence {
    fn generated(&self) -> usize {
        self.kv.generated()
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
    /// The KV tier on disk, if there is one.
    pub(super) disk: Option<DiskTier>,
    /// The device the model runs on, with its KV cache.
    pub(super) executor: Executor,
    /// The draft model, if the engine has one.
    pub(super) draft: Option<LlamaModel>,
}

pub(super) struct Scheduler {
    model: LlamaModel,
    tokenizer: Arc<TextTokenizer>,
    /// The forward pass and the KV cache, on the CPU or a GPU.
    kv: Executor,
    /// The queues and the block pool, and the step planning over them.
    planner: Planner<Sequence>,
    kv_events: broadcast::Sender<KvEvent>,
    cached: super::CachedBlocks,
    pool: ThreadPool,
    scratch: Scratch,
    stats: Arc<EngineStats>,
    /// Copy of one row of logits before sampling changes it (for log probabilities).
    raw_logits: Vec<f32>,
    /// Waiting sequences that `stats.waiting` counts already (it also counts submissions still
    /// in the channel, which only their sender knows of).
    counted_waiting: usize,
    /// Speculation for requests that do not choose.
    speculation: Speculation,
    /// The draft model, for requests whose drafts come from it.
    draft: Option<DraftModel>,
    /// Blocks held for other engines to read.
    leases: Leases,
    /// The KV tier on disk, if there is one.
    disk: Option<Disk>,
    /// Where step time goes (`LASTMILE_STEP_PROFILE=1`), printed every few seconds.
    profile: Option<StepProfile>,
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
            disk,
            executor: kv,
            draft,
        } = shared;
        let default_source = if draft.is_some() {
            DraftSource::DraftModel
        } else {
            DraftSource::PromptLookup
        };
        let speculation = config.speculation.resolved(default_source);
        // As many draft blocks as the served model's cache has: room for every sequence.
        let draft = draft.map(|m| DraftModel::new(m, num_blocks, config.block_size));
        let mut planner = Planner::new(config.clone(), num_blocks);
        let disk = disk.map(Disk::new);
        if let Some(d) = &disk {
            planner.spill_under(d.keys());
        }
        Self {
            pool: ThreadPool::new(config.threads),
            model,
            tokenizer,
            kv,
            planner,
            kv_events,
            cached,
            scratch: Scratch::default(),
            stats,
            raw_logits: Vec::new(),
            profile: (std::env::var("LASTMILE_STEP_PROFILE").as_deref() == Ok("1"))
                .then(StepProfile::new),
            counted_waiting: 0,
            speculation,
            draft,
            leases: Leases::default(),
            disk,
        }
    }

    pub(super) fn run(&mut self, rx: Receiver<Command>) {
        loop {
            if self.planner.is_idle() {
                // Requests waiting for disk reads: look for their answer every millisecond.
                let reading = self.disk.as_ref().is_some_and(|d| d.loading() > 0);
                let next = if reading {
                    rx.recv_timeout(std::time::Duration::from_millis(1))
                } else {
                    rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                };
                match next {
                    Ok(c) => {
                        // Idle until now: the stall clock starts here, not at the last step.
                        self.stats
                            .loop_at_ms
                            .store(EngineStats::now_ms(), Ordering::Relaxed);
                        self.take(c)
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.take(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.planner.is_idle() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.admit_read_back();
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if step.is_err() {
                tracing::error!("engine step panicked; failing every request in flight");
                for s in self.planner.reset() {
                    let _ =
                        s.tx.send(GenerationEvent::Failed(Arc::new(EngineError::Internal)));
                }
                // Their blocks went with the pool.
                self.leases.forget();
                self.forget_cache();
            }
            self.publish_stats();
            self.publish_events();
        }
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Generate(s) => {
                // Counted in `stats.waiting` by `submit` when it was sent.
                self.counted_waiting += 1;
                let s = match &mut self.disk {
                    Some(disk) => {
                        let names = self.planner.names(&s.request.prompt);
                        let bs = self.kv.block_size;
                        disk.start_load(*s, &names, bs, &self.planner.alloc, &self.stats)
                    }
                    None => Some(*s),
                };
                if let Some(s) = s {
                    self.admit(s);
                }
            }
            Command::Persist { reply } => {
                let answer = match &mut self.disk {
                    Some(disk) => {
                        let answer = disk.persist(&self.planner.alloc, self.kv.blocks());
                        disk.publish(&self.stats);
                        answer
                    }
                    None => {
                        let (done, answer) = tokio::sync::oneshot::channel();
                        let _ = done.send(());
                        (0, answer)
                    }
                };
                let _ = reply.send(answer);
            }
            Command::Hold { prompt, reply } => {
                let names = self.planner.names(&prompt);
                let held = self.leases.hold(&mut self.planner.alloc, names, prompt);
                self.publish_held();
                let blocks = self.copy_held(held.lease).unwrap_or_default();
                self.stats
                    .kv_blocks_exported
                    .fetch_add(blocks.len() as u64, Ordering::Relaxed);
                let _ = reply.send((held, blocks));
            }
            Command::Release { lease } => {
                self.leases.release(&mut self.planner.alloc, lease);
                self.publish_held();
            }
            Command::Import {
                prompt,
                first,
                blocks,
                reply,
            } => {
                let outcome = self.import(&prompt, first, &blocks);
                self.stats
                    .kv_blocks_imported
                    .fetch_add(outcome.stored as u64, Ordering::Relaxed);
                // Announced before the answer: whoever waited for the import finds the blocks
                // in `cached_blocks` (and the KV event stream) once it returns.
                self.publish_events();
                let _ = reply.send(outcome);
            }
        }
    }

    /// Copies out the blocks held under `lease`.
    fn copy_held(&self, lease: u64) -> Option<Vec<KvBlock>> {
        let held = self.leases.get(lease)?;
        let bs = self.kv.block_size;
        let blocks = held
            .blocks
            .iter()
            .zip(&held.names)
            .enumerate()
            .map(|(i, (&block, name))| KvBlock {
                route: name.route,
                tokens: held.tokens[i * bs..(i + 1) * bs].to_vec(),
                values: self.kv.blocks().block(block),
            })
            .collect();
        Some(blocks)
    }

    /// Stores received blocks `first..` of `prompt` (see `EngineHandle::import_blocks`).
    fn import(&mut self, prompt: &[u32], first: usize, blocks: &[KvBlock]) -> ImportOutcome {
        let bs = self.kv.block_size;
        let names = self.planner.names(prompt);
        let reserve = self.planner.alloc.total_blocks() / 100 + 1;
        let mut outcome = ImportOutcome::default();
        for (j, block) in blocks.iter().enumerate() {
            let i = first + j;
            let fits = names.get(i).is_some_and(|name| {
                name.route == block.route
                    && block.tokens == prompt[i * bs..(i + 1) * bs]
                    && block.values.len() == self.kv.blocks().block_values()
            });
            if !fits {
                outcome.refused = blocks.len() - j;
                break;
            }
            let parent = i.checked_sub(1).map(|p| names[p].route);
            let (kv, disk) = (&mut self.kv, &mut self.disk);
            let write = |pool: &mut BlockPool, b: u32| {
                // The fresh block may have been a cached one: saved before it is overwritten.
                if let Some(disk) = disk {
                    disk.spill(kv.blocks(), pool.take_evicted());
                }
                kv.blocks_mut().write_block(b, &block.values)
            };
            let imported = import_block(
                &mut self.planner.alloc,
                reserve,
                names[i],
                parent,
                &block.tokens,
                write,
            );
            tally(&mut outcome, imported);
        }
        outcome
    }

    /// Imports the blocks disk reads brought back and admits their requests (a block that does
    /// not check out is left out, and the rest of the prompt computed).
    fn admit_read_back(&mut self) {
        let Some(disk) = &mut self.disk else {
            return;
        };
        for ReadBack {
            submission,
            first,
            blocks,
        } in disk.read_back()
        {
            let started = std::time::Instant::now();
            let outcome = self.import(&submission.request.prompt, first, &blocks);
            tracing::debug!(
                stored = outcome.stored,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "KV disk tier: imported"
            );
            self.stats
                .kv_disk_hit_blocks
                .fetch_add(outcome.stored as u64, Ordering::Relaxed);
            self.admit(submission);
        }
    }

    /// Queues a submission for the planner (or fails it, if the queue is full).
    fn admit(&mut self, s: Submission) {
        let Submission { request, tx } = s;
        let max_tokens = request.max_tokens;
        let spec = request
            .speculation
            .map_or(self.speculation, |s| s.resolved(self.speculation.source));
        // `submit` refuses draft-model requests to an engine without one.
        let drafter = Drafter::new(spec).filter(|d| !d.by_model() || self.draft.is_some());
        let seq = Sequence {
            kv: SeqKv::new(request.prompt.clone(), request.prompt_logprobs.is_some()),
            sampler: Sampler::new(request.sampling.clone(), &request.prompt),
            stops: StopMatcher::new(request.stop.clone()),
            closer: BudgetCloser::default(),
            request,
            decoder: DecodeStream::default(),
            prompt_logprobs_from: 1,
            drafter,
            draft_kv: None,
            tx,
        };
        let needed = seq.kv.tokens.len() + max_tokens;
        if let Err((seq, refusal)) = self.planner.enqueue(seq, max_tokens) {
            // `submit` checks both first; these catch what slips past it (submissions racing
            // for the last waiting place), as the same errors, so they get the same statuses.
            let error = match refusal {
                Refusal::TooLarge { capacity } => {
                    EngineError::KvCapacityExceeded { needed, capacity }
                }
                Refusal::QueueFull { limit } => EngineError::QueueFull { limit },
            };
            let _ = seq.tx.send(GenerationEvent::Failed(Arc::new(error)));
        }
    }

    fn publish_stats(&mut self) {
        let p = &self.planner;
        let stats = &self.stats;
        stats
            .loop_at_ms
            .store(EngineStats::now_ms(), Ordering::Relaxed);
        stats.running.store(p.running.len(), Ordering::Relaxed);
        // Adjusted, not stored: submissions sent during the step are counted there too, and the
        // queue bound `submit` checks must see them.
        let now = p.waiting.len() + self.disk.as_ref().map_or(0, Disk::loading);
        if now > self.counted_waiting {
            stats
                .waiting
                .fetch_add(now - self.counted_waiting, Ordering::Relaxed);
        } else {
            stats
                .waiting
                .fetch_sub(self.counted_waiting - now, Ordering::Relaxed);
        }
        self.counted_waiting = now;
        stats
            .kv_blocks_used
            .store(p.alloc.used_blocks(), Ordering::Relaxed);
        stats
            .kv_blocks_cached
            .store(p.alloc.cached_blocks(), Ordering::Relaxed);
        stats
            .queued_prefill_tokens
            .store(p.queued_prefill_tokens(), Ordering::Relaxed);
        self.publish_held();
        if let Some(d) = &self.disk {
            d.publish(stats);
        }
    }

    fn publish_held(&self) {
        self.stats
            .kv_blocks_held
            .store(self.leases.blocks(), Ordering::Relaxed);
    }

    /// Publishes the tiers' changes: the disk's first, so that a block evicted from memory
    /// and saved to disk in the same step is never announced gone.
    fn publish_events(&mut self) {
        let disk = self.disk.as_mut().map(Disk::take_changes);
        let memory = self.planner.alloc.take_events();
        let changes = disk.into_iter().flatten().map(|e| (Tier::Disk, e));
        let changes = changes.chain(memory.into_iter().map(|e| (Tier::Memory, e)));
        let mut changes = changes.peekable();
        if changes.peek().is_none() {
            return;
        }
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        for (tier, e) in changes {
            if let Some(e) = cached.apply(tier, e) {
                // Nobody listening is fine: events are advisory.
                let _ = self.kv_events.send(e);
            }
        }
    }

    /// Tells followers that the memory tier is gone (after a failed step); what the disk
    /// holds stays.
    fn forget_cache(&mut self) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        for hash in cached.forget_memory() {
            let _ = self.kv_events.send(KvEvent::Removed { hash });
        }
    }

    /// Plans a step, runs the model over it, and hands each sequence that reached its end of
    /// input its next token.
    fn step(&mut self) {
        let t0 = std::time::Instant::now();
        let plan = self.planner.plan();
        if let Some(disk) = &mut self.disk {
            // Before the forward pass overwrites the blocks eviction handed out.
            disk.spill(self.kv.blocks(), self.planner.alloc.take_evicted());
        }
        self.count(&plan);
        if plan.chunks.is_empty() {
            return;
        }
        let t1 = std::time::Instant::now();
        self.forward(&plan);
        let t2 = std::time::Instant::now();
        let finished = self.sample(&plan);
        self.planner.advance(&plan);
        self.planner.retire(finished);
        if let Some(p) = &mut self.profile {
            p.add(plan.shape.rows, [t1 - t0, t2 - t1, t2.elapsed()]);
        }
    }

    fn count(&self, plan: &StepPlan) {
        let stats = &self.stats;
        let add = |c: &std::sync::atomic::AtomicU64, n: usize| {
            if n > 0 {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        };
        add(&stats.preemptions, plan.preempted.len());
        add(&stats.prefix_query_tokens, plan.prefix_query_tokens);
        add(&stats.prefix_hit_tokens, plan.prefix_hit_tokens);
        add(&stats.prefill_tokens, plan.prefill_tokens);
        for id in &plan.preempted {
            tracing::debug!(seq = id, "preempted for lack of KV blocks");
        }
    }

    /// Runs the model over the plan's chunks (logits land in `scratch`) and teaches the pacer
    /// what the step cost.
    fn forward(&mut self, plan: &StepPlan) {
        let running = &self.planner.running;
        let mut tokens = Vec::with_capacity(plan.shape.rows);
        let mut batch = Vec::with_capacity(plan.chunks.len());
        for c in &plan.chunks {
            let s = &running[c.seq].kv;
            batch.push(BatchSeq {
                start: tokens.len(),
                len: c.len,
                pos0: c.pos0,
                blocks: &s.blocks,
                logit_rows: c.logit_rows,
            });
            tokens.extend_from_slice(&s.tokens[c.pos0..c.pos0 + c.len]);
        }
        let started = std::time::Instant::now();
        self.kv
            .forward(&self.model, &tokens, &batch, &mut self.scratch, &self.pool);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let attention_ms = self.scratch.attention_time.as_secs_f64() * 1e3;
        self.planner.pacer.observe(plan.shape, ms, attention_ms);
        tracing::trace!(
            decodes = plan.decodes,
            prefill = tokens.len() - plan.decodes,
            ms,
            attention_ms,
            estimates = ?self.planner.pacer.estimates(),
            "step"
        );
    }

    /// Reports prompt log probabilities, samples and streams the next token of every sequence
    /// whose input the step finished (verifying its draft, if it had one, and drafting anew);
    /// returns the running indices of the sequences that ended.
    fn sample(&mut self, plan: &StepPlan) -> Vec<usize> {
        let vocab = self.model.config.vocab;
        let may_draft = self.planner.running.len() <= MAX_RUNNING_TO_DRAFT;
        let draft_cap = self.planner.pacer.draft_rows().unwrap_or(usize::MAX);
        let mut logit_row = 0;
        let mut finished = Vec::new();
        // The chunks whose sequence gets its next token, with their first logit row.
        let mut due = Vec::new();
        for c in &plan.chunks {
            let s = &mut self.planner.running[c.seq];
            let first_row = logit_row;
            logit_row += c.logit_rows;
            if c.logit_rows > 1 && c.pos0 < s.kv.prompt_len {
                let all = &self.scratch.logits[first_row * vocab..logit_row * vocab];
                report_prompt_logprobs(s, all, c.pos0, vocab);
            }
            if c.pos0 + c.len != s.kv.tokens.len() {
                continue;
            }
            if s.request.max_tokens == 0 {
                // Scoring only (the prompt's log probabilities): nothing to generate.
                finish(s, FinishReason::Length, String::new());
                finished.push(c.seq);
                continue;
            }
            due.push((c, first_row));
        }
        let sampled = self.sample_due(&due, vocab);
        // Sequences whose next draft the draft model makes, all at once after this loop.
        let mut by_model = Vec::new();
        for ((c, _), ended) in due.iter().zip(sampled) {
            self.stats
                .generated_tokens
                .fetch_add(ended.generated as u64, Ordering::Relaxed);
            if ended.drafted > 0 {
                self.stats
                    .draft_tokens
                    .fetch_add(ended.drafted as u64, Ordering::Relaxed);
                self.stats
                    .accepted_draft_tokens
                    .fetch_add(ended.accepted as u64, Ordering::Relaxed);
            }
            let s = &mut self.planner.running[c.seq];
            if ended.finished {
                finished.push(c.seq);
            } else if may_draft {
                if s.drafter.as_ref().is_some_and(Drafter::by_model) {
                    by_model.push(c.seq);
                } else {
                    draft(s, draft_cap);
                }
            }
        }
        if !by_model.is_empty() {
            self.draft_by_model(&by_model, draft_cap);
        }
        finished
    }

    /// Samples and streams the next token(s) of each chunk in `due` (with its first logit
    /// row), in order: spread over the compute threads when there are many (a GPU step leaves
    /// sampling as the host's main work: 64 sequences take about as long as the step itself).
    fn sample_due(&mut self, due: &[(&Chunk, usize)], vocab: usize) -> Vec<Sampled> {
        // Whether each chunk has a sequence of its own (the planner gives a sequence one chunk
        // a step; the parallel path relies on it, so it is checked, only where it is taken).
        let distinct = || {
            let mut seqs: Vec<usize> = due.iter().map(|(c, _)| c.seq).collect();
            seqs.sort_unstable();
            seqs.windows(2).all(|w| w[0] != w[1])
        };
        let tok = &*self.tokenizer;
        if due.len() < PARALLEL_SAMPLING_FROM || self.pool.threads() == 1 || !distinct() {
            return due
                .iter()
                .map(|&(c, first)| {
                    let s = &mut self.planner.running[c.seq];
                    let rows = &mut self.scratch.logits[first * vocab..][..c.logit_rows * vocab];
                    verify_and_emit(s, c, rows, vocab, &mut self.raw_logits, tok)
                })
                .collect();
        }
        let running = SharedMut::new(&mut self.planner.running);
        let logits = SharedMut::new(&mut self.scratch.logits);
        let mut out: Vec<Option<Sampled>> = due.iter().map(|_| None).collect();
        let results = SharedMut::new(&mut out);
        self.pool.for_each_dynamic(due.len(), 1, &|i| {
            let (c, first) = due[i];
            // SAFETY: the chunks' sequences are distinct (checked above), and so are their
            // logit rows and their result slots: each index is touched by this item alone.
            let (s, rows, slot) = unsafe {
                (
                    &mut running.slice(c.seq, 1)[0],
                    logits.slice(first * vocab, c.logit_rows * vocab),
                    &mut results.slice(i, 1)[0],
                )
            };
            *slot = Some(verify_and_emit(s, c, rows, vocab, &mut Vec::new(), tok));
        });
        out.into_iter()
            .map(|r| r.expect("every item was sampled"))
            .collect()
    }

    /// Drafts for the running sequences `seqs` by the draft model, in one batch.
    fn draft_by_model(&mut self, seqs: &[usize], cap: usize) {
        let Some(model) = self.draft.as_mut() else {
            return;
        };
        let mut jobs = Vec::with_capacity(seqs.len());
        let mut who = Vec::with_capacity(seqs.len());
        for (i, s) in self.planner.running.iter_mut().enumerate() {
            let want = s.drafter.as_ref().map_or(0, |d| d.wanted(room(s, cap)));
            if want == 0 || !seqs.contains(&i) {
                continue;
            }
            who.push(i);
            let kv = s.draft_kv.get_or_insert_with(|| model.new_kv());
            jobs.push(DraftJob::new(kv, &s.kv.tokens, want));
        }
        model.propose(&mut jobs, &self.pool);
        let drafts: Vec<Vec<u32>> = jobs.into_iter().map(|j| j.out).collect();
        for (i, draft) in who.into_iter().zip(drafts) {
            let s = &mut self.planner.running[i];
            s.kv.draft = draft.len();
            s.kv.tokens.extend(draft);
        }
    }
}

/// How many draft tokens `s` may carry: what `max_tokens` leaves (the last token always comes
/// from the model), at most `cap`.
fn room(s: &Sequence, cap: usize) -> usize {
    s.request
        .max_tokens
        .saturating_sub(s.generated())
        .saturating_sub(1)
        .min(cap)
}

/// Sequences sampled in one step from which sampling is spread over the compute threads.
const PARALLEL_SAMPLING_FROM: usize = 8;

/// What one chunk's sampling did.
struct Sampled {
    /// Tokens generated (and streamed).
    generated: usize,
    /// Draft tokens verified, and those kept.
    drafted: usize,
    accepted: usize,
    /// The sequence ended (finished or failed).
    finished: bool,
}

/// Samples `s`'s next token from the last of `rows` — or, when the chunk carried a draft, walks
/// the rows in order: each row's token is sampled exactly as without a draft (same filters, same
/// random draw) and the draft token at that place is kept when they agree; the walk ends at the
/// first disagreement, whose sampled token replaces the rest of the draft, or at the end of the
/// sequence. A draft token is so kept with exactly its probability p, and the output is the one
/// decoding without drafts gives — greedy or sampled, seed for seed (for a draft that proposes
/// one token for certain, the standard acceptance rule, min(1, p/1), with the randomness
/// shared). Streams each token; marks the refused draft tokens for the planner.
fn verify_and_emit(
    s: &mut Sequence,
    c: &Chunk,
    rows: &mut [f32],
    vocab: usize,
    raw: &mut Vec<f32>,
    tok: &TextTokenizer,
) -> Sampled {
    let draft = s.kv.draft;
    let proposals = s.kv.tokens.split_off(s.kv.tokens.len() - draft);
    s.kv.draft = 0;
    // The rows that predict the positions after the chunk's last input: 1 + draft of them.
    let first = c.logit_rows - (1 + draft);
    let mut out = Sampled {
        generated: 0,
        drafted: draft,
        accepted: 0,
        finished: false,
    };
    for i in 0..=draft {
        let row = &mut rows[(first + i) * vocab..(first + i + 1) * vocab];
        let proposal = proposals.get(i).copied();
        let (token, logprobs) = match sample_next(s, row, raw) {
            Ok(x) => x,
            Err(e) => {
                let _ = s.tx.send(GenerationEvent::Failed(Arc::new(e)));
                out.finished = true;
                break;
            }
        };
        s.kv.tokens.push(token);
        out.generated += 1;
        let kept = proposal == Some(token);
        out.accepted += usize::from(kept);
        if emit(s, tok, token, logprobs).is_some() {
            out.finished = true;
            break;
        }
        if !kept {
            break;
        }
    }
    s.kv.rejected = draft - out.accepted;
    if let Some(d) = s.drafter.as_mut() {
        if draft > 0 {
            d.record(draft, out.accepted);
        }
    }
    out
}

/// Appends a draft to `s`'s tokens if its drafter finds one, of at most `cap` tokens and within
/// what `max_tokens` leaves (the last token always comes from the model).
fn draft(s: &mut Sequence, cap: usize) {
    let Some(d) = s.drafter.as_ref() else {
        return;
    };
    let proposal = d.propose(&s.kv.tokens, room(s, cap));
    s.kv.draft = proposal.len();
    s.kv.tokens.extend_from_within(proposal);
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
                let _ = s.tx.send(GenerationEvent::Failed(Arc::new(e)));
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
        prompt_tokens: s.kv.prompt_len,
        completion_tokens: s.generated(),
        stop_sequence: s.stops.matched().map(str::to_string),
    });
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
        if target < s.kv.prompt_len && target >= s.prompt_logprobs_from {
            let token = s.kv.tokens[target];
            entries.push((token, logprobs(row, token, k)));
            s.prompt_logprobs_from = target + 1;
        }
    }
    if !entries.is_empty() {
        let _ = s.tx.send(GenerationEvent::PromptLogprobs(entries));
    }
}
