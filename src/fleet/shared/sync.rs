//! State sync: drains and registrations made on one instance, written to
//! Redis (`corral:drained`, `corral:registered`) and applied by every
//! instance at its renewals; written again when Redis comes back empty.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::SharedState;
use super::protocol::{DRAINED_KEY, REGISTERED_KEY, Registrations};
use super::scripts;
use crate::fleet::{BackendId, Fleet, Target};

/// The drains this instance knows of.
#[derive(Debug, Default)]
pub(super) struct Drains {
    /// Changes made here and not yet written to Redis.
    pending: HashMap<BackendId, bool>,
    /// Drained here because Redis said so.
    by_others: HashSet<BackendId>,
    /// Drained through this instance.
    here: HashSet<BackendId>,
}

impl Drains {
    /// What this instance drained, itself or for others: written again
    /// when Redis comes back empty.
    pub(super) fn known(&self) -> Vec<BackendId> {
        self.here.union(&self.by_others).cloned().collect()
    }
}

/// The registrations this instance writes.
#[derive(Debug, Default)]
pub(super) struct Registering {
    /// Bumped around every registration change this instance writes, so
    /// that a read of the registrations made meanwhile is not applied.
    writes: u64,
    /// Deregistrations made here and not yet written to Redis.
    deregistered: HashSet<BackendId>,
}

