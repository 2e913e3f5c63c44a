//! Which worker holds which KV blocks.
//!
//! Invariants: a block is listed under a worker exactly while that worker's last event for it
//! was `stored`; a worker that is dropped (restarted, lost its event stream) holds nothing until
//! its events are applied again. Because a block's hash chains over its parent's, a worker can
//! reuse the first `k` blocks of a prompt exactly when it holds the prompt's first `k` hashes, so
//! a prefix match is a walk down the prompt's hashes while the worker still has each one.

use std::collections::HashMap;

use lastmile_protocol::KvEvent;

/// A worker's index in the gateway's worker table.
pub type WorkerId = usize;

/// Block hash → the workers holding it, and per worker its block count.
#[derive(Debug, Default, Clone)]
pub struct KvIndex {
    holders: HashMap<u64, Vec<WorkerId>>,
    blocks: HashMap<WorkerId, usize>,
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event from `worker`.
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) {
        match *event {
            KvEvent::Stored { hash, .. } => {
                let holders = self.holders.entry(hash).or_default();
                if !holders.contains(&worker) {
                    holders.push(worker);
                    *self.blocks.entry(worker).or_default() += 1;
                }
            }
            KvEvent::Removed { hash } => {
                let Some(holders) = self.holders.get_mut(&hash) else {
                    return;
                };
                let before = holders.len();
                holders.retain(|&w| w != worker);
                if holders.len() < before {
                    if let Some(n) = self.blocks.get_mut(&worker) {
                        *n = n.saturating_sub(1);
                    }
                }
                if holders.is_empty() {
                    self.holders.remove(&hash);
                }
            }
        }
    }

    /// Forgets everything `worker` holds (it restarted or its event stream broke).
    pub fn drop_worker(&mut self, worker: WorkerId) {
        self.holders.retain(|_, holders| {
            holders.retain(|&w| w != worker);
            !holders.is_empty()
        });
        self.blocks.remove(&worker);
    }

    /// Blocks `worker` holds.
    pub fn blocks_of(&self, worker: WorkerId) -> usize {
        self.blocks.get(&worker).copied().unwrap_or(0)
    }

    /// For each of `workers`, how many leading blocks of a prompt with these block hashes it
    /// holds (what it would not have to compute).
    pub fn overlaps(&self, prompt_hashes: &[u64], workers: &[WorkerId]) -> Vec<usize> {
        let mut matched = vec![0; workers.len()];
        let mut alive: Vec<usize> = (0..workers.len()).collect();
        for (depth, hash) in prompt_hashes.iter().enumerate() {
            let Some(holders) = self.holders.get(hash) else {
                break;
            };
            alive.retain(|&i| holders.contains(&workers[i]));
            if alive.is_empty() {
                break;
            }
            for &i in &alive {
                matched[i] = depth + 1;
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lastmile_protocol::prefix_hashes;

    fn store(index: &mut KvIndex, worker: WorkerId, hashes: &[u64]) {
        let mut parent = None;
        for &hash in hashes {
            index.apply(worker, &KvEvent::Stored { hash, parent });
            parent = Some(hash);
        }
    }

    #[test]
    fn overlap_is_the_longest_held_prefix() {
        let prompt: Vec<u32> = (0..80).collect();
        let h = prefix_hashes(&prompt, 16);
        let mut index = KvIndex::new();
        store(&mut index, 0, &h[..3]);
        store(&mut index, 1, &h[..5]);
        // Worker 2 holds a later block but not the first: nothing it can reuse.
        store(&mut index, 2, &h[1..4]);
        assert_eq!(index.overlaps(&h, &[0, 1, 2, 3]), vec![3, 5, 0, 0]);
        assert_eq!(index.blocks_of(1), 5);
        // A different prompt sharing the first two blocks.
        let mut other: Vec<u32> = (0..32).collect();
        other.extend(1000..1048);
        let g = prefix_hashes(&other, 16);
        assert_eq!(index.overlaps(&g, &[0, 1]), vec![2, 2]);
    }

    #[test]
    fn removal_and_dropping_a_worker_forget_blocks() {
        let h = prefix_hashes(&(0..64).collect::<Vec<u32>>(), 16);
        let mut index = KvIndex::new();
        store(&mut index, 0, &h);
        store(&mut index, 1, &h);
        // Evicting block 2 on worker 0 cuts its usable prefix there.
        index.apply(0, &KvEvent::Removed { hash: h[2] });
        assert_eq!(index.overlaps(&h, &[0, 1]), vec![2, 4]);
        assert_eq!(index.blocks_of(0), 3);
        // Duplicate and unknown events change nothing.
        index.apply(
            1,
            &KvEvent::Stored {
                hash: h[0],
                parent: None,
            },
        );
        index.apply(1, &KvEvent::Removed { hash: 12345 });
        assert_eq!(index.blocks_of(1), 4);
        index.drop_worker(1);
        assert_eq!(index.overlaps(&h, &[0, 1]), vec![2, 0]);
        assert_eq!(index.blocks_of(1), 0);
        index.drop_worker(0);
        assert!(index.holders.is_empty(), "no empty entries are left behind");
    }
}
