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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

mod scripts;

use scripts::{GIVE_BACK, NOW, REFRESH, REGISTERED, STAMP, TAKE, TRANSFER};

use super::registry::Registry;
use super::{BackendId, Fleet, Target};

/// How long a slot lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often leases are renewed and holders read back.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A handed-over slot goes to another instance's waiter only when that one
/// waited longer by more than this: a yield idles the backend for a publish
/// and a take (a few round trips), worth it only against a real lag.
pub const YIELD_MARGIN: Duration = Duration::from_millis(20);
/// The longest any one Redis call may take before Redis counts as gone.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
const PREFIX: &str = "corral:";
const CHANNEL: &str = "corral:released";

/// A slot's lease in Redis, given back when its slot is.
#[derive(Debug)]
pub struct RemoteLease {
    member: String,
    backend: String,
}

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

#[derive(Debug)]
struct Status {
    reachable: bool,
    /// Leases must be written again (Redis was gone, maybe emptied).
    rewrite: bool,
    /// Redis came back empty less than a lease TTL ago: serve within the
    /// degraded local cap and keep the holders seen before.
    settling: bool,
    /// A renewal went through once.
    seen: bool,
    instances: usize,
}

/// The connection to the shared state and what this instance holds there.
pub struct SharedState {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    instance: String,
    cap: u32,
    next_lease: AtomicU64,
    /// Leases held by this instance: member -> backend.
    held: Mutex<HashMap<String, String>>,
    status: Mutex<Status>,
    /// Drain changes made here and not yet written to Redis.
    drain_pending: Mutex<HashMap<String, bool>>,
    /// Backends this instance drained because Redis said so.
    drained_by_others: Mutex<HashSet<String>>,
    /// Backends drained through this instance (written again when Redis
    /// comes back empty, with those drained by others).
    drained_here: Mutex<HashSet<String>>,
    /// The registrations, once [`SharedState::start`]ed.
    registry: OnceLock<Arc<Registry>>,
    /// Bumped around every registration change this instance writes, so
    /// that a read of the registrations made meanwhile is not applied.
    registry_writes: AtomicU64,
    /// Deregistrations made here and not yet written to Redis.
    deregister_pending: Mutex<HashSet<String>>,
    take: Script,
    give_back: Script,
    transfer: Script,
    refresh: Script,
    registered: Script,
    stamp: Script,
    /// Set when a request starts waiting here: its stamp is written at once
    /// (coalesced: one write in flight at a time).
    stamp_wanted: tokio::sync::Notify,
}