impl SharedState {
    /// Shares a drain (true) or undrain (false) made on this instance.
    pub(in crate::fleet) fn share_drain(self: &Arc<Self>, id: &BackendId, draining: bool) {
        {
            let mut inner = self.inner();
            let drains = &mut inner.drains;
            drains.pending.insert(id.clone(), draining);
            drains.by_others.remove(id);
            if draining {
                drains.here.insert(id.clone());
            } else {
                drains.here.remove(id);
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (me, id) = (Arc::clone(self), id.clone());
        runtime.spawn(async move {
            let mut cmd = redis::cmd(if draining { "SADD" } else { "SREM" });
            cmd.arg(DRAINED_KEY).arg(id.to_string());
            if me.redis.query::<()>(&cmd).await.is_err() {
                tracing::warn!(backend = %id, draining, "shared state: drain not shared (Redis unreachable)");
            }
            me.inner().drains.pending.remove(&id);
        });
    }

    /// Applies the drained set from Redis (one backend a line): drains what
    /// others drained, and undrains what it drained for them (or itself)
    /// once another instance undrains it.
    pub(super) fn apply_drained(&self, fleet: &Fleet, drained: &str) {
        let drained: HashSet<BackendId> = drained
            .split('\n')
            .filter(|b| !b.is_empty())
            .map(BackendId::parse)
            .collect();
        let inner = self.inner();
        let pending: HashSet<BackendId> = inner.drains.pending.keys().cloned().collect();
        let known: HashSet<BackendId> = inner.drains.known().into_iter().collect();
        drop(inner);
        let changes: Vec<(BackendId, bool)> = fleet.read(|s| {
            let backends = s.backends().iter().filter(|(id, _)| !pending.contains(*id));
            backends
                .filter_map(|(id, b)| {
                    let wanted = drained.contains(id);
                    let change =
                        (wanted && !b.draining) || (!wanted && b.draining && known.contains(id));
                    change.then(|| (id.clone(), wanted))
                })
                .collect()
        });
        if changes.is_empty() {
            return;
        }
        fleet.update(|s| {
            for (id, draining) in &changes {
                if let Some(b) = s.backend_mut(id) {
                    b.draining = *draining;
                }
            }
        });
        for (id, draining) in &changes {
            tracing::info!(backend = %id, draining, "drain state changed on another instance");
        }
        let mut inner = self.inner();
        for (id, draining) in changes {
            let drains = &mut inner.drains;
            if draining {
                drains.by_others.insert(id);
            } else {
                // Undrained on another instance, whoever drained it.
                drains.by_others.remove(&id);
                drains.here.remove(&id);
            }
        }
    }

    /// Shares a registration (or renewal) made on this instance.
    pub(in crate::fleet) async fn share_registration(
        &self,
        target: &Target,
        lease: Option<Duration>,
    ) {
        let mut inv = scripts::REGISTERED.key(REGISTERED_KEY);
        inv.arg("set").arg(1);
        registration_args(&mut inv, target, lease);
        if self.write_registered(inv).await == Some(false) {
            tracing::warn!(backend = %target.id, "shared state: registration not shared yet");
        }
    }

    /// Shares a deregistration made on this instance (written at the next
    /// renewal when Redis is unreachable now).
    pub(in crate::fleet) async fn share_deregistration(&self, id: &BackendId) {
        self.inner().registering.deregistered.insert(id.clone());
        let mut inv = scripts::REGISTERED.key(REGISTERED_KEY);
        inv.arg("set").arg(0).arg(id.to_string());
        match self.write_registered(inv).await {
            Some(true) => _ = self.inner().registering.deregistered.remove(id),
            Some(false) => {
                tracing::warn!(backend = %id, "shared state: deregistration not shared yet")
            }
            None => {}
        }
    }

    /// Writes a registration change made here, counted before and after in
    /// `writes`: whether it was written, `None` when Redis is out of reach.
    async fn write_registered(&self, inv: redis::ScriptInvocation<'_>) -> Option<bool> {
        let reachable = {
            let mut inner = self.inner();
            inner.registering.writes += 1;
            inner.link.reachable()
        };
        let mut written = None;
        if reachable {
            let result = self.redis.run::<()>(inv).await;
            written = Some(result.inspect_err(|e| self.mark_stale(e)).is_ok());
        }
        self.inner().registering.writes += 1;
        written
    }

    /// Writes what is pending (deregistrations; every live registration
    /// when `rewrite`: Redis was gone or emptied) and applies the shared
    /// registrations: new ones are enrolled, renewals move the local lease,
    /// and a registration Redis no longer has retires here too.
    pub(super) async fn sync_registered(&self, fleet: &Fleet, rewrite: bool) {
        let Some(registry) = self.registry.get() else {
            return;
        };
        let (before, deletes): (u64, Vec<BackendId>) = {
            let inner = self.inner();
            let r = &inner.registering;
            (r.writes, r.deregistered.iter().cloned().collect())
        };
        let writes = if rewrite {
            registry.live_leases(tokio::time::Instant::now())
        } else {
            Vec::new()
        };
        let mut inv = scripts::REGISTERED.key(REGISTERED_KEY);
        inv.arg("keep").arg(writes.len());
        for (target, left) in &writes {
            registration_args(&mut inv, target, *left);
        }
        inv.arg(super::strings(&deletes));
        let Registrations(out) = match self.redis.run(inv).await {
            Ok(out) => out,
            Err(e) => return self.mark_down(fleet, &e),
        };
        {
            let mut inner = self.inner();
            let r = &mut inner.registering;
            for d in &deletes {
                r.deregistered.remove(d);
            }
            if r.writes != before {
                // Changed here meanwhile: the next renewal reads it back.
                return;
            }
        }
        let mut shared = HashSet::new();
        for entry in out {
            let (id, url) = (&entry.id, entry.url.as_str());
            let Ok(base) = crate::config::parse_backend_url(url) else {
                tracing::warn!(backend = %id, url, "shared state: unreadable registration ignored");
                continue;
            };
            let (target, _) = fleet.enrol(registry, &base, entry.lease);
            shared.insert(target.id.clone());
        }
        for target in registry.live() {
            if !shared.contains(&target.id) {
                tracing::info!(backend = %target.id, "registration withdrawn on another instance (or ran out)");
                fleet.retire(registry, &target.id);
            }
        }
    }
}

/// The (id, url, lease ms or -1) of one registration write.
fn registration_args(
    inv: &mut redis::ScriptInvocation<'_>,
    target: &Target,
    lease: Option<Duration>,
) {
    let ms = lease.map_or(-1, |l| i64::try_from(l.as_millis()).unwrap_or(i64::MAX));
    inv.arg(target.id.to_string()).arg(&target.base).arg(ms);
}
