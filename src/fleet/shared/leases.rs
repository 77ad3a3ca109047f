//! Slot leases in Redis: taking one for each local grant, handing it over
//! to the next local waiter (`TRANSFER`, unless an older waiter elsewhere
//! should have the slot), giving it back, and reading every backend's
//! holders back into the fleet (`Backend::foreign`), from the replies and
//! from the other instances' release announcements.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::protocol::{self, CHANNEL, INSTANCES_KEY, Released, Take, Transfer, WAITING_KEY};
use super::scripts;
use super::{LEASE_TTL, SharedState, YIELD_MARGIN};
use crate::fleet::{BackendId, Fleet};

/// A slot's lease in Redis (a member `<instance>/<n>` of its backend's
/// slots set), given back when its slot is.
#[derive(Debug)]
pub struct RedisLease {
    member: String,
    backend: BackendId,
}

impl SharedState {
    /// Confirms a slot the local scheduler granted on `id` to a request that
    /// arrived at `since`: the lease when the backend has room fleet-wide
    /// (or, degraded, within the local cap), `None` when it has not (the
    /// fleet's view of the other instances' slots is updated, so the caller
    /// gives the slot back and waits).
    pub(in crate::fleet) async fn take(
        &self,
        fleet: &Fleet,
        id: &BackendId,
        since: Instant,
    ) -> Option<RedisLease> {
        let (n, shares) = {
            let mut inner = self.inner();
            inner.next_lease += 1;
            (inner.next_lease - 1, inner.link.shares())
        };
        let lease = RedisLease {
            member: format!("{}/{n}", self.instance),
            backend: id.clone(),
        };
        if shares {
            let mut inv = scripts::TAKE.key(protocol::slots_key(id));
            inv.key(INSTANCES_KEY)
                .key(WAITING_KEY)
                .arg(self.cap)
                .arg(LEASE_TTL.as_millis() as u64)
                .arg(&lease.member)
                .arg(&self.instance)
                .arg(oldest_age(fleet))
                .arg(age_ms(since));
            match self.redis.run(inv).await {
                Ok(Take::Taken(holders)) => {
                    let lease = self.hold(lease);
                    self.apply(fleet, id, &holders, 0);
                    return Some(lease);
                }
                Ok(Take::Full(holders)) => {
                    self.apply(fleet, id, &holders, 0);
                    return None;
                }
                Ok(Take::Lost) => {
                    tracing::warn!(
                        "shared state lost this instance (Redis restarted empty?): writing its leases again"
                    );
                    self.inner().link.go_stale();
                }
                Err(e) => self.mark_down(fleet, &e),
            }
        }
        self.fits_local_cap(fleet, id).then(|| self.hold(lease))
    }

    /// Records `lease` as held here.
    fn hold(&self, lease: RedisLease) -> RedisLease {
        let (member, backend) = (lease.member.clone(), lease.backend.clone());
        self.inner().held.insert(member, backend);
        lease
    }

    /// Keeps `lease`, which a finished request on `id` handed to the next
    /// local waiter (which arrived at `since`), in one round trip: `None`
    /// when an older waiter of another instance should have the slot (it is
    /// given back and counted as taken by that instance meanwhile), or when
    /// Redis cannot say (the caller then takes a slot the usual way).
    pub(in crate::fleet) async fn transfer(
        self: &Arc<Self>,
        fleet: &Fleet,
        id: &BackendId,
        lease: RedisLease,
        since: Instant,
    ) -> Option<RedisLease> {
        let shares = self.inner().link.shares();
        // Given back unless kept below, whatever happens to this future.
        let mut pending = Handover {
            state: self,
            lease: Some(lease),
        };
        if !shares {
            return None;
        }
        let member = pending.lease.as_ref().map(|l| l.member.clone())?;
        let mut inv = scripts::TRANSFER.key(protocol::slots_key(id));
        inv.key(INSTANCES_KEY)
            .key(WAITING_KEY)
            .arg(&member)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(&self.instance)
            .arg(age_ms(since))
            .arg(oldest_age(fleet))
            .arg(CHANNEL)
            .arg(id.to_string())
            .arg(YIELD_MARGIN.as_millis() as u64);
        let (holders, yielded) = match self.redis.run(inv).await {
            Ok(Transfer::Kept(holders)) => {
                self.apply(fleet, id, &holders, 0);
                return pending.lease.take();
            }
            Ok(Transfer::Yielded(holders)) => (holders, 1),
            Ok(Transfer::Gone(holders)) => (holders, 0),
            Ok(Transfer::Lost) => {
                self.inner().link.go_stale();
                return None;
            }
            Err(e) => {
                self.mark_down(fleet, &e);
                return None;
            }
        };
        // Already out of Redis: nothing to give back.
        self.inner().held.remove(&member);
        pending.lease = None;
        self.apply(fleet, id, &holders, yielded);
        None
    }

