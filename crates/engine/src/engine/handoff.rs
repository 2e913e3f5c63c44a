//! Blocks handed between engines (disaggregated prefill and decode). A prefill engine *holds*
//! a computed prompt's cached blocks under a lease (one more reference each, so eviction cannot
//! take them) until the decode side has read them or the lease is released; a decode engine
//! *imports* blocks it was sent into fresh blocks of its pool and registers them in its prefix
//! cache under its own keys, so its next request with that prompt (and any later one sharing
//! the prefix) finds them as if it had computed them.
//!
//! Invariants: a held block is referenced once for its lease until released; an imported block
//! is registered only after its values are written, and is left idle-cached (unreferenced), so
//! it is evicted like any other; imports never take the last `reserve` free blocks, which
//! belong to the running sequences.

use std::collections::HashMap;

use super::{HeldPrefix, ImportOutcome};
use crate::kv::{BlockName, BlockPool};

/// A prompt's cached blocks held for another engine to read.
pub(super) struct Held {
    /// The blocks, in prompt order (a prefix of the prompt's full blocks).
    pub(super) blocks: Vec<u32>,
    /// Their names.
    pub(super) names: Vec<BlockName>,
    /// The prompt's tokens (at least `blocks.len() * block_size`).
    pub(super) tokens: Vec<u32>,
}

/// The leases of one engine.
#[derive(Default)]
pub(super) struct Leases {
    held: HashMap<u64, Held>,
    next: u64,
}

impl Leases {
    /// Holds the longest cached prefix of the prompt whose full blocks are `names`.
    pub(super) fn hold(
        &mut self,
        pool: &mut BlockPool,
        names: Vec<BlockName>,
        tokens: Vec<u32>,
    ) -> HeldPrefix {
        let blocks = pool.lookup(&names);
        let n = blocks.len();
        self.next += 1;
        let lease = self.next;
        self.held.insert(
            lease,
            Held {
                blocks,
                names: names[..n].to_vec(),
                tokens,
            },
        );
        HeldPrefix { lease, blocks: n }
    }

    /// The blocks held under `lease`, if it is live.
    pub(super) fn get(&self, lease: u64) -> Option<&Held> {
        self.held.get(&lease)
    }

    /// Ends `lease`, dropping its references; false if it was not live.
    pub(super) fn release(&mut self, pool: &mut BlockPool, lease: u64) -> bool {
        match self.held.remove(&lease) {
            Some(mut h) => {
                pool.release(&mut h.blocks);
                true
            }
            None => false,
        }
    }

    /// Blocks held under every live lease.
    pub(super) fn blocks(&self) -> usize {
        self.held.values().map(|h| h.blocks.len()).sum()
    }

    /// Drops every lease without touching a pool (after the pool itself was replaced).
    pub(super) fn forget(&mut self) {
        self.held.clear();
    }
}

/// What importing one block did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Imported {
    /// Cached already: nothing written.
    Present,
    /// Written into a fresh block and registered.
    Stored,
    /// No block could be spared.
    NoRoom,
}

/// Imports one block named `name` (its parent's routing hash `parent`) holding `tokens`: takes
/// a fresh block unless the key is cached already or fewer than `reserve` blocks would be left,
/// lets `write` fill it (given the pool, whose evictions it may need to save first), registers
/// it and leaves it idle-cached.
pub(super) fn import_block(
    pool: &mut BlockPool,
    reserve: usize,
    name: BlockName,
    parent: Option<u64>,
    tokens: &[u32],
    write: impl FnOnce(&mut BlockPool, u32),
) -> Imported {
    if pool.contains(name.key) {
        return Imported::Present;
    }
    if pool.free_blocks() <= reserve {
        return Imported::NoRoom;
    }
    let Some(mut fresh) = pool.allocate(1) else {
        return Imported::NoRoom;
    };
    write(pool, fresh[0]);
    pool.register(fresh[0], name, parent, tokens);
    pool.release(&mut fresh);
    Imported::Stored
}

/// Adds one block's outcome to an import's tally.
pub(super) fn tally(outcome: &mut ImportOutcome, imported: Imported) {
    match imported {
        Imported::Present => outcome.present += 1,
        Imported::Stored => outcome.stored += 1,
        Imported::NoRoom => outcome.no_room += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockNamer;

    #[test]
    fn held_blocks_survive_eviction_until_released() {
        let namer = BlockNamer::new();
        let names = namer.prefix(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let mut pool = BlockPool::new(3, true);
        let mut a = pool.allocate(2).unwrap();
        pool.register(a[0], names[0], None, &[1, 2, 3, 4]);
        pool.register(a[1], names[1], Some(names[0].route), &[5, 6, 7, 8]);
        pool.release(&mut a);
        let mut leases = Leases::default();
        let held = leases.hold(&mut pool, names.clone(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(held.blocks, 2);
        assert_eq!(leases.blocks(), 2);
        // Only the one unheld block can be handed out: the held ones are not evicted.
        let mut other = pool.allocate(1).unwrap();
        assert!(pool.allocate(1).is_none());
        pool.release(&mut other);
        assert!(leases.release(&mut pool, held.lease));
        assert!(!leases.release(&mut pool, held.lease), "released twice");
        assert_eq!(leases.blocks(), 0);
        assert_eq!(pool.used_blocks(), 0);
        assert_eq!(pool.cached_blocks(), 2, "released blocks stay cached");
    }

    #[test]
    fn imports_write_then_register_and_keep_a_reserve() {
        let namer = BlockNamer::new();
        let names = namer.prefix(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let mut pool = BlockPool::new(3, true);
        let mut written = Vec::new();
        let first = import_block(&mut pool, 1, names[0], None, &[1, 2, 3, 4], |_, b| {
            written.push(b)
        });
        assert_eq!(first, Imported::Stored);
        assert_eq!(written.len(), 1);
        assert_eq!(pool.used_blocks(), 0, "imported blocks are idle-cached");
        let again = import_block(&mut pool, 1, names[0], None, &[1, 2, 3, 4], |_, _| {
            panic!("rewritten")
        });
        assert_eq!(again, Imported::Present);
        let second = import_block(
            &mut pool,
            1,
            names[1],
            Some(names[0].route),
            &[5, 6, 7, 8],
            |_, _| {},
        );
        assert_eq!(second, Imported::Stored);
        let mut hit = pool.lookup(&names);
        assert_eq!(hit.len(), 2);
        pool.release(&mut hit);
        // Two of three blocks are idle-cached and one is free: a reserve of 3 refuses.
        let third = namer.prefix(&[9, 9, 9, 9], 4)[0];
        assert_eq!(
            import_block(&mut pool, 3, third, None, &[9, 9, 9, 9], |_, _| {}),
            Imported::NoRoom
        );
    }
}
