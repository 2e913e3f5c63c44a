//! The paged KV cache: a pool of fixed-size blocks per layer, and the allocator that hands
//! blocks to sequences. A sequence's block table maps its position `p` to slot
//! `table[p / block_size] * block_size + p % block_size`.

use std::collections::{BTreeMap, HashMap};

use lastmile_protocol::KvEvent;

/// Key and value storage for every layer, `num_blocks * block_size` slots of `kv_dim` values,
/// held as IEEE half floats (raw bits), as llama.cpp's default cache holds them: half the memory
/// and bandwidth of f32, and numbers that track the reference implementation closely.
///
/// Values are stored slot by slot. Keys are stored transposed inside each block (channel-major:
/// a channel's `block_size` positions side by side), so that attention scores a whole block per
/// vector register (see `model::attention`).
pub struct KvCache {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    kv_dim: usize,
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
}

impl KvCache {
    /// Allocates the pool (zeroed pages are committed lazily by the OS).
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, kv_dim: usize) -> Self {
        let per_layer = num_blocks * block_size * kv_dim;
        Self {
            block_size,
            num_blocks,
            kv_dim,
            k: (0..layers).map(|_| vec![0u16; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0u16; per_layer]).collect(),
        }
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(layers: usize, kv_dim: usize) -> usize {
        layers * kv_dim * 2 * std::mem::size_of::<u16>()
    }

    /// The slot of position `pos` under `table`.
    #[inline]
    pub fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Stores one token's key and value at `slot` of `layer` (rounded to f16).
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (bs, dim) = (self.block_size, self.kv_dim);
        let bits = |x: &f32| half::f16::from_f32(*x).to_bits();
        let keys = &mut self.k[layer][slot / bs * bs * dim..][..bs * dim];
        for (c, x) in k[..dim].iter().enumerate() {
            keys[c * bs + slot % bs] = bits(x);
        }
        let at = slot * dim;
        for (d, s) in self.v[layer][at..at + dim].iter_mut().zip(v) {
            *d = bits(s);
        }
    }

    /// The keys and values of `layer` as f16 bits: keys block by block, channel-major inside a
    /// block (block `b`, channel `c`, position `j` at `(b * kv_dim + c) * block_size + j`);
    /// values slot by slot (`slot * kv_dim + c`).
    pub fn layer(&self, layer: usize) -> (&[u16], &[u16]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Values per slot (all KV heads).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }
}

/// Hands out KV blocks and keeps the prefix cache.
///
/// A block is in one of three states: free (holds nothing reusable), in use (referenced by one or
/// more sequences; full blocks shared through the prefix cache count each user), or cached and
/// idle (unreferenced but still indexed by its hash, evicted least-recently-used when a fresh
/// block is needed). Every change to the set of cached hashes is queued as a `KvEvent`.
pub struct BlockPool {
    refcount: Vec<u32>,
    hash_of: Vec<Option<u64>>,
    free: Vec<u32>,
    index: HashMap<u64, u32>,
    idle: BTreeMap<u64, u32>,
    idle_tick: Vec<u64>,
    tick: u64,
    caching: bool,
    events: Vec<KvEvent>,
}

impl BlockPool {
    /// A pool over blocks `0..total`; `caching` turns the prefix cache on.
    pub fn new(total: usize, caching: bool) -> Self {
        Self {
            refcount: vec![0; total],
            hash_of: vec![None; total],
            free: (0..total as u32).rev().collect(),
            index: HashMap::new(),
            idle: BTreeMap::new(),
            idle_tick: vec![0; total],
            tick: 0,
            caching,
            events: Vec::new(),
        }
    }

    /// Blocks that can be handed out now (free, or idle in the cache).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks referenced by sequences.
    pub fn used_blocks(&self) -> usize {
        self.refcount.len() - self.free_blocks()
    }

    /// All blocks.
    pub fn total_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks indexed by the prefix cache (in use or idle).
    pub fn cached_blocks(&self) -> usize {
        self.index.len()
    }