impl SharedState {
    /// A shared state at `url` (`redis://host:port/db`) for backends capped
    /// at `cap`; nothing is connected until [`SharedState::start`].
    pub fn new(url: &str, cap: u32) -> Result<Arc<Self>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let instance = format!("{}-{:04x}", std::process::id(), rand::random::<u16>());
        Ok(Arc::new(Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            instance,
            cap,
            next_lease: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            status: Mutex::new(Status {
                reachable: true,
                rewrite: false,
                settling: false,
                seen: false,
                instances: 0,
            }),
            drain_pending: Mutex::new(HashMap::new()),
            drained_by_others: Mutex::default(),
            drained_here: Mutex::default(),
            registry: OnceLock::new(),
            registry_writes: AtomicU64::new(0),
            deregister_pending: Mutex::default(),
            take: Script::new(&format!("{NOW}{TAKE}")),
            give_back: Script::new(&format!("{NOW}{GIVE_BACK}")),
            transfer: Script::new(&format!("{NOW}{TRANSFER}")),
            refresh: Script::new(&format!("{NOW}{REFRESH}")),
            registered: Script::new(&format!("{NOW}{REGISTERED}")),
            stamp: Script::new(&format!("{NOW}{STAMP}")),
            stamp_wanted: tokio::sync::Notify::new(),
        }))
    }

    /// This instance's name in the shared state.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Reachability and instance count, for `/__proxy/health`.
    pub fn view(&self) -> SharedView {
        let s = self.status();
        SharedView {
            instance: self.instance.clone(),
            reachable: s.reachable,
            instances: s.instances,
        }
    }

    /// Runs the lease renewal (which also shares the registrations of
    /// `registry`) and the release listener until `stop`.
    pub fn start(self: &Arc<Self>, fleet: Fleet, registry: Arc<Registry>, stop: CancellationToken) {
        let _ = self.registry.set(registry);
        let me = Arc::clone(self);
        let (f, s) = (fleet.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                me.renew(&f).await;
                tokio::select! {
                    () = tokio::time::sleep(RENEW_EVERY) => {}
                    () = s.cancelled() => return,
                }
            }
        });
        let me = Arc::clone(self);
        let (f, s) = (fleet.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = me.stamp_wanted.notified() => me.stamp(&f).await,
                    () = s.cancelled() => return,
                }
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                me.listen(&fleet, &stop).await;
                tokio::select! {
                    () = tokio::time::sleep(RENEW_EVERY) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    /// Says that a request has started waiting on this instance; its
    /// oldest waiter is stamped in `corral:waiting` soon after, without
    /// waiting for the next take or renewal.
    pub(super) fn waiting_started(&self) {
        self.stamp_wanted.notify_one();
    }

    /// Writes this instance's oldest waiter to `corral:waiting`. Skipped
    /// when Redis is out of reach: the next renewal writes it anyway.
    async fn stamp(&self, fleet: &Fleet) {
        if !self.status().reachable {
            return;
        }
        let mut inv = self.stamp.key(format!("{PREFIX}waiting"));
        inv.arg(&self.instance).arg(oldest_age(fleet));
        if let Err(e) = self.call::<i64>(inv).await {
            self.mark_down(fleet, &e);
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CALL_TIMEOUT)
            .set_response_timeout(CALL_TIMEOUT)
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })??;
        *conn = Some(c.clone());
        Ok(c)
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        let mut conn = self.connection().await?;
        tokio::time::timeout(CALL_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })?
    }

    /// Confirms a slot the local scheduler granted on `id` to a request that
    /// arrived at `since`: the lease when
    /// the backend has room fleet-wide, `None` when it has not (the fleet's
    /// view of the other instances' slots is updated, so the caller gives
    /// the slot back and waits).
    pub(super) async fn take(
        &self,
        fleet: &Fleet,
        id: &BackendId,
        since: tokio::time::Instant,
    ) -> Option<RemoteLease> {
        let backend = id.to_string();
        let member = format!(
            "{}/{}",
            self.instance,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let lease = RemoteLease {
            member: member.clone(),
            backend: backend.clone(),
        };
        let normal = {
            let s = self.status();
            s.reachable && !s.rewrite && !s.settling
        };
        if normal {
            let key = format!("{PREFIX}slots:{backend}");
            let mut inv = self.take.key(&key);
            inv.key(format!("{PREFIX}instances"))
                .key(format!("{PREFIX}waiting"))
                .arg(self.cap)
                .arg(LEASE_TTL.as_millis() as u64)
                .arg(&member)
                .arg(&self.instance)
                .arg(oldest_age(fleet))
                .arg(age_ms(since));
            match self.call::<(String, String)>(inv).await {
                Ok((lost, _)) if lost == "lost" => {
                    tracing::warn!(
                        "shared state lost this instance (Redis restarted empty?): writing its leases again"
                    );
                    self.status().rewrite = true;
                }
                Ok((taken, members)) => {
                    if taken == "1" {
                        self.held().insert(member, backend);
                    }
                    self.apply(fleet, id, &members, 0);
                    return (taken == "1").then_some(lease);
                }
                Err(e) => self.mark_down(fleet, &e),
            }
        }
        // Degraded: only within the local cap, checked against a grant made
        // before the mode changed too.
        let instances = self.status().instances;
        let me = self.instance.clone();
        let cap = self.cap;
        let fits = fleet.update(|s| {
            let holders = s.backends().get(id).map(|b| b.holders.clone())?;
            let foreign = degraded_foreign(cap, instances, &me, &holders);
            s.set_foreign(id, foreign, holders);
            Some(s.within_cap(id))
        });
        if fits == Some(true) {
            self.held().insert(member, backend);
            Some(lease)
        } else {
            None
        }
    }

    /// Keeps `lease`, which a finished request on `id` handed to the next
    /// local waiter (which arrived at `since`), in one round trip: `None`
    /// when an older waiter of another instance should have the slot (it is
    /// given back and counted as taken by that instance meanwhile), or when
    /// Redis cannot say (the caller then takes a slot the usual way).
    pub(super) async fn transfer(
        self: &Arc<Self>,
        fleet: &Fleet,
        id: &BackendId,
        lease: RemoteLease,
        since: tokio::time::Instant,
    ) -> Option<RemoteLease> {
        let normal = {
            let s = self.status();
            s.reachable && !s.rewrite && !s.settling
        };
        // Given back unless kept below, whatever happens to this future.
        let mut pending = Handover {
            state: self,
            lease: Some(lease),
        };
        if !normal {
            return None;
        }
        let member = pending.lease.as_ref().map(|l| l.member.clone())?;
        let key = format!("{PREFIX}slots:{id}");
        let mut inv = self.transfer.key(&key);
        inv.key(format!("{PREFIX}instances"))
            .key(format!("{PREFIX}waiting"))
            .arg(&member)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(&self.instance)
            .arg(age_ms(since))
            .arg(oldest_age(fleet))
            .arg(CHANNEL)
            .arg(id.to_string())
            .arg(YIELD_MARGIN.as_millis() as u64);
        match self.call::<(String, String)>(inv).await {
            Ok((outcome, members)) if outcome == "1" => {
                self.apply(fleet, id, &members, 0);
                pending.lease.take()
            }
            Ok((outcome, members)) if outcome == "0" || outcome == "gone" => {
                // Already out of Redis: nothing to give back.
                self.held().remove(&member);
                pending.lease = None;
                let phantom = u32::from(outcome == "0");
                self.apply(fleet, id, &members, phantom);
                None
            }
            Ok(_) => {
                self.status().rewrite = true;
                None
            }
            Err(e) => {
                self.mark_down(fleet, &e);
                None
            }
        }
    }

    /// Gives a lease back (in the background; a failure leaves it to expire).
    pub(super) fn give_back(self: &Arc<Self>, lease: RemoteLease) {
        self.held().remove(&lease.member);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = Arc::clone(self);
        runtime.spawn(async move {
            if !me.status().reachable {
                return;
            }
            let key = format!("{PREFIX}slots:{}", lease.backend);
            let mut inv = me.give_back.key(&key);
            inv.arg(&lease.member).arg(CHANNEL).arg(&lease.backend);
            if let Err(e) = me.call::<String>(inv).await {
                tracing::debug!(error = %e, "shared state: give-back failed; the lease expires");
            }
        });
    }

    /// Renews this instance's leases and reads every backend's holders.
    async fn renew(&self, fleet: &Fleet) {
        let ids: Vec<BackendId> = fleet.read(|s| s.backends().keys().cloned().collect());
        let held: Vec<(String, String)> = self
            .held()
            .iter()
            .map(|(m, b)| (b.clone(), m.clone()))
            .collect();
        let rewrite = {
            let s = self.status();
            !s.reachable || s.rewrite
        };
        let mut inv = self.refresh.prepare_invoke();
        inv.arg(PREFIX)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(u8::from(rewrite))
            .arg(&self.instance)
            .arg(oldest_age(fleet))
            .arg(u8::from(self.status().seen))
            .arg(ids.len());
        for id in &ids {
            inv.arg(id.to_string());
        }
        let drains: Vec<String> = lock(&self.drained_here)
            .union(&lock(&self.drained_by_others))
            .cloned()
            .collect();
        inv.arg(drains.len());
        for d in &drains {
            inv.arg(d);
        }
        for (b, m) in &held {
            inv.arg(b).arg(m);
        }
        match self.call::<Vec<String>>(inv).await {
            Ok(out) => {
                {
                    let mut s = self.status();
                    if !s.reachable {
                        tracing::info!("shared state reachable again");
                    }
                    s.reachable = true;
                    s.rewrite = false;
                    s.seen = true;
                    s.instances = out.first().and_then(|n| n.parse().ok()).unwrap_or(1);
                }
                let rewritten = out.get(1).is_some_and(|r| r == "1");
                let settling = out.get(2).is_some_and(|r| r == "1");
                let was = std::mem::replace(&mut self.status().settling, settling);
                if settling && !was {
                    tracing::warn!(
                        "shared state: Redis came back empty; every instance writes its leases again, meanwhile serving within floor(cap / instances)"
                    );
                } else if was && !settling {
                    tracing::info!("shared state: leases written again; back to shared slots");
                }
                if settling {
                    // Some instances have not written their leases again:
                    // what Redis lists is short; keep the view from before.
                    self.hold_to_local_cap(fleet);
                } else {
                    for (id, members) in ids.iter().zip(out.iter().skip(3)) {
                        self.apply(fleet, id, members, 0);
                    }
                }
                if let Some(drained) = out.get(ids.len() + 3) {
                    self.apply_drained(fleet, drained);
                }
                self.sync_registered(fleet, rewrite || rewritten).await;
            }
            Err(e) => self.mark_down(fleet, &e),
        }
    }

    /// Shares a registration (or renewal) made on this instance.
    pub(super) async fn share_registration(&self, target: &Target, lease: Option<Duration>) {
        self.registry_writes.fetch_add(1, Ordering::SeqCst);
        if self.status().reachable {
            let mut inv = self.registered.key(format!("{PREFIX}registered"));
            inv.arg("set").arg(1);
            registration_args(&mut inv, target, lease);
            if let Err(e) = self.call::<Vec<String>>(inv).await {
                tracing::warn!(backend = %target.id, "shared state: registration not shared yet");
                self.mark_down_quietly(&e);
            }
        }
        self.registry_writes.fetch_add(1, Ordering::SeqCst);
    }

    /// Shares a deregistration made on this instance (written at the next
    /// renewal when Redis is unreachable now).
    pub(super) async fn share_deregistration(&self, id: &BackendId) {
        self.registry_writes.fetch_add(1, Ordering::SeqCst);
        let name = id.to_string();
        lock(&self.deregister_pending).insert(name.clone());
        if self.status().reachable {
            let mut inv = self.registered.key(format!("{PREFIX}registered"));
            inv.arg("set").arg(0).arg(&name);
            match self.call::<Vec<String>>(inv).await {
                Ok(_) => {
                    lock(&self.deregister_pending).remove(&name);
                }
                Err(e) => {
                    tracing::warn!(backend = %id, "shared state: deregistration not shared yet");
                    self.mark_down_quietly(&e);
                }
            }
        }
        self.registry_writes.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes what is pending (deregistrations; every live registration
    /// when `rewrite`: Redis was gone or emptied) and applies the shared
    /// registrations: new ones are enrolled, renewals move the local lease,
    /// and a registration Redis no longer has retires here too.
    async fn sync_registered(&self, fleet: &Fleet, rewrite: bool) {
        let Some(registry) = self.registry.get() else {
            return;
        };
        let before = self.registry_writes.load(Ordering::SeqCst);
        let writes = if rewrite {
            registry.live_leases(tokio::time::Instant::now())
        } else {
            Vec::new()
        };
        let deletes: Vec<String> = lock(&self.deregister_pending).iter().cloned().collect();
        let mut inv = self.registered.key(format!("{PREFIX}registered"));
        inv.arg("keep").arg(writes.len());
        for (target, left) in &writes {
            registration_args(&mut inv, target, *left);
        }
        for d in &deletes {
            inv.arg(d);
        }
        let out = match self.call::<Vec<String>>(inv).await {
            Ok(out) => out,
            Err(e) => return self.mark_down(fleet, &e),
        };
        {
            let mut pending = lock(&self.deregister_pending);
            for d in &deletes {
                pending.remove(d);
            }
        }
        if self.registry_writes.load(Ordering::SeqCst) != before {
            // Changed here meanwhile: the next renewal reads it back.
            return;
        }
        let mut shared = HashSet::new();
        for entry in out.chunks_exact(3) {
            let (id, url, left) = (&entry[0], &entry[1], &entry[2]);
            let Ok(base) = crate::config::parse_backend_url(url) else {
                tracing::warn!(backend = %id, url, "shared state: unreadable registration ignored");
                continue;
            };
            let lease = left.parse::<u64>().ok().map(Duration::from_millis);
            let (target, _) = fleet.enrol(registry, &base, lease);
            shared.insert(target.id.clone());
        }
        for target in registry.live() {
            if !shared.contains(&target.id) {
                tracing::info!(backend = %target.id, "registration withdrawn on another instance (or ran out)");
                fleet.retire(registry, &target.id);
            }
        }
    }

    /// Listens for released slots until the subscription breaks.
    async fn listen(&self, fleet: &Fleet, stop: &CancellationToken) {
        let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(CALL_TIMEOUT * 2, self.client.get_async_pubsub()).await
        else {
            return;
        };
        if pubsub.subscribe(CHANNEL).await.is_err() {
            return;
        }
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                () = stop.cancelled() => return,
            };
            let Some(msg) = msg else { return };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let (backend, rest) = payload.split_once('\n').unwrap_or((&payload, ""));
            let (members, yielder) = rest.split_once('\n').unwrap_or((rest, ""));
            if yielder == self.instance {
                // This instance yielded the slot to an older waiter
                // elsewhere: it stays counted as taken here (the phantom
                // of the hand-over) until that instance takes it or the
                // next renewal says it is still free.
                continue;
            }
            let id = fleet.read(|s| {
                s.backends()
                    .keys()
                    .find(|id| id.to_string() == backend)
                    .cloned()
            });
            if let Some(id) = id {
                let s = self.status();
                if s.reachable && !s.settling {
                    drop(s);
                    self.apply(fleet, &id, members, 0);
                }
            }
        }
    }

    /// Shares a drain (true) or undrain (false) made on this instance.
    pub(super) fn share_drain(self: &Arc<Self>, id: &BackendId, draining: bool) {
        let backend = id.to_string();
        lock(&self.drain_pending).insert(backend.clone(), draining);
        lock(&self.drained_by_others).remove(&backend);
        if draining {
            lock(&self.drained_here).insert(backend.clone());
        } else {
            lock(&self.drained_here).remove(&backend);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = Arc::clone(self);
        runtime.spawn(async move {
            let key = format!("{PREFIX}drained");
            let mut cmd = redis::cmd(if draining { "SADD" } else { "SREM" });
            cmd.arg(&key).arg(&backend);
            let result = match me.connection().await {
                Ok(mut conn) => {
                    tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<i64>(&mut conn)).await
                }
                Err(e) => Ok(Err(e)),
            };
            if !matches!(result, Ok(Ok(_))) {
                tracing::warn!(
                    backend,
                    draining,
                    "shared state: drain not shared (Redis unreachable)"
                );
            }
            lock(&me.drain_pending).remove(&backend);
        });
    }

    /// Applies the drained set from Redis: drains what others drained, and
    /// undrains what it drained for them once they undrain it.
    fn apply_drained(&self, fleet: &Fleet, drained: &str) {
        let drained: std::collections::HashSet<&str> =
            drained.split('\n').filter(|b| !b.is_empty()).collect();
        let pending = lock(&self.drain_pending).clone();
        let mut here = lock(&self.drained_here);
        let mut ours = lock(&self.drained_by_others);
        let changes: Vec<(BackendId, bool)> = fleet.read(|s| {
            s.backends()
                .iter()
                .filter_map(|(id, b)| {
                    let name = id.to_string();
                    if pending.contains_key(&name) {
                        return None;
                    }
                    let wanted = drained.contains(name.as_str());
                    if wanted && !b.draining {
                        Some((id.clone(), true))
                    } else if !wanted
                        && b.draining
                        && (ours.contains(&name) || here.contains(&name))
                    {
                        Some((id.clone(), false))
                    } else {
                        None
                    }
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
        for (id, draining) in changes {
            tracing::info!(backend = %id, draining, "drain state changed on another instance");
            if draining {
                ours.insert(id.to_string());
            } else {
                // Undrained on another instance, whoever drained it.
                ours.remove(&id.to_string());
                here.remove(&id.to_string());
            }
        }
    }

    /// Records a backend's holders as Redis listed them, plus `yielded`
    /// slots this instance just left to another one, counted as taken until
    /// Redis next lists the holders.
    fn apply(&self, fleet: &Fleet, id: &BackendId, members: &str, yielded: u32) {
        let (foreign, holders) = {
            let held = self.held();
            let mut holders = BTreeMap::new();
            let mut foreign = 0u32;
            for m in members.split(',').filter(|m| !m.is_empty()) {
                let instance = m.rsplit_once('/').map_or(m, |(i, _)| i);
                *holders.entry(instance.to_string()).or_insert(0) += 1;
                if !held.contains_key(m) {
                    foreign += 1;
                }
            }
            (foreign + yielded, holders)
        };
        fleet.update(|s| s.set_foreign(id, foreign, holders));
    }

    /// A write failed: the next renewal writes everything again (and holds
    /// every backend to the local cap if Redis is still gone).
    fn mark_down_quietly(&self, error: &redis::RedisError) {
        tracing::debug!(error = %error, "shared state: write failed");
        self.status().rewrite = true;
    }

    /// Redis failed: log once, and hold every backend to the local cap.
    fn mark_down(&self, fleet: &Fleet, error: &redis::RedisError) {
        {
            let mut s = self.status();
            if s.reachable {
                tracing::warn!(
                    error = %error,
                    instances = s.instances,
                    "shared state unreachable; serving within floor(cap / instances) per backend"
                );
            }
            s.reachable = false;
            s.rewrite = true;
        }
        self.hold_to_local_cap(fleet);
    }

    /// Counts on every backend the slots others may hold while Redis cannot
    /// say: see [`degraded_foreign`].
    fn hold_to_local_cap(&self, fleet: &Fleet) {
        let instances = self.status().instances;
        let me = self.instance.clone();
        let cap = self.cap;
        fleet.update(|s| {
            let ids: Vec<BackendId> = s.backends().keys().cloned().collect();
            for id in ids {
                let holders = s.backends()[&id].holders.clone();
                let foreign = degraded_foreign(cap, instances, &me, &holders);
                s.set_foreign(&id, foreign, holders);
            }
        });
    }
}

/// A handed-over lease not kept yet: given back if dropped.
struct Handover<'a> {
    state: &'a Arc<SharedState>,
    lease: Option<RemoteLease>,
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.state.give_back(lease);
        }
    }
}

/// Milliseconds since `since`.
fn age_ms(since: tokio::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The age of this instance's oldest waiter in ms, -1 when none waits.
fn oldest_age(fleet: &Fleet) -> i64 {
    fleet
        .read(|s| s.oldest_waiting())
        .map_or(-1, |since| i64::try_from(age_ms(since)).unwrap_or(i64::MAX))
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The slots of a backend this instance must count as taken by others
/// while Redis is gone: its local cap is `floor(cap / instances)` (0 when it
/// never saw any), and less when other instances held more than their share
/// when last seen, so that the instances together never exceed `cap`
/// whatever each of them does meanwhile.
pub fn degraded_foreign(
    cap: u32,
    instances: usize,
    me: &str,
    holders: &BTreeMap<String, u32>,
) -> u32 {
    if cap == 0 {
        return 0;
    }
    let share = if instances == 0 {
        0
    } else {
        cap / u32::try_from(instances).unwrap_or(u32::MAX)
    };
    let others: Vec<u32> = holders
        .iter()
        .filter(|(i, _)| i.as_str() != me)
        .map(|(_, n)| *n)
        .collect();
    let silent = instances.saturating_sub(1).saturating_sub(others.len());
    let reserved: u32 = others.iter().map(|n| (*n).max(share)).sum::<u32>()
        + share * u32::try_from(silent).unwrap_or(u32::MAX);
    let local = share.min(cap.saturating_sub(reserved));
    cap - local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(i, n)| (i.to_string(), *n)).collect()
    }

    #[test]
    fn local_cap_is_the_floor_of_the_share() {
        assert_eq!(degraded_foreign(4, 3, "a", &holders(&[])), 3);
        assert_eq!(degraded_foreign(6, 3, "a", &holders(&[])), 4);
        assert_eq!(degraded_foreign(1, 3, "a", &holders(&[])), 1);
        assert_eq!(degraded_foreign(2, 1, "a", &holders(&[])), 0);
    }

    #[test]
    fn never_seen_means_wait() {
        assert_eq!(degraded_foreign(4, 0, "a", &holders(&[])), 4);
    }

    #[test]
    fn others_over_their_share_shrink_ours() {
        // cap 3, 3 instances, b held 2 when last seen: b keeps its 2 and the
        // one left is c's (or a's) share: a and c may each use none.
        assert_eq!(degraded_foreign(3, 3, "a", &holders(&[("b", 2)])), 3);
        assert_eq!(degraded_foreign(3, 3, "c", &holders(&[("b", 2)])), 3);
        assert_eq!(
            // b keeps its 3, c its share of 2: a may use 1.
            degraded_foreign(6, 3, "a", &holders(&[("b", 3), ("a", 1)])),
            5
        );
    }

    #[test]
    fn the_local_caps_never_sum_above_cap() {
        for cap in 1..8u32 {
            for n in 1..5usize {
                for b_held in 0..=cap {
                    let h = holders(&[("i1", b_held)]);
                    let total: u32 = (0..n)
                        .map(|k| {
                            let me = format!("i{k}");
                            let held = if k == 1 { b_held } else { 0 };
                            held.max(cap - degraded_foreign(cap, n, &me, &h))
                        })
                        .sum();
                    assert!(total <= cap, "cap {cap} n {n} held {b_held}: {total}");
                }
            }
        }
    }
}
