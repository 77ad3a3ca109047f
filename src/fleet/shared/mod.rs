//! Shared state (SHARED_STATE=redis://…): several corral instances share
//! one fleet's slots through Redis. The scheduler stays per instance and
//! sans-io; this module only tells it how many slots *other* instances hold
//! on each backend (`Backend::foreign`) and confirms every local grant with
//! an atomic check-and-take in Redis before the request may use it.
//!
//! What Redis holds, under the `corral:` prefix:
//! - `corral:slots:<backend>`: a sorted set of leases, member
//!   `<instance>/<n>`, score the lease's expiry (Redis server time, ms).
//!   Taking (`TAKE`) drops expired leases, counts, and adds one only below
//!   the cap, all in one Lua script; giving back (`GIVE_BACK`) removes it
//!   and publishes the backend's holders on `corral:released`, which every
//!   instance answers by offering the slot to its own next waiter. A
//!   finished request hands its lease to the next local waiter on that
//!   backend, which keeps it in one round trip (`TRANSFER`) unless another
//!   instance's waiter is older by more than [`YIELD_MARGIN`].
//! - `corral:instances`: a sorted set of live instances, score its expiry;
//!   `corral:waiting`: each one's oldest waiter, score its arrival.
//! - `corral:drained`: the set of backends drained through
//!   `/__proxy/backends/{id}/drain` on any instance; every instance applies
//!   it at its next renewal.
//! - `corral:registered`: the self-registered backends, id -> URL and lease
//!   expiry (`REGISTERED`), read back at every renewal.
//!
//! Every lease lives [`LEASE_TTL`] and is renewed every [`RENEW_EVERY`]
//! while its request runs (`REFRESH`, which also reads back every
//! backend's holders), so a dead instance's slots free within one TTL.
//!
//! Redis unreachable: logged once, `/__proxy/health` says so, and the
//! instance serves within [`degraded_foreign`]'s local cap (at most
//! `floor(cap / instances last seen)`), so an outage degrades capacity and
//! never oversubscribes. When Redis is back (even empty: `corral:settling`
//! then holds every instance to its local cap for one TTL), the leases held,
//! the drains and the registrations are written again before anything new
//! is taken.
//!
//! The parts: [`protocol`] speaks to Redis and reads the replies of the Lua
//! [`scripts`] into types; [`leases`] takes, hands over and gives back slot
//! leases; [`sync`] shares drains and registrations; [`degraded`] is the
//! state machine of the link to Redis and the local cap. Here: the one
//! lock over what this instance holds, and the renewal that runs every
//! part once a second, on the server's task tracker with the release
//! listener and the waiting stamps.

mod degraded;
mod leases;
mod protocol;
mod scripts;
mod sync;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use degraded::degraded_foreign;
pub use leases::RedisLease;

use super::registry::Registry;
use super::{BackendId, Fleet};
use degraded::Link;
use protocol::{PREFIX, Redis, Refreshed};

/// How long a slot lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often leases are renewed and holders read back.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A handed-over slot goes to another instance's waiter only when that one
/// waited longer by more than this: a yield idles the backend for a publish
/// and a take (a few round trips), worth it only against a real lag.
pub const YIELD_MARGIN: Duration = Duration::from_millis(20);

/// What `/__proxy/health` says about the shared state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SharedView {
    /// This instance's name in the shared state.
    pub instance: String,
    /// Redis answered the last call.
    pub reachable: bool,
    /// Live instances when Redis last answered.
    pub instances: usize,
}

/// The connection to the shared state and what this instance holds there.
pub struct SharedState {
    redis: Redis,
    instance: String,
    cap: u32,
    /// A std mutex, not tokio's: every critical section is a few map
    /// operations, never held across `.await` nor while the fleet's lock is
    /// taken, so that the two locks are never held together.
    inner: Mutex<Inner>,
    /// The registrations, once [`SharedState::start`]ed.
    registry: OnceLock<Arc<Registry>>,
    /// Set when a request starts waiting here: its stamp is written at once
    /// (coalesced: one write in flight at a time).
    stamp_wanted: tokio::sync::Notify,
}

/// What this instance holds and knows of the shared state.
#[derive(Debug, Default)]
struct Inner {
    link: Link,
    /// Live instances when Redis last answered; 0 until a renewal went
    /// through.
    instances: usize,
    /// The number of the next lease taken here.
    next_lease: u64,
    /// Leases held by this instance: member -> backend.
    held: HashMap<String, BackendId>,
    drains: sync::Drains,
    registering: sync::Registering,
}

