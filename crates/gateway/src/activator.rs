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

/// Requests waiting per deployment, and what they have seen.
#[derive(Default)]
pub(crate) struct Activator {
    held: Mutex<HashMap<String, usize>>,
    /// Per deployment: (replicas starting, requests let through and not yet routed).
    scaling: Mutex<HashMap<String, (usize, usize)>>,
    /// Requests that arrived per deployment, ever (the autoscaler sees short requests that
    /// start and end between two of its samples by this count).
    arrivals: Mutex<HashMap<String, u64>>,
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
        let mut held = self.activator.held();
        if let Some(n) = held.get_mut(self.name) {
            *n = n.saturating_sub(1);
        }
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
        if let Some(e) = self.activator.scaling().get_mut(self.name) {
            e.1 = e.1.saturating_sub(1);
        }
    }
}

impl Activator {
    fn scaling(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, usize)>> {
        self.scaling.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request for `deployment`.
    pub(crate) fn arrived(&self, deployment: &str) {
        let mut a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        *a.entry(deployment.to_string()).or_insert(0) += 1;
    }

    /// Requests that arrived for `deployment` so far.
    pub(crate) fn arrivals(&self, deployment: &str) -> u64 {
        let a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        a.get(deployment).copied().unwrap_or(0)
    }

    /// The controller reports `n` replicas of `deployment` starting.
    pub(crate) fn set_starting(&self, deployment: &str, n: usize) {
        self.scaling().entry(deployment.to_string()).or_default().0 = n;
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting for `deployment` now.
    pub(crate) fn waiting(&self, deployment: &str) -> usize {
        self.held().get(deployment).copied().unwrap_or(0)
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
        {
            let mut held = self.held();
            let n = held.entry(d.name.clone()).or_insert(0);
            if *n >= d.queue {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::overloaded(format!(
                    "deployment `{}` is starting and {} requests already wait for it; retry \
                     shortly",
                    d.name, d.queue
                )));
            }
            *n += 1;
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
        let all = gw.workers.all();
        let ready: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(id, w)| {
                !exclude.contains(id)
                    && w.available()
                    && w.model().as_deref() == Some(d.name.as_str())
            })
            .map(|(_, w)| w)
            .collect();
        if ready.is_empty() {
            return None;
        }
        let mut scaling = self.scaling();
        let entry = scaling.entry(d.name.clone()).or_default();
        let (starting, releasing) = *entry;
        if starting > 0 && d.capacity_per_replica > 0.0 {
            let in_flight: usize = ready.iter().map(|w| w.in_flight()).sum();
            if (in_flight + releasing) as f64 >= d.capacity_per_replica * ready.len() as f64 {
                return None;
            }
        }
        entry.1 += 1;
        Some(Released {
            activator: self,
            name: &d.name,
        })
    }
}
