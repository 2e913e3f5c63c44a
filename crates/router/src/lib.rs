//! The routing core of the gateway, as pure data with no I/O: a [`KvIndex`] of which worker
//! holds which prefix-cache blocks (built from the workers' KV events, named by the same chained
//! block hashes the engine uses), and the routing [`Policy`]s — `round_robin`, `random`,
//! `least_loaded` and `kv_aware` — each a small function over a snapshot of the workers.
//!
//! The gateway owns the I/O: it subscribes to every worker's event stream and applies the events
//! here, polls their load into [`WorkerLoad`] snapshots, hashes each prompt with
//! `lastmile_protocol::prefix_hashes`, and asks a policy for a worker.
#![warn(missing_docs)]

mod index;
mod policy;

pub use index::{KvIndex, WorkerId};
pub use policy::{Decision, Policy, PolicyKind, RouteRequest, WorkerLoad};
