//! Registering and deregistering a backend: the [`Registry`]'s bookkeeping
//! applied to the fleet's table, and, with SHARED_STATE, shared with the
//! other instances (which apply the same through [`Fleet::enrol`] and
//! [`Fleet::retire`] when they read it back from Redis).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::registry::{Registered, Registry};
use super::{BackendId, Fleet, Target};

/// What a deregistration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Forgotten at once (nothing was in flight there).
    pub removed: bool,
    /// Requests still running there (it is forgotten when they finish).
    pub in_flight: u32,
}

impl Fleet {
    /// Registers (or renews) the backend at `base` for `lease` (`None`:
    /// until deregistered), and shares the registration with the other
    /// instances (awaiting Redis, within its call timeout).
    pub async fn register_backend(
        &self,
        registry: &Registry,
        base: &http::Uri,
        lease: Option<Duration>,
    ) -> (Arc<Target>, Registered) {
        let (target, what) = self.enrol(registry, base, lease);
        if let Some(remote) = self.shared_state() {
            remote.share_registration(&target, lease).await;
        }
        (target, what)
    }

    /// Deregisters `id` on every instance: drained, and forgotten once idle.
    /// `None` when it is not a registered backend.
    pub async fn deregister_backend(&self, registry: &Registry, id: &BackendId) -> Option<Retired> {
        let retired = self.retire(registry, id)?;
        if let Some(remote) = self.shared_state() {
            remote.share_deregistration(id).await;
        }
        Some(retired)
    }

    /// Registers (or renews) on this instance only: a new backend is in the
    /// table at once (unhealthy until its probe, which the registration
    /// triggers); one that was retiring comes back undrained.
    pub(crate) fn enrol(
        &self,
        registry: &Registry,
        base: &http::Uri,
        lease: Option<Duration>,
    ) -> (Arc<Target>, Registered) {
        let (target, what) = registry.register(base, lease, Instant::now());
        if what != Registered::Renewed {
            self.update(|s| {
                s.add_backend(Arc::clone(&target));
            });
        }
        if what == Registered::New {
            tracing::info!(backend = %target.id, url = %target.base, ?lease, "backend registered");
        } else if what == Registered::Revived {
            self.set_draining_here(&target.id, false);
            tracing::info!(backend = %target.id, "registration renewed while draining: back in service");
        }
        (target, what)
    }

    /// Deregisters on this instance only: drains `id`, and forgets it at
    /// once when nothing is in flight there.
    pub(crate) fn retire(&self, registry: &Registry, id: &BackendId) -> Option<Retired> {
        if !registry.deregister(id) {
            return None;
        }
        self.set_draining_here(id, true);
        let in_flight = self.update(|s| {
            let in_flight = s.backends().get(id).map_or(0, |b| b.in_flight);
            if in_flight == 0 {
                s.remove_backend(id);
            }
            in_flight
        });
        let removed = in_flight == 0 && registry.forget(id);
        if removed {
            tracing::info!(backend = %id, "backend deregistered and removed");
        } else {
            tracing::info!(backend = %id, in_flight, "backend deregistered: draining, removed when idle");
        }
        Some(Retired { removed, in_flight })
    }
}
