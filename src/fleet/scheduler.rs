//! The routing core, sans-io: which backend a request gets, who waits, and
//! who gets a freed slot. No sockets, no timers: time comes in as `Instant`
//! arguments and the waiter payload `W` is opaque (the fleet uses a oneshot
//! sender), so this is tested with plain values and a paused clock.
//!
//! Fairness: every request has a tenant and a priority. A freed slot goes to
//! an interactive waiter before a batch one (but while batch waits it keeps
//! [`Policy::batch_floor_percent`] of the grants), and among waiters of one
//! priority to the tenant with the least weighted slot-time used, first come
//! first served within a tenant (`waiters`).
//! A retry keeps its arrival number, so it re-enters at its old place.
//!
//! Cost: backends with a free slot are indexed by model in preference order
//! (`free`), waiters by model, tenant and arrival (`waiters`), so an
//! arrival, a release and a dispatch touch what changed, not every waiter or
//! every backend. What a request brings and gets back is in `request`.
//!
//! Invariants, checked by the seeded test after every step: no backend holds
//! more than the cap; after every call no waiter could be granted a free slot
//! it is eligible for.

mod free;
mod placing;
mod request;
mod waiters;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::backend::{Backend, BackendId, ProbeReport, Target};
use super::placement::Placement;
use crate::model::ModelName;
use crate::policy::{Priority, Routing};

use free::FreeIndex;
pub use request::{Decision, Grant, Outcome, Rejection, TenantId, Ticket, Want};
pub use waiters::Tenant;
use waiters::{Waiter, Waiters};

/// The limits the scheduler enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight per backend; 0 = no cap.
    pub cap: u32,
    /// Waiting requests at most.
    pub max_queue: usize,
    /// Bytes of waiting request bodies at most.
    pub max_queue_bytes: usize,
}

/// How the queue is shared between tenants.
#[derive(Debug, Clone)]
pub struct Policy {
    /// TENANT_WEIGHTS; tenants not named weigh 1.
    pub weights: HashMap<Arc<str>, f64>,
    /// MAX_QUEUE_PER_TENANT; 0 = no limit but MAX_QUEUE.
    pub max_queue_per_tenant: usize,
    /// BATCH_FLOOR_PERCENT: the share of grants batch keeps while it waits.
    pub batch_floor_percent: u32,
    /// How long a slot abandoned mid-request stays taken: the backend
    /// learns that its connection closed only when its own event loop gets
    /// to it, and a request sent at once would find the old one running.
    pub settle: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            weights: HashMap::new(),
            max_queue_per_tenant: 0,
            batch_floor_percent: 10,
            settle: Duration::from_millis(50),
        }
    }
}

/// A tenant as `/__proxy/backends` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TenantView {
    pub name: String,
    pub weight: f64,
    /// Requests waiting.
    pub waiting: usize,
    /// Requests holding a slot.
    pub in_flight: u32,
    /// Its share of the slots held now (0..1).
    pub share: f64,
    /// How long its oldest waiter has waited, in ms.
    pub oldest_wait_ms: u64,
    /// Slot-seconds its finished requests held since it became active.
    pub slot_seconds: f64,
}

/// How a model's slots turn over, for estimates.
struct ModelStats {
    /// Typical time a request holds a slot, in ns (moving average).
    service_ns: f64,
    /// Slots given back per second (moving average over 1 s windows).
    rate: f64,
    window_start: Instant,
    window_count: u32,
}

/// What a new tenant's first request is charged before its real time is known.
const DEFAULT_SERVICE: Duration = Duration::from_secs(1);

/// Backends, their slots, the tenants and their waiting requests.
pub struct Scheduler<W> {
    backends: BTreeMap<BackendId, Backend>,
    /// Free backends (healthy, not draining, under the cap) by model.
    free: FreeIndex,
    /// Backends handed out through `backend_mut`: re-indexed by the next call.
    touched: Vec<BackendId>,
    waiters: Waiters<W>,
    /// Waiters that can be turned away by a change of the fleet: retries
    /// (no untried backend left), pinned waiters (their backend gone) and
    /// waiters for a model never listed.
    fragile: BTreeSet<u64>,
    next_arrival: u64,
    /// Interactive grants since the last batch one.
    interactive_streak: u32,
    /// Abandoned slots and when they come back.
    settling: BTreeMap<(Instant, u64), Grant>,
    /// Waiters that placement holds back for a busy backend, and when the
    /// free backends are offered to them again.
    held: BTreeSet<(Instant, u64)>,
    /// What each backend holds (prefixes, sessions, models): ROUTING.
    placement: Placement,
    next_settle_seq: u64,
    stats: HashMap<Option<ModelName>, ModelStats>,
    limits: Limits,
    policy: Policy,
    /// Every model some backend has listed since start: the 404 test.
    known: HashSet<ModelName>,
    /// Shutting down: no new slots, every waiter turned away.
    closed: bool,
}

