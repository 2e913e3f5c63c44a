//! Routing policies: given a snapshot of the workers' load, the request's prompt (as block
//! hashes) and the KV index, pick a worker. Each policy is a small pure function; the only state
//! is a counter (round robin, tie-breaking) and a seeded random generator, kept in atomics so one
//! policy serves concurrent requests.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::index::{KvIndex, WorkerId};

/// Which policy a deployment routes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Each healthy worker in turn.
    RoundRobin,
    /// A uniformly random healthy worker.
    Random,
    /// The healthy worker with the fewest active sequences and queued prompt tokens.
    LeastLoaded,
    /// The healthy worker with the lowest cost: prompt tokens it would have to compute (its
    /// cached prefix subtracted) plus its load, weighted by `balance`.
    KvAware,
}

impl PolicyKind {
    /// Every policy, in the order `--help` lists them.
    pub const ALL: [PolicyKind; 4] = [
        Self::RoundRobin,
        Self::Random,
        Self::LeastLoaded,
        Self::KvAware,
    ];

    /// The policy's configuration name, e.g. `"kv_aware"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::Random => "random",
            Self::LeastLoaded => "least_loaded",
            Self::KvAware => "kv_aware",
        }
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round_robin" => Ok(Self::RoundRobin),
            "random" => Ok(Self::Random),
            "least_loaded" => Ok(Self::LeastLoaded),
            "kv_aware" => Ok(Self::KvAware),
            other => Err(format!(
                "unknown routing policy {other:?} (round_robin, random, least_loaded, kv_aware)"
            )),
        }
    }
}

/// One worker as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLoad {
    /// Its id (also its key in the [`KvIndex`]).
    pub id: WorkerId,
    /// Passing health checks and not circuit-broken.
    pub healthy: bool,
    /// Sequences it is running.
    pub running: usize,
    /// Requests waiting in its queue.
    pub waiting: usize,
    /// Prompt tokens it still has to compute (queued and in-flight prefills).
    pub queued_prefill_tokens: usize,
}

impl WorkerLoad {
    /// An idle healthy worker.
    pub fn idle(id: WorkerId) -> Self {
        Self {
            id,
            healthy: true,
            running: 0,
            waiting: 0,
            queued_prefill_tokens: 0,
        }
    }
}

/// What is being routed.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Block hashes of the prompt's full blocks (`lastmile_protocol::prefix_hashes`).
    pub prompt_hashes: &'a [u64],
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens per KV block on the workers.
    pub block_size: usize,
}

/// The chosen worker and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The worker.
    pub worker: WorkerId,
    /// Leading prompt blocks the index predicts it holds.
    pub overlap_blocks: usize,
    /// The policy's cost for it (lower is better; 0 for policies without a cost).
    pub cost: f64,
}

/// A routing policy with its (small) state.
#[derive(Debug)]
pub struct Policy {
    kind: PolicyKind,
    /// `kv_aware`: weight of a worker's load against the prompt tokens it would compute.
    balance: f64,
    /// `kv_aware` and `least_loaded`: token-equivalents one running sequence costs.
    running_weight: f64,
    counter: AtomicU64,
    rng: AtomicU64,
}

impl Policy {
    /// A policy of `kind` with the default balance (1.0) and running weight (32 tokens).
    pub fn new(kind: PolicyKind, seed: u64) -> Self {
        Self {
            kind,
            balance: 1.0,
            running_weight: 32.0,
            counter: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
        }
    }

    /// Sets how much a worker's load weighs against prefill it would save (`kv_aware`; 0 routes
    /// on cache overlap alone, large values approach `least_loaded`).
    pub fn with_balance(mut self, balance: f64) -> Self {
        self.balance = balance.max(0.0);
        self
    }

    /// The policy's kind.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// Picks a healthy worker, or `None` when there is none.
    pub fn select(
        &self,
        workers: &[WorkerLoad],
        req: &RouteRequest<'_>,
        index: &KvIndex,
    ) -> Option<Decision> {
        let healthy: Vec<&WorkerLoad> = workers.iter().filter(|w| w.healthy).collect();
        if healthy.is_empty() {
            return None;
        }
        let turn = self.counter.fetch_add(1, Ordering::Relaxed) as usize;
        let ids: Vec<WorkerId> = healthy.iter().map(|w| w.id).collect();
        let overlaps = index.overlaps(req.prompt_hashes, &ids);
        let pick = |i: usize, cost: f64| Decision {
            worker: ids[i],
            overlap_blocks: overlaps[i],
            cost,
        };
        match self.kind {
            PolicyKind::RoundRobin => Some(pick(turn % healthy.len(), 0.0)),
            PolicyKind::Random => Some(pick(self.next_random() as usize % healthy.len(), 0.0)),
            PolicyKind::LeastLoaded => {
                let costs: Vec<f64> = healthy.iter().map(|w| self.load(w)).collect();
                let i = argmin_rotating(&costs, turn);
                Some(pick(i, costs[i]))
            }
            PolicyKind::KvAware => {
                let costs: Vec<f64> = healthy
                    .iter()
                    .zip(&overlaps)
                    .map(|(w, &overlap)| {
                        let cached = (overlap * req.block_size).min(req.prompt_tokens);
                        let prefill = (req.prompt_tokens - cached) as f64;
                        prefill + self.balance * self.load(w)
                    })
                    .collect();
                let i = argmin_rotating(&costs, turn);
                Some(pick(i, costs[i]))
            }
        }
    }

