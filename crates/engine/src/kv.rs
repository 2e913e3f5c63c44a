//! The paged KV cache: a pool of fixed-size blocks per layer, and the allocator that hands
//! blocks to sequences. A sequence's block table maps its position `p` to slot
//! `table[p / block_size] * block_size + p % block_size`.
//!
//! A full block has two names ([`BlockName`]): the routing hash gateways see in KV events (FNV,
//! public, and forgeable from token-id prompts), and the key the prefix cache finds it by,
//! hashed with a secret of this process. A block is reused only on a key hit, so a prompt
//! crafted to collide with another tenant's routing hash cannot make the engine reuse (or
//! poison) that tenant's keys and values.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

use siphasher::sip::SipHasher13;

use lastmile_protocol::{block_hash, KvEvent};

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

    /// Prefetches into L2 the keys and values of `layer` that a sequence with block table
    /// `table` holds for positions `0..ctx`, block by block from the first, up to `budget`
    /// bytes (which it lowers by what it asked for). A decode step's attention reads them right
    /// after the layer's projections, by which time the weights streamed since the last step
    /// have evicted them; asked for before the projections, they arrive while those run.
    pub fn prefetch(&self, layer: usize, table: &[u32], ctx: usize, budget: &mut usize) {
        let block_len = self.block_size * self.kv_dim;
        let bytes = |s: &[u16]| -> &[u8] {
            // SAFETY: any u16 slice is a valid byte slice of twice its length.
            unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, s.len() * 2) }
        };
        let (k, v) = (bytes(&self.k[layer]), bytes(&self.v[layer]));
        for &b in &table[..ctx.div_ceil(self.block_size).min(table.len())] {
            if *budget < 4 * block_len {
                return;
            }
            *budget -= 4 * block_len;
            let at = b as usize * block_len * 2;
            crate::kernels::prefetch_range(k, at, block_len * 2);
            crate::kernels::prefetch_range(v, at, block_len * 2);
        }
    }

    /// Stores one token's key and value at `slot` of `layer` (rounded to f16).
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let (bs, dim) = (self.block_size, self.kv_dim);
        let keys = &mut self.k[layer][slot / bs * bs * dim..][..bs * dim];
        // Converted a run at a time (vector instructions where the CPU has them), then spread
        // over the channels' rows.
        const RUN: usize = 64;
        let mut run = [half::f16::ZERO; RUN];
        for (r, part) in k[..dim].chunks(RUN).enumerate() {
            let run = &mut run[..part.len()];
            run.convert_from_f32_slice(part);
            for (i, h) in run.iter().enumerate() {
                keys[(r * RUN + i) * bs + slot % bs] = h.to_bits();
            }
        }
        let at = slot * dim;
        let values = &mut self.v[layer][at..at + dim];
        values
            .reinterpret_cast_mut::<half::f16>()
            .convert_from_f32_slice(&v[..dim]);
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

    /// Layers held.
    pub fn layers(&self) -> usize {
        self.k.len()
    }

    /// Half floats one block holds across all layers (keys and values).
    pub fn block_values(&self) -> usize {
        self.k.len() * 2 * self.block_size * self.kv_dim
    }

    /// Appends block `block`'s keys and values to `out`, layer by layer (each layer's keys as
    /// stored, channel-major, then its values, slot by slot): the layout KV transfer sends.
    pub fn read_block(&self, block: u32, out: &mut Vec<u16>) {
        let n = self.block_size * self.kv_dim;
        let at = block as usize * n;
        for (k, v) in self.k.iter().zip(&self.v) {
            out.extend_from_slice(&k[at..at + n]);
            out.extend_from_slice(&v[at..at + n]);
        }
    }

    /// Overwrites block `block` with `data`, laid out as [`KvCache::read_block`] gives it
    /// (`data` must hold [`KvCache::block_values`] values).
    pub fn write_block(&mut self, block: u32, data: &[u16]) {
        let n = self.block_size * self.kv_dim;
        let at = block as usize * n;
        for ((k, v), layer) in self
            .k
            .iter_mut()
            .zip(&mut self.v)
            .zip(data.chunks_exact(2 * n))
        {
            k[at..at + n].copy_from_slice(&layer[..n]);
            v[at..at + n].copy_from_slice(&layer[n..]);
        }
    }
}