impl<W> Scheduler<W> {
    /// An empty fleet with the default [`Policy`].
    pub fn new(limits: Limits) -> Self {
        Self::with_policy(limits, Policy::default())
    }

    pub fn with_policy(limits: Limits, policy: Policy) -> Self {
        Self {
            backends: BTreeMap::new(),
            free: FreeIndex::default(),
            touched: Vec::new(),
            waiters: Waiters::default(),
            fragile: BTreeSet::new(),
            next_arrival: 0,
            interactive_streak: 0,
            settling: BTreeMap::new(),
            held: BTreeSet::new(),
            placement: Placement::new(Routing::LeastBusy),
            next_settle_seq: 0,
            stats: HashMap::new(),
            limits,
            policy,
            known: HashSet::new(),
            closed: false,
        }
    }

    /// Stops granting slots: waiters and new requests are turned away with
    /// [`Rejection::ShuttingDown`] (by the next [`Scheduler::dispatch`]).
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// The backends, ordered by id.
    pub fn backends(&self) -> &BTreeMap<BackendId, Backend> {
        &self.backends
    }

    /// One backend, to change its flags or counters; the change is seen by
    /// the next call of any other `&mut` method.
    pub fn backend_mut(&mut self, id: &BackendId) -> Option<&mut Backend> {
        let backend = self.backends.get_mut(id)?;
        self.touched.push(id.clone());
        Some(backend)
    }

    /// Counts a request a backend answered (a counter only: no re-index).
    pub fn count_served(&mut self, target: &Arc<Target>) {
        if let Some(b) = self.backends.get_mut(&target.id)
            && Arc::ptr_eq(&b.target, target)
        {
            b.served += 1;
        }
    }

    /// Adds a backend (unhealthy until probed) unless one with that id exists.
    pub fn add_backend(&mut self, target: Arc<Target>) -> &mut Backend {
        let id = target.id.clone();
        // One already there is not re-indexed: nothing about it changed.
        if !self.backends.contains_key(&id) {
            self.touched.push(id.clone());
        }
        self.backends
            .entry(id)
            .or_insert_with(|| Backend::new(target))
    }

    /// Forgets a backend (gone for long). Slots still held on it are released
    /// into nothing.
    pub fn remove_backend(&mut self, id: &BackendId) {
        if let Some(gone) = self.backends.remove(id) {
            gone.target.conns.close_idle();
        }
        self.placement.forget(id);
        self.reindex(id);
    }

    /// Records a successful probe; true when the server looks replaced.
    /// A healthy backend that lists the same models as before is not
    /// re-indexed: a scan of a steady fleet touches no index.
    pub fn apply_probe(&mut self, id: &BackendId, report: ProbeReport) -> bool {
        let Some(backend) = self.backends.get_mut(id) else {
            return false;
        };
        let was_healthy = backend.healthy;
        // The parsed lists as they are now (a model struck off since the
        // last probe included), to compare with what the probe says.
        let models = std::mem::take(&mut backend.models);
        let loaded = std::mem::take(&mut backend.loaded);
        let ps = report.ps.clone();
        let replaced = backend.apply_probe(report);
        let changed =
            replaced || !was_healthy || backend.models != models || backend.loaded != loaded;
        if replaced {
            // Kept connections may lead to the server that left.
            backend.target.conns.close_idle();
        }
        if changed {
            self.known.extend(backend.models.iter().cloned());
            self.reindex(id);
        }
        if replaced {
            self.placement.forget(id);
        }
        self.placement.probed(id, &ps);
        replaced
    }

    /// Marks a backend unhealthy; true when it was healthy.
    pub fn mark_unhealthy(&mut self, id: &BackendId, error: String) -> bool {
        let Some(backend) = self.backends.get_mut(id) else {
            return false;
        };
        let was = backend.healthy;
        backend.healthy = false;
        backend.last_error = Some(error);
        if was {
            self.reindex(id);
        }
        was
    }