    /// A worker's load in token-equivalents.
    fn load(&self, w: &WorkerLoad) -> f64 {
        (w.running + w.waiting) as f64 * self.running_weight + w.queued_prefill_tokens as f64
    }

    /// splitmix64 over an atomic state.
    fn next_random(&self) -> u64 {
        let s = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Index of the smallest cost; ties go to the first tied entry at or after `turn` (mod len), so
/// equal workers share the traffic instead of the first one taking all of it.
fn argmin_rotating(costs: &[f64], turn: usize) -> usize {
    let n = costs.len();
    let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
    (0..n)
        .map(|k| (turn + k) % n)
        .find(|&i| costs[i] <= min)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lastmile_protocol::{prefix_hashes, KvEvent};

    const BS: usize = 16;

    fn cache(index: &mut KvIndex, worker: WorkerId, hashes: &[u64]) {
        let mut parent = None;
        for &hash in hashes {
            index.apply(worker, &KvEvent::Stored { hash, parent });
            parent = Some(hash);
        }
    }

    fn request(hashes: &[u64], tokens: usize) -> RouteRequest<'_> {
        RouteRequest {
            prompt_hashes: hashes,
            prompt_tokens: tokens,
            block_size: BS,
        }
    }

    fn workers(n: usize) -> Vec<WorkerLoad> {
        (0..n).map(WorkerLoad::idle).collect()
    }

    #[test]
    fn names_parse() {
        for (name, kind) in [
            ("round_robin", PolicyKind::RoundRobin),
            ("random", PolicyKind::Random),
            ("least_loaded", PolicyKind::LeastLoaded),
            ("kv_aware", PolicyKind::KvAware),
        ] {
            assert_eq!(name.parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.name(), name);
        }
        assert!("fastest".parse::<PolicyKind>().is_err());
    }

    #[test]
    fn no_healthy_worker_no_decision() {
        let mut ws = workers(2);
        ws.iter_mut().for_each(|w| w.healthy = false);
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::Random,
            PolicyKind::LeastLoaded,
            PolicyKind::KvAware,
        ] {
            assert_eq!(
                Policy::new(kind, 1).select(&ws, &request(&[], 10), &KvIndex::new()),
                None
            );
        }
    }

    #[test]
    fn round_robin_and_random_skip_unhealthy_workers() {
        let mut ws = workers(3);
        ws[1].healthy = false;
        let index = KvIndex::new();
        let rr = Policy::new(PolicyKind::RoundRobin, 0);
        let picks: Vec<_> = (0..4)
            .map(|_| rr.select(&ws, &request(&[], 5), &index).map(|d| d.worker))
            .collect();
        assert_eq!(picks, vec![Some(0), Some(2), Some(0), Some(2)]);
        let random = Policy::new(PolicyKind::Random, 42);
        let mut seen = [0; 3];
        for _ in 0..200 {
            let d = random
                .select(&ws, &request(&[], 5), &index)
                .expect("healthy");
            seen[d.worker] += 1;
        }
        assert_eq!(seen[1], 0);
        assert!(seen[0] > 60 && seen[2] > 60, "{seen:?}");
    }

    #[test]
    fn least_loaded_prefers_idle_and_spreads_ties() {
        let mut ws = workers(3);
        ws[0].running = 4;
        ws[2].queued_prefill_tokens = 500;
        let p = Policy::new(PolicyKind::LeastLoaded, 0);
        let index = KvIndex::new();
        assert_eq!(
            p.select(&ws, &request(&[], 5), &index).map(|d| d.worker),
            Some(1)
        );
        let even = workers(2);
        let picks: Vec<_> = (0..4)
            .map(|_| p.select(&even, &request(&[], 5), &index).map(|d| d.worker))
            .collect();
        assert!(
            picks.contains(&Some(0)) && picks.contains(&Some(1)),
            "{picks:?}"
        );
    }

    #[test]
    fn kv_aware_follows_the_cache_until_load_outweighs_it() {
        let prompt: Vec<u32> = (0..1000).collect();
        let h = prefix_hashes(&prompt, BS);
        let mut index = KvIndex::new();
        cache(&mut index, 1, &h[..50]); // 800 of the 1000 tokens cached on worker 1
        let p = Policy::new(PolicyKind::KvAware, 0);
        let mut ws = workers(3);
        let d = p
            .select(&ws, &request(&h, prompt.len()), &index)
            .expect("decision");
        assert_eq!((d.worker, d.overlap_blocks), (1, 50));
        assert_eq!(d.cost, 200.0);
        // Busy enough that computing the whole prompt elsewhere is cheaper.
        ws[1].running = 30;
        let d = p
            .select(&ws, &request(&h, prompt.len()), &index)
            .expect("decision");
        assert_ne!(d.worker, 1);
        assert_eq!(d.overlap_blocks, 0);
        // With balance 0 only the cache counts.
        let greedy = Policy::new(PolicyKind::KvAware, 0).with_balance(0.0);
        let d = greedy
            .select(&ws, &request(&h, prompt.len()), &index)
            .expect("decision");
        assert_eq!(d.worker, 1);
    }

    #[test]
    fn kv_aware_without_any_cache_balances_load() {
        let h = prefix_hashes(&(0..64).collect::<Vec<u32>>(), BS);
        let index = KvIndex::new();
        let mut ws = workers(2);
        ws[0].waiting = 3;
        let p = Policy::new(PolicyKind::KvAware, 0);
        assert_eq!(
            p.select(&ws, &request(&h, 64), &index).map(|d| d.worker),
            Some(1)
        );
    }
}
