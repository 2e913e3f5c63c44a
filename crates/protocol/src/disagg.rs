//! The internal API of disaggregated serving, shared by gateways and workers: a worker's role,
//! the prefill call a gateway makes, and the headers that tell a decode worker where to pull a
//! prompt's KV blocks from.
//!
//! Flow (the decode side pulls): the gateway picks a decode worker, decides the prompt is worth
//! computing elsewhere, and POSTs its tokens to a prefill worker's `/internal/prefill`
//! ([`PrefillRequest`]); the prefill worker computes the prompt, holds its blocks under a lease
//! and answers [`PrefillReply`]; the gateway sends the client's request to the decode worker
//! with [`KV_SOURCE_HEADER`] naming `/internal/kv/{lease}` on the prefill worker; the decode
//! worker pulls the blocks it lacks, releases the lease, and generates. Both internal calls carry
//! [`INTERNAL_TOKEN_HEADER`]: KV values cannot be checked by their receiver, so only peers that
//! share the deployment's secret may send them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Header a decode worker is told the KV source in: the URL of a lease's blocks on a prefill
/// worker (`http://host:port/internal/kv/{lease}?from={block}`).
pub const KV_SOURCE_HEADER: &str = "x-lastmile-kv-source";

/// Header carrying the secret gateways and workers share for KV transfer.
pub const INTERNAL_TOKEN_HEADER: &str = "x-lastmile-internal-token";

/// What a worker does in disaggregated serving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerRole {
    /// Serves whole requests (the default): routed to like any worker, and a decode worker.
    #[default]
    Both,
    /// Computes prompts for decode workers; gets no client requests of its own.
    Prefill,
    /// Generates; takes prompts computed elsewhere when the gateway decides so, and computes
    /// them itself otherwise.
    Decode,
}

impl WorkerRole {
    /// Every role, as named on the command line.
    pub const ALL: [WorkerRole; 3] = [Self::Both, Self::Prefill, Self::Decode];

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }

    /// Whether client requests may be routed to it.
    pub fn decodes(self) -> bool {
        self != Self::Prefill
    }
}

impl fmt::Display for WorkerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WorkerRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role `{s}` (both, prefill or decode)"))
    }
}

/// `POST /internal/prefill`: compute this prompt and hold its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillRequest {
    /// The prompt's token ids, as the gateway built them from the worker's prompt card.
    pub tokens: Vec<u32>,
}

/// The answer to a [`PrefillRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillReply {
    /// Names the held blocks: `GET /internal/kv/{lease}` streams them,
    /// `DELETE /internal/kv/{lease}` releases them.
    pub lease: String,
    /// Full blocks held (the prompt's full blocks, unless some were evicted meanwhile).
    pub blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// How long the blocks are held if nobody releases them, in milliseconds.
    pub expires_in_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_as_they_are_written() {
        for r in WorkerRole::ALL {
            assert_eq!(r.name().parse::<WorkerRole>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        assert!("leader".parse::<WorkerRole>().is_err());
        assert!(!WorkerRole::Prefill.decodes());
        assert!(WorkerRole::Decode.decodes() && WorkerRole::Both.decodes());
    }
}
