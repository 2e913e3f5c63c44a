//! Which routing hashes an engine holds, across its KV tiers (memory, and disk where there is
//! one): what its KV events and snapshot tell routers. A hash is announced when it enters the
//! first tier and withdrawn when it leaves the last, so a block that moves from memory to disk
//! (or is read back) is never withdrawn on the way. Each tier counts its blocks per hash: two
//! blocks can share one (public, forgeable) routing hash, and the hash stays while either does.

use std::collections::HashMap;

use lastmile_protocol::KvEvent;

/// A KV tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Memory,
    Disk,
}

/// Blocks per routing hash in each tier.
#[derive(Debug, Default)]
pub(crate) struct CachedRoutes {
    memory: HashMap<u64, u32>,
    disk: HashMap<u64, u32>,
}

impl CachedRoutes {
    fn held(&self, hash: u64) -> bool {
        self.memory.contains_key(&hash) || self.disk.contains_key(&hash)
    }

    fn tier(&mut self, tier: Tier) -> &mut HashMap<u64, u32> {
        match tier {
            Tier::Memory => &mut self.memory,
            Tier::Disk => &mut self.disk,
        }
    }

    /// Applies one tier's change; returns the event followers should see (`None` when the
    /// engine as a whole held the hash before and after).
    pub(crate) fn apply(&mut self, tier: Tier, event: KvEvent) -> Option<KvEvent> {
        match event {
            KvEvent::Stored { hash, .. } => {
                let before = self.held(hash);
                *self.tier(tier).entry(hash).or_default() += 1;
                (!before).then_some(event)
            }
            KvEvent::Removed { hash } => {
                let counts = self.tier(tier);
                match counts.get_mut(&hash) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        counts.remove(&hash);
                    }
                    None => return None,
                }
                (!self.held(hash)).then_some(event)
            }
        }
    }

    /// Forgets the memory tier (its pool was replaced); returns the hashes no tier holds now.
    pub(crate) fn forget_memory(&mut self) -> Vec<u64> {
        let gone: Vec<u64> = std::mem::take(&mut self.memory).into_keys().collect();
        gone.into_iter()
            .filter(|h| !self.disk.contains_key(h))
            .collect()
    }

    /// Every hash some tier holds.
    pub(crate) fn hashes(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.memory.keys().copied().collect();
        all.extend(self.disk.keys().filter(|h| !self.memory.contains_key(h)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hash: u64) -> KvEvent {
        KvEvent::Stored { hash, parent: None }
    }

    fn removed(hash: u64) -> KvEvent {
        KvEvent::Removed { hash }
    }

    #[test]
    fn a_block_moving_between_tiers_is_never_withdrawn() {
        let mut r = CachedRoutes::default();
        assert_eq!(r.apply(Tier::Memory, stored(7)), Some(stored(7)));
        // Evicted from memory and spilled: the spill is applied first.
        assert_eq!(r.apply(Tier::Disk, stored(7)), None);
        assert_eq!(r.apply(Tier::Memory, removed(7)), None);
        assert_eq!(r.hashes(), vec![7]);
        // Read back into memory, then trimmed from disk: still held.
        assert_eq!(r.apply(Tier::Memory, stored(7)), None);
        assert_eq!(r.apply(Tier::Disk, removed(7)), None);
        assert_eq!(r.apply(Tier::Memory, removed(7)), Some(removed(7)));
        assert!(r.hashes().is_empty());
    }

    #[test]
    fn two_blocks_under_one_hash_keep_it_until_both_leave() {
        let mut r = CachedRoutes::default();
        assert_eq!(r.apply(Tier::Memory, stored(1)), Some(stored(1)));
        assert_eq!(r.apply(Tier::Memory, stored(1)), None);
        assert_eq!(r.apply(Tier::Memory, removed(1)), None);
        assert_eq!(r.apply(Tier::Memory, removed(1)), Some(removed(1)));
        assert_eq!(r.apply(Tier::Memory, removed(1)), None, "not held");
    }

    #[test]
    fn forgetting_memory_withdraws_only_what_disk_does_not_hold() {
        let mut r = CachedRoutes::default();
        r.apply(Tier::Memory, stored(1));
        r.apply(Tier::Memory, stored(2));
        r.apply(Tier::Disk, stored(2));
        assert_eq!(r.forget_memory(), vec![1]);
        assert_eq!(r.hashes(), vec![2]);
    }
}
