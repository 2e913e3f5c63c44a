//! The KV-cache vocabulary shared by engines and routers: how a full block of tokens is named
//! (a hash chained over its parent's hash and its tokens), and the events an engine publishes
//! when it stores or drops such a block. A router that hashes a prompt the same way knows which
//! engine already holds which prefix.

use serde::{Deserialize, Serialize};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The hash of a full KV block: FNV-1a over the parent's hash (0 for the first block) and the
/// block's token ids, each as little-endian bytes, then the splitmix64 finalizer. Stable across
/// platforms and versions: the gateway and every engine must agree on it.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in parent.unwrap_or(0).to_le_bytes() {
        h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
    }
    for t in tokens {
        for b in t.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// The hashes of every full block of `tokens`, in order.
pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut parent = None;
    for chunk in tokens.chunks_exact(block_size.max(1)) {
        let h = block_hash(parent, chunk);
        out.push(h);
        parent = Some(h);
    }
    out
}

/// A change in the set of blocks an engine holds in its prefix cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEvent {
    /// A full block became reusable.
    Stored {
        /// Its hash.
        hash: u64,
        /// Its parent's hash (`None` for a sequence's first block).
        parent: Option<u64>,
    },
    /// A block was evicted and is no longer reusable.
    Removed {
        /// Its hash.
        hash: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_and_depend_on_every_token() {
        let a = prefix_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], block_hash(None, &[1, 2, 3, 4]));
        assert_eq!(a[1], block_hash(Some(a[0]), &[5, 6, 7, 8]));
        // Same tokens under a different parent hash to a different block.
        assert_ne!(block_hash(Some(1), &[5, 6, 7, 8]), a[1]);
        assert_ne!(block_hash(None, &[1, 2, 3, 5]), a[0]);
        // Pinned value (computed independently in Python): changing the function breaks routers
        // that hash prompts themselves.
        assert_eq!(block_hash(None, &[1, 2, 3, 4]), 0x432e_48f2_c87a_96aa);
    }

    #[test]
    fn events_serialize_with_a_type_tag() {
        let e = KvEvent::Stored {
            hash: 7,
            parent: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"stored","hash":7,"parent":null}"#
        );
    }
}