    /// Requests waiting now.
    pub fn queue_len(&self) -> usize {
        self.waiters.by_arrival.len()
    }

    /// When the oldest request waiting now arrived.
    pub fn oldest_waiting(&self) -> Option<Instant> {
        self.waiters.oldest()
    }

    /// Bytes of request bodies waiting now.
    pub fn queued_bytes(&self) -> usize {
        self.waiters.bytes
    }

    /// Healthy backends now (drained ones included).
    pub fn healthy_count(&self) -> usize {
        self.backends.values().filter(|b| b.healthy).count()
    }

    /// Whether some backend has listed `model` since start.
    pub fn is_known(&self, model: &ModelName) -> bool {
        self.known.contains(model)
    }

    /// Takes a slot for the request if one is free, or says why it must wait
    /// or go. Does not queue it: see [`Scheduler::enqueue`]. A free slot here
    /// means no waiter can use it (the invariant), so nobody is overtaken.
    pub fn try_acquire(&mut self, want: &Want, ticket: &Ticket, now: Instant) -> Decision {
        self.reindex_touched();
        if let Some(rejection) = self.rejection(want) {
            return Decision::Rejected(rejection);
        }
        let least_busy = self.least_busy(want);
        let Some(id) = self.place(want, least_busy.as_ref()) else {
            if least_busy.is_some() {
                return Decision::Hold(now + self.usual_service(want.model.as_ref()));
            }
            return Decision::Wait;
        };
        let tenant = self.tenant_id(&ticket.tenant);
        self.placement
            .routed(&id, want.signature.as_deref(), want.model.as_ref());
        Decision::Granted(self.take_slot(&id, tenant, want.model.clone(), now, false))
    }

    /// Queues a request that must wait; returns its arrival number, to leave
    /// with [`Scheduler::dequeue`]. A ticket that has one (a retry) keeps it
    /// and so its place.
    pub fn enqueue(
        &mut self,
        want: Want,
        bytes: usize,
        ticket: &Ticket,
        payload: W,
    ) -> Result<u64, Rejection> {
        if self.queue_len() >= self.limits.max_queue {
            return Err(Rejection::QueueFull);
        }
        if self.waiters.bytes.saturating_add(bytes) > self.limits.max_queue_bytes {
            return Err(Rejection::QueueBytesFull);
        }
        let tenant = self.tenant_id(&ticket.tenant);
        let cap = self.policy.max_queue_per_tenant;
        if cap > 0 && self.waiters.waiting_of(tenant) >= cap {
            self.waiters.forget_if_idle(tenant);
            return Err(Rejection::TenantQueueFull);
        }
        let arrival = match ticket.arrival {
            Some(a) if !self.waiters.by_arrival.contains_key(&a) => a,
            _ => {
                let a = self.next_arrival;
                self.next_arrival += 1;
                a
            }
        };
        let fragile = !want.tried.is_empty()
            || want.pin.is_some()
            || want.model.as_ref().is_some_and(|m| !self.known.contains(m));
        if fragile {
            self.fragile.insert(arrival);
        }
        self.waiters.insert(
            arrival,
            Waiter {
                want,
                tenant,
                priority: ticket.priority,
                bytes,
                since: ticket.since,
                payload,
            },
        );
        Ok(arrival)
    }

    /// Takes a waiter out of the queue (timeout, client gone). `None` when it
    /// already left with an outcome.
    pub fn dequeue(&mut self, arrival: u64) -> Option<W> {
        let waiter = self.waiters.remove(arrival)?;
        self.fragile.remove(&arrival);
        self.waiters.forget_if_idle(waiter.tenant);
        Some(waiter.payload)
    }

    /// Gives back a slot whose request is done and hands it (and any other
    /// free slot of that backend) to the waiters next in line.
    pub fn release(&mut self, grant: Grant, now: Instant) -> Vec<(W, Outcome)> {
        self.reindex_touched();
        let id = grant.target.id.clone();
        self.give_back(grant, now);
        let mut out = Vec::new();
        self.hand_out(&id, now, &mut out);
        out
    }