/// Whole blocks in and out of a KV cache, wherever it lives (host memory or a GPU's), in the
/// layout KV transfer sends and the disk tier stores ([`KvCache::read_block`]).
pub trait KvBlocks {
    /// Half floats one block holds across all layers (keys and values).
    fn block_values(&self) -> usize;
    /// Appends block `block`'s keys and values to `out`.
    fn read_block(&self, block: u32, out: &mut Vec<u16>);
    /// Overwrites block `block` with `data` ([`KvBlocks::block_values`] values).
    fn write_block(&mut self, block: u32, data: &[u16]);
    /// Block `block`'s keys and values, copied out.
    fn block(&self, block: u32) -> Vec<u16> {
        let mut values = Vec::with_capacity(self.block_values());
        self.read_block(block, &mut values);
        values
    }
}

impl KvBlocks for KvCache {
    fn block_values(&self) -> usize {
        KvCache::block_values(self)
    }

    fn read_block(&self, block: u32, out: &mut Vec<u16>) {
        KvCache::read_block(self, block, out)
    }

    fn write_block(&mut self, block: u32, data: &[u16]) {
        KvCache::write_block(self, block, data)
    }
}

/// The names of one full block of a sequence (each also covers every block before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockName {
    /// The routing hash (`lastmile_protocol::block_hash`), as KV events publish it.
    pub route: u64,
    /// The prefix cache's key: 128 bits of SipHash under this process's secret keys.
    pub key: u128,
}

/// Names blocks under secret keys: drawn at random for each process, or kept in a file by a
/// KV tier on disk, whose blocks outlive the process that named them.
#[derive(Clone)]
pub struct BlockNamer {
    keys: NamerKeys,
}

/// The four SipHash keys of a [`BlockNamer`] (two 64-bit hashes make one 128-bit key).
pub type NamerKeys = [u64; 4];

impl Default for BlockNamer {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockNamer {
    /// A namer with fresh random keys (drawn from the OS, through `RandomState`).
    pub fn new() -> Self {
        Self::with_keys(random_keys())
    }

    /// A namer with the given keys: names agree with every other namer that has them.
    pub fn with_keys(keys: NamerKeys) -> Self {
        Self { keys }
    }

    /// The names of the block holding `tokens` after the block named `parent`.
    pub fn name(&self, parent: Option<BlockName>, tokens: &[u32]) -> BlockName {
        let keyed = |k0: u64, k1: u64| {
            let mut h = SipHasher13::new_with_keys(k0, k1);
            parent.map(|p| p.key).hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        let [a, b, c, d] = self.keys;
        BlockName {
            route: block_hash(parent.map(|p| p.route), tokens),
            key: (u128::from(keyed(a, b)) << 64) | u128::from(keyed(c, d)),
        }
    }

    /// The names of every full block of `tokens`, in order.
    pub fn prefix(&self, tokens: &[u32], block_size: usize) -> Vec<BlockName> {
        let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
        let mut parent = None;
        for chunk in tokens.chunks_exact(block_size.max(1)) {
            let name = self.name(parent, chunk);
            out.push(name);
            parent = Some(name);
        }
        out
    }
}

/// Four random 64-bit words from the OS (each `RandomState` is seeded from it).
pub fn random_keys() -> NamerKeys {
    std::array::from_fn(|i| RandomState::new().hash_one(i))
}

/// Hands out KV blocks and keeps the prefix cache.
///
/// A block is in one of three states: free (holds nothing reusable), in use (referenced by one or
/// more sequences; full blocks shared through the prefix cache count each user), or cached and
/// idle (unreferenced but still indexed by its key, evicted least-recently-used when a fresh
/// block is needed). Every change to the set of cached blocks is queued as a `KvEvent` naming
/// the block's routing hash.
pub struct BlockPool {
    refcount: Vec<u32>,
    name_of: Vec<Option<BlockName>>,
    /// The tokens of each named block (empty for the others).
    tokens_of: Vec<Vec<u32>>,
    free: Vec<u32>,
    /// Cached blocks by their secret key (never by the forgeable routing hash).
    index: HashMap<u128, u32>,
    idle: BTreeMap<u64, u32>,
    idle_tick: Vec<u64>,
    tick: u64,
    caching: bool,
    events: Vec<KvEvent>,
    /// Keep what eviction takes, for a lower tier to save ([`BlockPool::keep_evicted`]).
    keep_evicted: bool,
    evicted: Vec<Evicted>,
}

/// A cached block that eviction just took: its number (its values are still in the cache
/// until the next forward pass writes there), its name and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    /// The block (handed out again).
    pub block: u32,
    /// Its name while it was cached.
    pub name: BlockName,
    /// Its tokens.
    pub tokens: Vec<u32>,
}

impl BlockPool {
    /// A pool over blocks `0..total`; `caching` turns the prefix cache on.
    pub fn new(total: usize, caching: bool) -> Self {
        Self {
            refcount: vec![0; total],
            name_of: vec![None; total],
            tokens_of: vec![Vec::new(); total],
            free: (0..total as u32).rev().collect(),
            index: HashMap::new(),
            idle: BTreeMap::new(),
            idle_tick: vec![0; total],
            tick: 0,
            caching,
            events: Vec::new(),
            keep_evicted: false,
            evicted: Vec::new(),
        }
    }

