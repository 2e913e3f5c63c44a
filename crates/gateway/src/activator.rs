//! The activator: a request for a deployment that has no ready replica (scaled to zero, or all
//! of its replicas starting) waits here instead of failing. It tells the control plane there is
//! demand (the `on_demand` callback, which starts a replica if none is starting), then waits
//! until a worker serving the deployment becomes available, and goes on to routing.
//!
//! While the deployment is scaling up (the controller reports replicas starting), the activator
//! stays in the path as Knative's does: it lets through only as many requests as the ready
//! replicas have capacity for (`capacity_per_replica` each, counting those it let through that
//! are not yet routed), so a burst at zero does not all land on the first replica to come up;
//! once nothing is starting, everyone waiting goes on and routing spreads them.
//!
//! Bounds: at most the deployment's `queue` requests wait at once (more get 503 at once), and
//! each waits at most its `hold_timeout` (then 503); both answers carry `Retry-After`. The
//! number waiting per deployment is part of the load the autoscaler reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lastmile_protocol::ApiError;

use crate::{DeploymentRoute, Gateway};

/// Called with a deployment's name when a request for it is waiting.
pub(crate) type DemandHook = Arc<dyn Fn(&str) + Send + Sync>;

/// What the activator tracks for one deployment.
#[derive(Default)]
struct Tally {
    /// Requests waiting now.
    held: usize,
    /// Replicas starting, as the controller last reported.
    starting: usize,
    /// Requests let through while replicas start and not yet routed.
    releasing: usize,
    /// Requests that arrived, ever (the autoscaler sees short requests that start and end
    /// between two of its samples by this count).
    arrivals: u64,
}

/// Requests waiting per deployment, and what they have seen.
#[derive(Default)]
pub(crate) struct Activator {
    tallies: Mutex<HashMap<String, Tally>>,
    on_demand: RwLock<Option<DemandHook>>,
    /// Requests that had to wait for a replica.
    pub(crate) activated: AtomicU64,
    /// Requests turned away: the queue was full or no replica came in time.
    pub(crate) rejected: AtomicU64,
}

/// Counts one waiting request until dropped.
struct Held<'a> {
    activator: &'a Activator,
    name: &'a str,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.activator
            .with(self.name, |t| t.held = t.held.saturating_sub(1));
    }
}

/// A request the activator let through, counted against capacity until it is routed (dropped
/// once its worker counts it in flight).
pub(crate) struct Released<'a> {
    activator: &'a Activator,
    name: &'a str,
}

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.activator
            .with(self.name, |t| t.releasing = t.releasing.saturating_sub(1));
    }
}

impl Activator {
    /// Runs `f` on `deployment`'s tally (created on first use).
    fn with<T>(&self, deployment: &str, f: impl FnOnce(&mut Tally) -> T) -> T {
        let mut tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        match tallies.get_mut(deployment) {
            Some(t) => f(t),
            None => f(tallies.entry(deployment.to_string()).or_default()),
        }
    }

    /// Counts a request for `deployment`.
    pub(crate) fn arrived(&self, deployment: &str) {
        self.with(deployment, |t| t.arrivals += 1);
    }

    /// Requests that arrived for `deployment` so far.
    pub(crate) fn arrivals(&self, deployment: &str) -> u64 {
        self.with(deployment, |t| t.arrivals)
    }

    /// The controller reports `n` replicas of `deployment` starting.
    pub(crate) fn set_starting(&self, deployment: &str, n: usize) {
        self.with(deployment, |t| t.starting = n);
    }

    /// Requests waiting for `deployment` now.
    pub(crate) fn waiting(&self, deployment: &str) -> usize {
        self.with(deployment, |t| t.held)
    }

    /// Sets what is called when a request has to wait.
    pub(crate) fn set_on_demand(&self, hook: DemandHook) {
        *self.on_demand.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn demand(&self, deployment: &str) {
        let hook = self
            .on_demand
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(deployment);
        }
    }

    /// Returns at once if a worker serves `d` (other than those in `exclude`: they failed this
    /// request) and has room (see the module comment); otherwise waits for one, or answers why
    /// it cannot. Keep the returned guard until the request is counted in flight on a worker.
    pub(crate) async fn ready<'a>(
        &'a self,
        gw: &Gateway,
        d: &'a DeploymentRoute,
        exclude: &[usize],
    ) -> Result<Released<'a>, ApiError> {
        let go = || self.try_release(gw, d, exclude);
        if let Some(r) = go() {
            return Ok(r);
        }
        let admitted = self.with(&d.name, |t| {
            let room = t.held < d.queue;
            t.held += usize::from(room);
            room
        });
        if !admitted {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::overloaded(format!(
                "deployment `{}` is starting and {} requests already wait for it; retry \
                 shortly",
                d.name, d.queue
            )));
        }
        let _held = Held {
            activator: self,
            name: &d.name,
        };
        self.activated.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + d.hold_timeout;
        loop {
            // Registered before the check, so a change in between still wakes us.
            let changed = gw.workers.became_available.notified();
            if let Some(r) = go() {
                return Ok(r);
            }
            self.demand(&d.name);
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                if let Some(r) = go() {
                    return Ok(r);
                }
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::overloaded(format!(
                    "deployment `{}` has no ready replica yet (waited {:.1} s); retry shortly",
                    d.name,
                    d.hold_timeout.as_secs_f64()
                )));
            }
        }
    }

    /// Lets one request through if a replica of `d` is available and, while replicas are
    /// starting, the ready ones have room for it.
    fn try_release<'a>(
        &'a self,
        gw: &Gateway,
        d: &'a DeploymentRoute,
        exclude: &[usize],
    ) -> Option<Released<'a>> {
        // Ready replicas of `d` and what they have in flight, in one pass.
        let (ready, in_flight) = gw
            .workers
            .all()
            .iter()
            .enumerate()
            .filter(|(id, w)| {
                !exclude.contains(id)
                    && w.available()
                    && w.model().as_deref() == Some(d.name.as_str())
            })
            .fold((0usize, 0usize), |(n, f), (_, w)| {
                (n + 1, f + w.in_flight())
            });
        if ready == 0 {
            return None;
        }
        let room = self.with(&d.name, |t| {
            let full = t.starting > 0
                && d.capacity_per_replica > 0.0
                && (in_flight + t.releasing) as f64 >= d.capacity_per_replica * ready as f64;
            t.releasing += usize::from(!full);
            !full
        });
        if !room {
            return None;
        }
        Some(Released {
            activator: self,
            name: &d.name,
        })
    }
}
