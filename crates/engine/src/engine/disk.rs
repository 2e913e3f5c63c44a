//! The disk tier as the engine thread drives it ([`crate::kv_disk`] keeps the files): blocks
//! that eviction takes are saved before the next forward pass overwrites them; a request whose
//! prompt continues, past what memory holds, with blocks the disk has waits while they are
//! read (off the engine thread; other sequences keep decoding), and is then admitted with
//! them imported into the prefix cache, exactly as blocks sent by another engine are.

use std::sync::atomic::Ordering;

use super::{EngineStats, Submission};
use crate::kv::{BlockName, BlockPool, Evicted, KvBlocks};
use crate::kv_disk::DiskTier;
use crate::kv_transfer::KvBlock;

/// A request waiting for its prompt's blocks to be read.
struct Loading {
    id: u64,
    /// The prompt's block the first one read is.
    first: usize,
    submission: Submission,
}

/// A request whose blocks were read: import `blocks` as the prompt's blocks `first..`, then
/// admit it.
pub(super) struct ReadBack {
    pub(super) submission: Submission,
    pub(super) first: usize,
    pub(super) blocks: Vec<KvBlock>,
}

/// The engine thread's side of the disk tier.
pub(super) struct Disk {
    tier: DiskTier,
    loading: Vec<Loading>,
}

impl Disk {
    pub(super) fn new(tier: DiskTier) -> Self {
        Self {
            tier,
            loading: Vec::new(),
        }
    }

    /// The tier's keys (the engine names its blocks under them).
    pub(super) fn keys(&self) -> crate::kv::NamerKeys {
        self.tier.keys()
    }

    /// Requests waiting for reads.
    pub(super) fn loading(&self) -> usize {
        self.loading.len()
    }

    /// Starts reading the blocks of `s`'s prompt (named `names`) that follow the ones memory
    /// holds, if the disk has them; gives `s` back when there is nothing to read (or the reader
    /// is too busy: then it is computed).
    pub(super) fn start_load(
        &mut self,
        s: Submission,
        names: &[BlockName],
        block_size: usize,
        pool: &BlockPool,
        stats: &EngineStats,
    ) -> Option<Submission> {
        // A request that wants every prompt row's log probability computes every row anyway.
        if s.request.prompt_logprobs.is_some() {
            return Some(s);
        }
        // The last prompt token is always computed (its logits start the answer).
        let usable = names.len().min((s.request.prompt.len() - 1) / block_size);
        let first = pool.cached_run(&names[..usable]);
        let found = self.tier.run(&names[first..usable]);
        let missing = usable - first - found;
        stats
            .kv_disk_miss_blocks
            .fetch_add(missing as u64, Ordering::Relaxed);
        if found == 0 {
            return Some(s);
        }
        match self.tier.read(&names[first..first + found]) {
            Some(id) => {
                self.loading.push(Loading {
                    id,
                    first,
                    submission: s,
                });
                None
            }
            None => Some(s),
        }
    }

    /// Requests whose reads finished, with their blocks.
    pub(super) fn read_back(&mut self) -> Vec<ReadBack> {
        let mut out = Vec::new();
        for loaded in self.tier.poll() {
            let Some(at) = self.loading.iter().position(|l| l.id == loaded.id) else {
                continue;
            };
            let l = self.loading.swap_remove(at);
            out.push(ReadBack {
                submission: l.submission,
                first: l.first,
                blocks: loaded.blocks,
            });
        }
        out
    }

    /// Saves blocks eviction just took (before anything overwrites them); a block the tier has
    /// already is only marked used.
    pub(super) fn spill(&mut self, kv: &dyn KvBlocks, evicted: Vec<Evicted>) {
        for e in evicted {
            self.tier
                .spill(e.name, e.tokens, || kv.block(e.block), false);
        }
    }

    /// Saves every cached block the tier lacks, waiting for room in the writer's queue, least
    /// recently used first, and marks the slot as handed over (this process is stopping);
    /// returns how many and a receiver that resolves once all are written.
    pub(super) fn persist(
        &mut self,
        pool: &BlockPool,
        kv: &dyn KvBlocks,
    ) -> (usize, tokio::sync::oneshot::Receiver<()>) {
        self.tier.mark_stopping();
        let mut written = 0;
        for (block, name, tokens) in pool.cached() {
            written +=
                usize::from(
                    self.tier
                        .spill(name, tokens.to_vec(), || kv.block(block), true),
                );
        }
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tier.flush(reply);
        (written, done)
    }

    /// Routing hashes that entered or left the tier since the last call.
    pub(super) fn take_changes(&mut self) -> Vec<lastmile_protocol::KvEvent> {
        self.tier.take_changes()
    }

    /// Publishes the tier's gauges and counters.
    pub(super) fn publish(&self, stats: &EngineStats) {
        let c = self.tier.counts;
        stats
            .kv_disk_blocks
            .store(self.tier.blocks(), Ordering::Relaxed);
        stats
            .kv_disk_bytes
            .store(self.tier.used_bytes(), Ordering::Relaxed);
        for (counter, value) in [
            (&stats.kv_disk_written_bytes, c.written_bytes),
            (&stats.kv_disk_read_bytes, c.read_bytes),
            (&stats.kv_disk_dropped_blocks, c.dropped),
            (&stats.kv_disk_errors, c.errors),
        ] {
            counter.store(value, Ordering::Relaxed);
        }
    }
}
