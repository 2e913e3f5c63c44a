//! The activator: a request for a deployment that has no ready replica (scaled to zero, or all
//! of its replicas starting) waits here instead of failing. It tells the control plane there is
//! demand (the `on_demand` callback, which starts a replica if none is starting), then waits
//! until a worker serving the deployment becomes available, and goes on to routing.
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

impl Activator {
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
    /// request); otherwise waits for one (see the module comment), or answers why it cannot.
    pub(crate) async fn ready(
        &self,
        gw: &Gateway,
        d: &DeploymentRoute,
        exclude: &[usize],
    ) -> Result<(), ApiError> {
        let available = || {
            gw.workers.all().iter().enumerate().any(|(id, w)| {
                !exclude.contains(&id)
                    && w.available()
                    && w.model().as_deref() == Some(d.name.as_str())
            })
        };
        if available() {
            return Ok(());
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
            // Registered before the check, so a worker arriving in between still wakes us.
            let arrived = gw.workers.became_available.notified();
            if available() {
                return Ok(());
            }
            self.demand(&d.name);
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                if available() {
                    return Ok(());
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
}
