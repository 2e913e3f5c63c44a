//! The paged KV cache: a pool of fixed-size blocks per layer, and the allocator that hands
//! blocks to sequences. A sequence's block table maps its position `p` to slot
//! `table[p / block_size] * block_size + p % block_size`.

/// Key and value storage for every layer, `num_blocks * block_size` slots of `kv_dim` floats.
pub struct KvCache {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    kv_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// Allocates the pool (zeroed pages are committed lazily by the OS).
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, kv_dim: usize) -> Self {
        let per_layer = num_blocks * block_size * kv_dim;
        Self {
            block_size,
            num_blocks,
            kv_dim,
            k: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(layers: usize, kv_dim: usize) -> usize {
        layers * kv_dim * 2 * std::mem::size_of::<f32>()
    }

    /// The slot of position `pos` under `table`.
    #[inline]
    pub fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Stores one token's key and value at `slot` of `layer`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let at = slot * self.kv_dim;
        self.k[layer][at..at + self.kv_dim].copy_from_slice(k);
        self.v[layer][at..at + self.kv_dim].copy_from_slice(v);
    }

    /// The key of `slot` for KV head `h` (of width `head_dim`).
    #[inline]
    pub fn key(&self, layer: usize, slot: usize, h: usize, head_dim: usize) -> &[f32] {
        let at = slot * self.kv_dim + h * head_dim;
        &self.k[layer][at..at + head_dim]
    }

    /// The value of `slot` for KV head `h`.
    #[inline]
    pub fn value(&self, layer: usize, slot: usize, h: usize, head_dim: usize) -> &[f32] {
        let at = slot * self.kv_dim + h * head_dim;
        &self.v[layer][at..at + head_dim]
    }
}

/// Hands out block ids; a block is free or owned by exactly one sequence.
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    /// An allocator over blocks `0..total`.
    pub fn new(total: usize) -> Self {
        Self {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    /// Blocks not in use.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.total - self.free.len()
    }

    /// All blocks.
    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        self.free.append(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_round_trip() {
        let mut a = BlockAllocator::new(4);
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
    fn slots_follow_the_block_table() {
        let kv = KvCache::new(1, 4, 16, 8);
        assert_eq!(kv.slot(&[3, 1], 0), 48);
        assert_eq!(kv.slot(&[3, 1], 17), 17);
    }
}