    /// From now on, records each cached block eviction takes, for [`BlockPool::take_evicted`].
    pub fn keep_evicted(&mut self) {
        self.keep_evicted = true;
    }

    /// The blocks evicted since the last call (with [`BlockPool::keep_evicted`]).
    pub fn take_evicted(&mut self) -> Vec<Evicted> {
        std::mem::take(&mut self.evicted)
    }

    /// Every cached block with its name and tokens: idle ones least recently used first, then
    /// those in use.
    pub fn cached(&self) -> impl Iterator<Item = (u32, BlockName, &[u32])> + '_ {
        let named = |b: u32| {
            self.name_of[b as usize].map(|n| (b, n, self.tokens_of[b as usize].as_slice()))
        };
        let in_use = (0..self.refcount.len() as u32).filter(|&b| self.refcount[b as usize] > 0);
        self.idle.values().copied().chain(in_use).filter_map(named)
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
                    let tokens = std::mem::take(&mut self.tokens_of[b as usize]);
                    if let Some(name) = self.name_of[b as usize].take() {
                        self.index.remove(&name.key);
                        self.events.push(KvEvent::Removed { hash: name.route });
                        if self.keep_evicted {
                            self.evicted.push(Evicted {
                                block: b,
                                name,
                                tokens,
                            });
                        }
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
                if self.name_of[i].is_some() {
                    self.tick += 1;
                    self.idle_tick[i] = self.tick;
                    self.idle.insert(self.tick, b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// The blocks caching the longest prefix of `names` (each now referenced once more), found
    /// by their keys.
    pub fn lookup(&mut self, names: &[BlockName]) -> Vec<u32> {
        let mut out = Vec::new();
        if !self.caching {
            return out;
        }
        for name in names {
            let Some(&b) = self.index.get(&name.key) else {
                break;
            };
            let i = b as usize;
            if self.refcount[i] == 0 {
                self.idle.remove(&self.idle_tick[i]);
            }
            self.refcount[i] += 1;
            out.push(b);
        }
        out
    }

    /// Records that `block` now holds the full block `name` of `tokens`, whose parent block has
    /// the routing hash `parent` (no-op if caching is off, the key is already cached elsewhere,
    /// or the block is already named).
    pub fn register(&mut self, block: u32, name: BlockName, parent: Option<u64>, tokens: &[u32]) {
        let i = block as usize;
        if !self.caching || self.name_of[i].is_some() || self.index.contains_key(&name.key) {
            return;
        }
        self.name_of[i] = Some(name);
        self.tokens_of[i] = tokens.to_vec();
        self.index.insert(name.key, block);
        self.events.push(KvEvent::Stored {
            hash: name.route,
            parent,
        });
    }

    /// How many of `names`, from the first, are cached (nothing is referenced).
    pub fn cached_run(&self, names: &[BlockName]) -> usize {
        if !self.caching {
            return 0;
        }
        names
            .iter()
            .take_while(|n| self.index.contains_key(&n.key))
            .count()
    }

    /// Whether a block with this prefix-cache key is cached.
    pub fn contains(&self, key: u128) -> bool {
        self.index.contains_key(&key)
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token's key and value land in their slot as f16 of each value, rounded as one at a
    /// time would round it (keys channel-major inside the block), whatever the width; a
    /// prefetch changes nothing and spends its budget a block (keys and values) at a time.
    #[test]
    fn write_rounds_each_value_and_prefetch_keeps_to_its_budget() {
        for dim in [8usize, 64, 200] {
            let (bs, blocks) = (16usize, 4usize);
            let mut cache = KvCache::new(2, blocks, bs, dim);
            let k: Vec<f32> = (0..dim).map(|c| (c as f32 * 0.731).sin() * 3.1e3).collect();
            let v: Vec<f32> = (0..dim).map(|c| (c as f32 * 0.377).cos() * 1e-3).collect();
            let table = [2u32, 0, 3, 1];
            let slot = cache.slot(&table, 21);
            cache.write(1, slot, &k, &v);
            let mut budget = 2 * 4 * bs * dim + 1;
            cache.prefetch(1, &table, 10_000, &mut budget);
            assert_eq!(budget, 1, "two blocks' keys and values, then no more");
            let bits = |x: f32| half::f16::from_f32(x).to_bits();
            let (ks, vs) = cache.layer(1);
            for c in 0..dim {
                assert_eq!(
                    ks[(slot / bs * dim + c) * bs + slot % bs],
                    bits(k[c]),
                    "key {c}"
                );
                assert_eq!(vs[slot * dim + c], bits(v[c]), "value {c}");
            }
            let written = ks.iter().chain(vs).filter(|&&b| b != 0).count();
            let nonzero = k.iter().chain(&v).filter(|&&x| bits(x) != 0).count();
            assert_eq!(written, nonzero, "nothing else written");
        }
    }

    /// A name for tests: routing hash and key both `n`.
    fn n(n: u64) -> BlockName {
        BlockName {
            route: n,
            key: u128::from(n),
        }
    }

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
        p.register(a[0], n(10), None, &[]);
        p.register(a[1], n(11), Some(10), &[]);
        assert_eq!(p.take_events().len(), 2);
        // A second user of the same prefix shares the blocks.
        let mut shared = p.lookup(&[n(10), n(11), n(12)]);
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
        assert!(p.lookup(&[n(10)]).is_empty());
        p.release(&mut all);
        assert_eq!(p.free_blocks(), 3);
    }

    #[test]
    fn a_hit_on_an_idle_block_takes_it_out_of_eviction() {
        let mut p = BlockPool::new(2, true);
        let mut a = p.allocate(1).unwrap();
        p.register(a[0], n(5), None, &[]);
        p.release(&mut a);
        let mut hit = p.lookup(&[n(5)]);
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
        p.register(a[0], n(5), None, &[]);
        p.release(&mut a);
        assert!(p.lookup(&[n(5)]).is_empty());
        assert!(p.take_events().is_empty());
    }

    #[test]
    fn a_forged_routing_hash_never_reuses_another_prompts_blocks() {
        let namer = BlockNamer::new();
        let victim = namer.prefix(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let mut p = BlockPool::new(4, true);
        let mut held = p.allocate(2).unwrap();
        p.register(held[0], victim[0], None, &[]);
        p.register(held[1], victim[1], Some(victim[0].route), &[]);
        p.release(&mut held);
        // An attacker's blocks whose routing hashes collide with the victim's (FNV collisions
        // are practical to find with token-id prompts; forced here) hit nothing.
        let mut forged = namer.prefix(&[9, 9, 9, 9, 8, 8, 8, 8], 4);
        for (f, v) in forged.iter_mut().zip(&victim) {
            f.route = v.route;
        }
        assert!(p.lookup(&forged).is_empty());
        // Nor can the attacker's blocks be registered over the victim's: the victim still hits
        // its own blocks, and the attacker's get their own.
        let mut theirs = p.allocate(1).unwrap();
        p.register(theirs[0], forged[0], None, &[]);
        assert_eq!(p.cached_blocks(), 3);
        let mut hit = p.lookup(&victim);
        assert_eq!(hit.len(), 2);
        assert!(!hit.contains(&theirs[0]));
        // Same tokens, same names; the keys differ from process to process.
        assert_eq!(namer.prefix(&[1, 2, 3, 4], 4)[0], victim[0]);
        let other = BlockNamer::new().prefix(&[1, 2, 3, 4], 4)[0];
        assert_eq!(other.route, victim[0].route);
        assert_ne!(other.key, victim[0].key);
        p.release(&mut hit);
        p.release(&mut theirs);
    }

    #[test]
    fn a_block_read_out_and_written_into_another_is_the_same_block() {
        let (layers, blocks, bs, dim) = (3, 4, 4, 8);
        let mut kv = KvCache::new(layers, blocks, bs, dim);
        for layer in 0..layers {
            for pos in 0..bs {
                let k: Vec<f32> = (0..dim)
                    .map(|c| (layer * 100 + pos * 10 + c) as f32)
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                kv.write(layer, bs + pos, &k, &v);
            }
        }
        let mut data = Vec::new();
        kv.read_block(1, &mut data);
        assert_eq!(data.len(), kv.block_values());
        kv.write_block(3, &data);
        for layer in 0..layers {
            let (k, v) = kv.layer(layer);
            let n = bs * dim;
            assert_eq!(k[n..2 * n], k[3 * n..4 * n]);
            assert_eq!(v[n..2 * n], v[3 * n..4 * n]);
            assert!(k[3 * n..4 * n].iter().any(|&x| x != 0));
        }
        let mut again = Vec::new();
        kv.read_block(3, &mut again);
        assert_eq!(again, data);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let kv = KvCache::new(1, 4, 16, 8);
        assert_eq!(kv.slot(&[3, 1], 0), 48);
        assert_eq!(kv.slot(&[3, 1], 17), 17);
    }
}