impl SharedState {
    /// A shared state at `url` (`redis://host:port/db`) for backends capped
    /// at `cap`; nothing is connected until [`SharedState::start`].
    pub fn new(url: &str, cap: u32) -> Result<Arc<Self>, redis::RedisError> {
        Ok(Arc::new(Self {
            redis: Redis::open(url)?,
            instance: format!("{}-{:04x}", std::process::id(), rand::random::<u16>()),
            cap,
            inner: Mutex::default(),
            registry: OnceLock::new(),
            stamp_wanted: tokio::sync::Notify::new(),
        }))
    }

    /// This instance's name in the shared state.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Reachability and instance count, for `/__proxy/health`.
    pub fn view(&self) -> SharedView {
        let inner = self.inner();
        SharedView {
            instance: self.instance.clone(),
            reachable: inner.link.reachable(),
            instances: inner.instances,
        }
    }

    /// A poisoned lock is taken anyway: every change under it is a single
    /// map or field operation.
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs, on `tasks` until `stop`, the renewal (which also shares the
    /// registrations of `registry`), the waiting stamps and the release
    /// listener.
    pub fn start(
        self: &Arc<Self>,
        fleet: &Fleet,
        registry: Arc<Registry>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let _ = self.registry.set(registry);
        let (me, fleet) = (Arc::clone(self), fleet.clone());
        tasks.spawn(stop.clone().run_until_cancelled_owned(async move {
            let renewing = async {
                loop {
                    me.renew(&fleet).await;
                    tokio::time::sleep(RENEW_EVERY).await;
                }
            };
            let stamping = async {
                loop {
                    me.stamp_wanted.notified().await;
                    me.stamp(&fleet).await;
                }
            };
            let listening = async {
                loop {
                    me.listen(&fleet).await;
                    tokio::time::sleep(RENEW_EVERY).await;
                }
            };
            tokio::join!(renewing, stamping, listening)
        }));
    }

    /// Says that a request has started waiting on this instance; its
    /// oldest waiter is stamped in `corral:waiting` soon after, without
    /// waiting for the next take or renewal.
    pub(super) fn waiting_started(&self) {
        self.stamp_wanted.notify_one();
    }

    /// Renews this instance's leases, reads every backend's holders and the
    /// drains, then syncs the registrations.
    async fn renew(&self, fleet: &Fleet) {
        let ids: Vec<BackendId> = fleet.read(|s| s.backends().keys().cloned().collect());
        let (held, rewrite, seen, drains) = {
            let inner = self.inner();
            let held = inner.held.clone();
            let seen = inner.instances > 0;
            (held, inner.link.stale(), seen, inner.drains.known())
        };
        let mut inv = scripts::REFRESH.prepare_invoke();
        inv.arg(PREFIX)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(u8::from(rewrite))
            .arg(&self.instance)
            .arg(leases::oldest_age(fleet))
            .arg(u8::from(seen))
            .arg(ids.len())
            .arg(strings(&ids))
            .arg(drains.len())
            .arg(strings(&drains));
        for (member, backend) in &held {
            inv.arg(backend.to_string()).arg(member);
        }
        let out: Refreshed = match self.redis.run(inv).await {
            Ok(out) => out,
            Err(e) => return self.mark_down(fleet, &e),
        };
        let was = {
            let mut inner = self.inner();
            inner.instances = out.instances;
            std::mem::replace(&mut inner.link, Link::renewed(out.settling))
        };
        if !was.reachable() {
            tracing::info!("shared state reachable again");
        }
        if out.settling && !was.settling() {
            tracing::warn!(
                "shared state: Redis came back empty; every instance writes its leases again, meanwhile serving within floor(cap / instances)"
            );
        } else if was.settling() && !out.settling {
            tracing::info!("shared state: leases written again; back to shared slots");
        }
        if out.settling {
            // Some instances have not written their leases again:
            // what Redis lists is short; keep the view from before.
            self.hold_to_local_cap(fleet);
        } else {
            for (id, holders) in ids.iter().zip(&out.holders) {
                self.apply(fleet, id, holders, 0);
            }
        }
        self.apply_drained(fleet, &out.drained);
        self.sync_registered(fleet, rewrite || out.rewritten).await;
    }
}

/// Backend ids as script arguments, one each.
pub(super) fn strings(ids: &[BackendId]) -> Vec<String> {
    ids.iter().map(BackendId::to_string).collect()
}