    /// A slot cut off mid-request: it stays taken until `now` plus the
    /// settle time, then comes back through [`Scheduler::expire`] called
    /// at or after the instant returned.
    pub fn abandon(&mut self, grant: Grant, now: Instant) -> Instant {
        let seq = self.next_settle_seq;
        self.next_settle_seq += 1;
        let due = now + self.policy.settle;
        self.settling.insert((due, seq), grant);
        due
    }

    /// When the next abandoned slot comes back or the next held waiter is
    /// offered the free backends again.
    pub fn next_settle(&self) -> Option<Instant> {
        let settle = self.settling.keys().next().map(|(at, _)| *at);
        let held = self.held.first().map(|(at, _)| *at);
        settle.into_iter().chain(held).min()
    }

    /// Gives back the abandoned slots whose settle time has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<(W, Outcome)> {
        self.reindex_touched();
        let mut out = Vec::new();
        while let Some(entry) = self.settling.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let grant = entry.remove();
            let id = grant.target.id.clone();
            self.give_back(grant, now);
            self.hand_out(&id, now, &mut out);
        }
        self.release_held(now, &mut out);
        out
    }

    /// Settles what the fleet changed (a scan, a backend marked unhealthy,
    /// an undrain): turns away the waiters that can no longer be served and
    /// hands the new free slots out. Costs what changed, not the queue.
    pub fn dispatch(&mut self, now: Instant) -> Vec<(W, Outcome)> {
        self.reindex_touched();
        let mut out = Vec::new();
        if self.closed {
            let all: Vec<u64> = self.waiters.by_arrival.keys().copied().collect();
            for arrival in all {
                if let Some(payload) = self.dequeue(arrival) {
                    out.push((payload, Outcome::Rejected(Rejection::ShuttingDown)));
                }
            }
            return out;
        }
        let fragile: Vec<u64> = self.fragile.iter().copied().collect();
        for arrival in fragile {
            let Some(w) = self.waiters.by_arrival.get(&arrival) else {
                continue;
            };
            if let Some(rejection) = self.rejection(&w.want) {
                let payload = self.dequeue(arrival).expect("waiter was just found");
                out.push((payload, Outcome::Rejected(rejection)));
            }
        }
        while let Some(id) = self.free.dirty.pop_first() {
            self.hand_out(&id, now, &mut out);
        }
        out
    }

    /// How long a request for `model` usually holds a slot.
    fn usual_service(&self, model: Option<&ModelName>) -> Duration {
        self.stats
            .get(&model.cloned())
            .map_or(DEFAULT_SERVICE, |s| {
                Duration::from_nanos(s.service_ns as u64)
            })
    }

    /// An honest `Retry-After` for a request of `tenant` for `model` that
    /// was turned away now: its tenant's waiters for the model, times the
    /// tenants sharing it, over the rate at which the model's slots came
    /// free lately (or its slots over its usual service time).
    pub fn retry_after(&self, model: Option<&ModelName>, tenant: &str) -> Duration {
        let tenant_id = self.waiters.tenant_named(tenant);
        let (mine, sharing) = tenant_id.map_or((0, 0), |id| self.waiters.standing(id, model));
        let ahead = ((mine + 1) * sharing.max(1)).min(self.waiters.waiting_for(model) + 1);
        let stats = self.stats.get(&model.cloned());
        let rate = match stats {
            Some(s) if s.rate > 0.0 => s.rate,
            _ => {
                let slots = self
                    .backends
                    .values()
                    .filter(|b| b.healthy && !b.draining && b.has_model(model))
                    .count() as f64
                    * f64::from(self.limits.cap.max(1));
                let service = stats.map_or(DEFAULT_SERVICE.as_secs_f64(), |s| s.service_ns / 1e9);
                slots / service.max(1e-3)
            }
        };
        if rate <= 0.0 {
            return Duration::from_secs(60);
        }
        Duration::from_secs_f64((ahead as f64 / rate).clamp(1.0, 3600.0))
    }

    /// The tenants with something waiting or in flight, by name.
    pub fn tenants(&self, now: Instant) -> Vec<TenantView> {
        let held: u32 = self.waiters.tenants.values().map(|t| t.in_flight).sum();
        let mut out: Vec<TenantView> = self
            .waiters
            .tenants
            .iter()
            .map(|(id, t)| TenantView {
                name: t.name.to_string(),
                weight: t.weight,
                waiting: t.waiting,
                in_flight: t.in_flight,
                // No slot held: every in_flight is 0, and so every share.
                share: f64::from(t.in_flight) / f64::from(held.max(1)),
                oldest_wait_ms: self.waiters.oldest_of(*id).map_or(0, |since| {
                    now.saturating_duration_since(since).as_millis() as u64
                }),
                slot_seconds: t.slot_ns as f64 / 1e9,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    // ===== selection =====

    /// The eligible backend with a free slot that the default preference
    /// order puts first (with a cap: model loaded first, then fewest in
    /// flight, then lowest id; without one: fewest in flight first, so one
    /// warm backend does not take all). Placement (`placing`) may choose
    /// another.
    fn least_busy(&self, want: &Want) -> Option<BackendId> {
        self.free
            .candidates(want.model.as_ref())
            .filter_map(|id| self.backends.get(id))
            .find(|b| self.is_eligible(b, want))
            .map(|b| b.target.id.clone())
    }

    fn is_eligible(&self, b: &Backend, want: &Want) -> bool {
        b.healthy && !b.draining && b.has_model(want.model.as_ref()) && want.may_use(&b.target.id)
    }

    /// An unslotted grant: a backend for a request that takes no slot (a
    /// cloud model, which the backend only relays). Any healthy backend it
    /// may use, whether or not it lists the model: one that lists it first
    /// (it is signed in to the cloud), then the fewest in flight, then the
    /// lowest id. `None`: no backend is left.
    pub fn grant_unslotted(&self, want: &Want) -> Option<Arc<Target>> {
        self.backends
            .values()
            .filter(|b| b.healthy && !b.draining && want.may_use(&b.target.id))
            .min_by_key(|b| (!b.has_model(want.model.as_ref()), b.in_flight))
            .map(|b| Arc::clone(&b.target))
    }

    fn slot_free(&self, b: &Backend) -> bool {
        self.limits.cap == 0 || b.in_flight.saturating_add(b.foreign) < self.limits.cap
    }

    /// Whether a backend's slots held here and elsewhere fit its cap.
    pub fn within_cap(&self, id: &BackendId) -> bool {
        self.limits.cap == 0
            || self
                .backends
                .get(id)
                .is_some_and(|b| b.in_flight.saturating_add(b.foreign) <= self.limits.cap)
    }

    /// Records the slots other instances hold on a backend (shared state);
    /// a backend that this frees is handed out at the next dispatch.
    pub fn set_foreign(
        &mut self,
        id: &BackendId,
        foreign: u32,
        holders: std::collections::BTreeMap<String, u32>,
    ) {
        let Some(b) = self.backends.get_mut(id) else {
            return;
        };
        b.holders = holders;
        if b.foreign != foreign {
            b.foreign = foreign;
            self.reindex(id);
        }
    }

    /// Grants the free slots of one backend to the waiters next in line.
    fn hand_out(&mut self, id: &BackendId, now: Instant, out: &mut Vec<(W, Outcome)>) {
        while !self.closed {
            let usable = self
                .backends
                .get(id)
                .filter(|b| b.healthy && !b.draining && self.slot_free(b));
            let Some(arrival) = usable.and_then(|b| self.next_waiter(b)) else {
                break;
            };
            let waiter = self
                .waiters
                .remove(arrival)
                .expect("the index names a queued waiter");
            self.fragile.remove(&arrival);
            if waiter.priority == Priority::Batch {
                self.interactive_streak = 0;
            } else {
                self.interactive_streak = self.interactive_streak.saturating_add(1);
            }
            self.placed_from_queue(id, &waiter.want);
            let grant = self.take_slot(id, waiter.tenant, waiter.want.model, now, true);
            out.push((waiter.payload, Outcome::Granted(grant)));
        }
        // Nobody left who can use what is free there: nothing to revisit
        // until the backend or the queue changes.
        self.free.dirty.remove(id);
    }

    /// The waiter a free slot of `backend` goes to: interactive first unless
    /// batch is owed its floor; within a priority, least virtual time, then
    /// arrival.
    fn next_waiter(&self, backend: &Backend) -> Option<u64> {
        let id = &backend.target.id;
        let best = |p| self.waiters.best(p, backend.models.iter(), id);
        let interactive = best(Priority::Interactive);
        let floor = self.policy.batch_floor_percent.min(100);
        let batch_due = floor > 0 && self.interactive_streak * floor >= 100 - floor;
        if interactive.is_some() && !batch_due {
            return interactive.map(|(_, a)| a);
        }
        best(Priority::Batch).or(interactive).map(|(_, a)| a)
    }

    fn take_slot(
        &mut self,
        id: &BackendId,
        tenant: TenantId,
        model: Option<ModelName>,
        now: Instant,
        from_queue: bool,
    ) -> Grant {
        let backend = self.backends.get_mut(id).expect("picked backend exists");
        backend.in_flight += 1;
        debug_assert!(
            self.limits.cap == 0 || backend.in_flight + backend.foreign <= self.limits.cap
        );
        let target = Arc::clone(&backend.target);
        self.reindex(id);
        let charged = self.usual_service(model.as_ref()).as_nanos() as u64;
        if let Some(t) = self.waiters.tenants.get_mut(&tenant) {
            t.in_flight += 1;
        }
        self.waiters.charge(
            tenant,
            i64::try_from(charged).unwrap_or(i64::MAX),
            from_queue,
        );
        Grant {
            target,
            tenant,
            model,
            granted_at: now,
            charged,
        }
    }

    /// Gives a slot back and settles its tenant's account with the time it
    /// really held it.
    fn give_back(&mut self, grant: Grant, now: Instant) {
        let held = now.saturating_duration_since(grant.granted_at);
        let held_ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        if let Some(t) = self.waiters.tenants.get_mut(&grant.tenant) {
            t.in_flight = t.in_flight.saturating_sub(1);
            t.slot_ns = t.slot_ns.saturating_add(held_ns);
        }
        let correction = i128::from(held_ns) - i128::from(grant.charged);
        self.waiters.correct(
            grant.tenant,
            i64::try_from(correction).unwrap_or(if correction < 0 { i64::MIN } else { i64::MAX }),
        );
        self.waiters.forget_if_idle(grant.tenant);
        self.record_turnover(grant.model, held_ns, now);
        let Some(backend) = self.backends.get_mut(&grant.target.id) else {
            return;
        };
        // A slot of a backend that was since replaced under the same id is not
        // this backend's to give back.
        if !Arc::ptr_eq(&backend.target, &grant.target) {
            return;
        }
        debug_assert!(
            backend.in_flight > 0,
            "slot released twice on {}",
            grant.target.id
        );
        backend.in_flight = backend.in_flight.saturating_sub(1);
        self.reindex(&grant.target.id);
    }

    fn record_turnover(&mut self, model: Option<ModelName>, held_ns: u64, now: Instant) {
        let stats = self.stats.entry(model).or_insert_with(|| ModelStats {
            service_ns: held_ns as f64,
            rate: 0.0,
            window_start: now,
            window_count: 0,
        });
        stats.service_ns = 0.8 * stats.service_ns + 0.2 * held_ns as f64;
        stats.window_count += 1;
        let window = now.saturating_duration_since(stats.window_start);
        if window >= Duration::from_secs(1) {
            let rate = f64::from(stats.window_count) / window.as_secs_f64();
            stats.rate = if stats.rate == 0.0 {
                rate
            } else {
                0.5 * stats.rate + 0.5 * rate
            };
            stats.window_start = now;
            stats.window_count = 0;
        }
    }

    fn tenant_id(&mut self, name: &Arc<str>) -> TenantId {
        let weights = &self.policy.weights;
        self.waiters
            .tenant(name, || weights.get(name).copied().unwrap_or(1.0))
    }

    // ===== the free index =====

    fn reindex_touched(&mut self) {
        while let Some(id) = self.touched.pop() {
            self.reindex(&id);
        }
    }

    /// Puts a backend where its state says in the free index.
    fn reindex(&mut self, id: &BackendId) {
        let backend = self.backends.get(id);
        let free = backend.is_some_and(|b| b.healthy && !b.draining && self.slot_free(b));
        self.free.update(id, backend, free, self.limits.cap == 0);
    }

    fn rejection(&self, want: &Want) -> Option<Rejection> {
        if self.closed {
            return Some(Rejection::ShuttingDown);
        }
        if let Some(model) = &want.model
            && !self.known.contains(model)
            && self.free.healthy > 0
        {
            return Some(Rejection::UnknownModel);
        }
        let bound = !want.tried.is_empty() || want.pin.is_some();
        let nowhere_to_go = bound && !self.backends.values().any(|b| self.is_eligible(b, want));
        nowhere_to_go.then_some(Rejection::Exhausted)
    }
}

#[cfg(test)]
mod tests;