    /// Takes `n` fresh blocks (evicting idle cached ones, oldest first), or none if fewer are
    /// available.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free_blocks() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (&tick, &b) = self.idle.iter().next()?;
                    self.idle.remove(&tick);
                    if let Some(h) = self.hash_of[b as usize].take() {
                        self.index.remove(&h);
                        self.events.push(KvEvent::Removed { hash: h });
                    }
                    b
                }
            };
            self.refcount[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Drops one reference to each block; unreferenced blocks become idle-cached (if hashed) or
    /// free.
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        for b in blocks.drain(..) {
            let i = b as usize;
            self.refcount[i] = self.refcount[i].saturating_sub(1);
            if self.refcount[i] == 0 {
                if self.hash_of[i].is_some() {
                    self.tick += 1;
                    self.idle_tick[i] = self.tick;
                    self.idle.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// The blocks caching the longest prefix of `hashes` (each now referenced once more).
    pub fn lookup(&mut self, hashes: &[u64]) -> Vec<u32> {
        let mut out = Vec::new();
        if !self.caching {
            return out;
        }
        for h in hashes {
            let Some(&b) = self.index.get(h) else { break };
            let i = b as usize;
            if self.refcount[i] == 0 {
                self.idle.remove(&self.idle_tick[i]);
            }
            self.refcount[i] += 1;
            out.push(b);
        }
        out
    }

    /// Records that `block` now holds the full block named `hash` (no-op if caching is off, the
    /// hash is already cached elsewhere, or the block is already named).
    pub fn register(&mut self, block: u32, hash: u64, parent: Option<u64>) {
        let i = block as usize;
        if !self.caching || self.hash_of[i].is_some() || self.index.contains_key(&hash) {
            return;
        }
        self.hash_of[i] = Some(hash);
        self.index.insert(hash, block);
        self.events.push(KvEvent::Stored { hash, parent });
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_round_trip() {
        let mut a = BlockPool::new(4, true);
        let mut x = a.allocate(3).unwrap();
        assert_eq!(a.free_blocks(), 1);
        assert!(a.allocate(2).is_none());
        a.release(&mut x);
        assert!(x.is_empty());
        assert_eq!(a.used_blocks(), 0);
        let y = a.allocate(4).unwrap();
        let mut s = y.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2, 3]);
    }

    #[test]
    fn cached_blocks_are_shared_then_evicted_oldest_first() {
        let mut p = BlockPool::new(3, true);
        let mut a = p.allocate(2).unwrap();
        p.register(a[0], 10, None);
        p.register(a[1], 11, Some(10));
        assert_eq!(p.take_events().len(), 2);
        // A second user of the same prefix shares the blocks.
        let mut shared = p.lookup(&[10, 11, 12]);
        assert_eq!(shared, a);
        assert_eq!(p.used_blocks(), 2);
        p.release(&mut a);
        assert_eq!(p.used_blocks(), 2, "still referenced by the second user");
        p.release(&mut shared);
        assert_eq!(p.used_blocks(), 0);
        assert_eq!(p.cached_blocks(), 2, "idle blocks stay cached");
        // Taking all three blocks evicts the idle ones, oldest (block of hash 10) first.
        let mut all = p.allocate(3).unwrap();
        assert_eq!(p.cached_blocks(), 0);
        assert_eq!(
            p.take_events(),
            vec![KvEvent::Removed { hash: 10 }, KvEvent::Removed { hash: 11 }]
        );
        assert!(p.lookup(&[10]).is_empty());
        p.release(&mut all);
        assert_eq!(p.free_blocks(), 3);
    }

    #[test]
    fn a_hit_on_an_idle_block_takes_it_out_of_eviction() {
        let mut p = BlockPool::new(2, true);
        let mut a = p.allocate(1).unwrap();
        p.register(a[0], 5, None);
        p.release(&mut a);
        let mut hit = p.lookup(&[5]);
        assert_eq!(hit.len(), 1);
        // Only one block is available now: the cached one is in use and must not be evicted.
        let mut other = p.allocate(1).unwrap();
        assert_ne!(other, hit);
        assert!(p.allocate(1).is_none());
        p.release(&mut hit);
        p.release(&mut other);
        assert_eq!(p.used_blocks(), 0);
    }

    #[test]
    fn caching_off_never_hits() {
        let mut p = BlockPool::new(2, false);
        let mut a = p.allocate(1).unwrap();
        p.register(a[0], 5, None);
        p.release(&mut a);
        assert!(p.lookup(&[5]).is_empty());
        assert!(p.take_events().is_empty());
    }

    #[test]
    fn slots_follow_the_block_table() {
        let kv = KvCache::new(1, 4, 16, 8);
        assert_eq!(kv.slot(&[3, 1], 0), 48);
        assert_eq!(kv.slot(&[3, 1], 17), 17);
    }
}