    /// Gives a lease back (in the background; a failure leaves it to expire).
    pub(in crate::fleet) fn give_back(self: &Arc<Self>, lease: RedisLease) {
        self.inner().held.remove(&lease.member);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = Arc::clone(self);
        runtime.spawn(async move {
            if !me.inner().link.reachable() {
                return;
            }
            let mut inv = scripts::GIVE_BACK.key(protocol::slots_key(&lease.backend));
            inv.arg(&lease.member)
                .arg(CHANNEL)
                .arg(lease.backend.to_string());
            if let Err(e) = me.redis.run::<()>(inv).await {
                tracing::debug!(error = %e, "shared state: give-back failed; the lease expires");
            }
        });
    }

    /// Writes this instance's oldest waiter to `corral:waiting`. Skipped
    /// when Redis is out of reach: the next renewal writes it anyway.
    pub(super) async fn stamp(&self, fleet: &Fleet) {
        if !self.inner().link.reachable() {
            return;
        }
        let mut inv = scripts::STAMP.key(WAITING_KEY);
        inv.arg(&self.instance).arg(oldest_age(fleet));
        if let Err(e) = self.redis.run::<()>(inv).await {
            self.mark_down(fleet, &e);
        }
    }

    /// Listens for released slots until the subscription breaks.
    pub(super) async fn listen(&self, fleet: &Fleet) {
        use futures_util::StreamExt;
        let Some(mut pubsub) = self.redis.subscribe(CHANNEL).await else {
            return;
        };
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let released = Released::parse(&payload);
            if released.yielder == self.instance {
                // This instance yielded the slot to an older waiter
                // elsewhere: it stays counted as taken here (the phantom
                // of the hand-over) until that instance takes it or the
                // next renewal says it is still free.
                continue;
            }
            let id = &released.backend;
            if !fleet.read(|s| s.backends().contains_key(id)) {
                continue;
            }
            let link = self.inner().link;
            if link.reachable() && !link.settling() {
                self.apply(fleet, id, released.holders, 0);
            }
        }
    }

    /// Records a backend's holders as Redis listed them, plus `yielded`
    /// slots this instance just left to another one, counted as taken until
    /// Redis next lists the holders.
    pub(super) fn apply(&self, fleet: &Fleet, id: &BackendId, holders: &str, yielded: u32) {
        let (foreign, by_instance) = {
            let inner = self.inner();
            let mut by_instance = BTreeMap::new();
            let mut foreign = 0u32;
            for m in holders.split(',').filter(|m| !m.is_empty()) {
                let instance = m.rsplit_once('/').map_or(m, |(i, _)| i);
                *by_instance.entry(instance.to_string()).or_insert(0) += 1;
                if !inner.held.contains_key(m) {
                    foreign += 1;
                }
            }
            (foreign + yielded, by_instance)
        };
        fleet.update(|s| s.set_foreign(id, foreign, by_instance));
    }
}

/// A handed-over lease not kept yet: given back if dropped.
struct Handover<'a> {
    state: &'a Arc<SharedState>,
    lease: Option<RedisLease>,
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.state.give_back(lease);
        }
    }
}

fn age_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The age of this instance's oldest waiter in ms, -1 when none waits.
pub(super) fn oldest_age(fleet: &Fleet) -> i64 {
    fleet
        .read(|s| s.oldest_waiting())
        .map_or(-1, |since| i64::try_from(age_ms(since)).unwrap_or(i64::MAX))
}
