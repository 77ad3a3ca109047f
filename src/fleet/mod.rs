//! The fleet: a cheap `Clone` handle over the one lock that guards the
//! backends, their slots and the wait queue. Routing decisions are made by
//! the sans-io [`scheduler`]; this module adds the clock, the waiting (a
//! oneshot per waiter, so a freed slot wakes exactly the waiter that gets
//! it), the one queue deadline of a request, and the [`Slot`] guard that
//! gives a slot back when dropped.

pub mod backend;
pub mod discovery;
pub mod dns;
pub mod placement;
pub mod registration;
pub mod registry;
pub mod scheduler;
pub mod shared;
mod slot;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

pub use crate::policy::Priority;
pub use backend::{Backend, BackendId, ProbeReport, Target};
pub use scheduler::{Limits, Policy, Rejection, TenantView, Ticket, Want};
pub use slot::Slot;

use crate::model::ModelName;

use scheduler::{Decision, Grant, Outcome, Scheduler};

/// What a waiter receives: its slot, or why it will not get one.
type Verdict = Result<Slot, Rejection>;

/// The fleet handle, shared by the proxy, discovery and admin endpoints.
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

struct Shared {
    /// A std mutex, not tokio's: every critical section is a few map
    /// operations and nothing is awaited while it is held, so parking a
    /// thread is cheaper than an async lock.
    state: Mutex<Scheduler<oneshot::Sender<Verdict>>>,
    queue_timeout: Duration,
    /// SHARED_STATE, once attached; unset costs one atomic load per request.
    remote: OnceLock<Arc<shared::SharedState>>,
}

impl Fleet {
    /// An empty fleet with these limits and the default [`Policy`].
    pub fn new(limits: Limits, queue_timeout: Duration) -> Self {
        Self::with_policy(limits, Policy::default(), queue_timeout)
    }

    /// An empty fleet with these limits and tenant policy.
    pub fn with_policy(limits: Limits, policy: Policy, queue_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(Scheduler::with_policy(limits, policy)),
                queue_timeout,
                remote: OnceLock::new(),
            }),
        }
    }

    /// Locks the state. A panic while holding the lock leaves consistent data
    /// behind (every change is a single map operation), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Scheduler<oneshot::Sender<Verdict>>> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the state under the lock; `f` must be quick.
    pub fn read<T>(&self, f: impl FnOnce(&Scheduler<oneshot::Sender<Verdict>>) -> T) -> T {
        f(&self.lock())
    }

    /// Changes the state under the lock, then hands out whatever slots the
    /// change freed or rejections it caused.
    pub fn update<T>(&self, f: impl FnOnce(&mut Scheduler<oneshot::Sender<Verdict>>) -> T) -> T {
        let (value, out) = {
            let mut state = self.lock();
            let value = f(&mut state);
            (value, state.dispatch(Instant::now()))
        };
        self.deliver(out, None);
        value
    }

    /// Shares this fleet's slots with other instances through `state`
    /// (once; a second call is ignored).
    pub fn attach_shared(&self, state: Arc<shared::SharedState>) {
        let _ = self.shared.remote.set(state);
    }

    /// The shared state, when SHARED_STATE is set.
    pub fn shared_state(&self) -> Option<&Arc<shared::SharedState>> {
        self.shared.remote.get()
    }

    /// Gets a slot for the request (see [`Fleet::acquire_local`]); with a
    /// shared state, each local grant is confirmed there, and a backend full
    /// fleet-wide sends the request back to wait at its place.
    pub async fn acquire(
        &self,
        want: Want,
        bytes: usize,
        ticket: &mut Ticket,
    ) -> Result<Slot, Rejection> {
        let Some(remote) = self.shared.remote.get() else {
            return self.acquire_local(want, bytes, ticket).await;
        };
        loop {
            let mut slot = {
                let local = self.acquire_local(want.clone(), bytes, ticket);
                tokio::pin!(local);
                // Not granted at once: it waits here, and the other instances
                // must know before they hand over a slot to a younger waiter.
                tokio::select! {
                    biased;
                    granted = &mut local => granted?,
                    () = std::future::ready(()) => {
                        remote.waiting_started();
                        local.await?
                    }
                }
            };
            let id = slot.target().id.clone();
            // Boxed: the shared-state round trip's future is kilobytes, and
            // without the box every parked request would carry its room.
            let lease = match slot.take_handed() {
                // The previous request's lease, kept in one round trip.
                Some((_, lease)) => Box::pin(remote.transfer(self, &id, lease, ticket.since)).await,
                None => Box::pin(remote.take(self, &id, ticket.since)).await,
            };
            if let Some(lease) = lease {
                slot.set_remote(Arc::clone(remote), lease);
                return Ok(slot);
            }
            slot.finish();
        }
    }

    /// Gets a slot for the request from this instance's scheduler: at once when an eligible backend is free,
    /// else after waiting in the queue, until `ticket.since` plus the queue
    /// timeout (one deadline for all attempts of a request). The ticket
    /// keeps the request's arrival number, so a retry waits at its old place.
    /// Dropping the future (the client went away) leaves the queue at once.
    async fn acquire_local(
        &self,
        want: Want,
        bytes: usize,
        ticket: &mut Ticket,
    ) -> Result<Slot, Rejection> {
        let deadline = ticket.since + self.shared.queue_timeout;
        let (seq, mut rx, held) = {
            let mut state = self.lock();
            let held = match state.try_acquire(&want, ticket, Instant::now()) {
                Decision::Granted(lease) => return Ok(Slot::new(self.clone(), lease)),
                Decision::Rejected(r) => return Err(r),
                Decision::Wait | Decision::Hold(_) if Instant::now() >= deadline => {
                    return Err(Rejection::QueueTimeout);
                }
                Decision::Wait => None,
                Decision::Hold(due) => Some(due),
            };
            let (tx, rx) = oneshot::channel();
            let seq = state.enqueue(want, bytes, ticket, tx)?;
            ticket.arrival = Some(seq);
            if let Some(due) = held {
                state.hold(seq, due);
            }
            (seq, rx, held)
        };
        if let Some(due) = held {
            self.wake_on(&tokio::runtime::Handle::current(), due, None);
        }
        let mut place = QueuePlace {
            fleet: self,
            seq: Some(seq),
        };
        match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(grant) => {
                place.seq = None;
                grant.unwrap_or(Err(Rejection::Exhausted))
            }
            Err(_) => {
                if place.leave() {
                    return Err(Rejection::QueueTimeout);
                }
                // Granted in the same instant: the grant is on its way.
                rx.await.unwrap_or(Err(Rejection::QueueTimeout))
            }
        }
    }

    /// A backend for a request that takes no slot (see
    /// [`Scheduler::grant_unslotted`]).
    pub fn grant_unslotted(&self, want: &Want) -> Option<Arc<Target>> {
        self.read(|s| s.grant_unslotted(want))
    }

    /// How long a client turned away for `model` should wait before trying
    /// again, from its tenant's place and the model's recent turnover.
    pub fn retry_after(&self, model: Option<&ModelName>, tenant: &str) -> Duration {
        self.read(|s| s.retry_after(model, tenant))
    }

    /// Marks a backend unhealthy after a failed attempt; it comes back only
    /// through a later successful probe.
    pub fn mark_failed(&self, id: &BackendId, error: String) {
        self.update(|s| {
            if let Some(b) = s.backend_mut(id) {
                b.failures += 1;
            }
            if s.mark_unhealthy(id, error.clone()) {
                tracing::warn!(backend = %id, %error, "backend marked unhealthy");
            }
        });
    }

    /// Strikes `model` off a backend's lists until its next probe: the
    /// backend answered that it does not have it (another server took the
    /// port since the last scan). Its health is unchanged.
    pub fn forget_model(&self, id: &BackendId, model: &ModelName) {
        self.update(|s| {
            if let Some(b) = s.backend_mut(id) {
                b.models.remove(model);
                b.loaded.remove(model);
            }
        });
        tracing::warn!(backend = %id, model = %model.display(), "backend no longer has the model");
    }

    /// A response ended: placement learns the backend's prompt speed and
    /// service time (see [`placement::Placement::observed`]).
    pub fn observed(&self, id: &BackendId, seen: &placement::Observed) {
        self.lock().placement_mut().observed(id, seen);
    }

    /// Counts a request a backend served in full.
    pub fn record_served(&self, target: &Arc<Target>) {
        self.lock().count_served(target);
    }

    /// Drains (true) or undrains (false) a backend, on every instance with
    /// SHARED_STATE; false when there is no such backend.
    pub fn set_draining(&self, id: &BackendId, draining: bool) -> bool {
        let found = self.set_draining_here(id, draining);
        if found && let Some(remote) = self.shared.remote.get() {
            remote.share_drain(id, draining);
        }
        found
    }

    /// The same on this instance only: for drains every instance makes by
    /// itself (a registration that ran out or was withdrawn everywhere).
    pub fn set_draining_here(&self, id: &BackendId, draining: bool) -> bool {
        let found = self.update(|s| s.backend_mut(id).map(|b| b.draining = draining).is_some());
        if found {
            tracing::info!(backend = %id, draining, "drain state changed");
        }
        found
    }

    /// Gives a finished request's slot back at once; its shared lease
    /// (`remote`) goes to the local waiter that gets the slot, or back to
    /// the shared state when none does.
    fn release(&self, grant: Grant, remote: Option<slot::Remote>) {
        let id = grant.target.id.clone();
        let out = self.lock().release(grant, Instant::now());
        self.deliver(out, remote.map(|r| (id, r)));
    }

    /// Keeps an abandoned slot taken for the settle time; a wake-up at its
    /// deadline (or any earlier call that passes it) gives it back.
    fn abandon(
        &self,
        grant: Grant,
        remote: Option<slot::Remote>,
        runtime: &tokio::runtime::Handle,
    ) {
        let due = self.lock().abandon(grant, Instant::now());
        self.wake_on(runtime, due, remote);
    }

    /// Hands out, on `runtime`, what the scheduler keeps until `due`
    /// (settling slots, held waiters) once it is due; an abandoned slot's
    /// shared lease (`remote`) goes back to the shared state at the same time.
    fn wake_on(
        &self,
        runtime: &tokio::runtime::Handle,
        due: Instant,
        remote: Option<slot::Remote>,
    ) {
        let fleet = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep_until(due).await;
            let out = fleet.lock().expire(Instant::now());
            if let Some((state, lease)) = remote {
                state.give_back(lease);
            }
            fleet.deliver(out, None);
        });
    }

    /// Sends outcomes to their waiters, outside the lock, handing a released
    /// slot's shared lease (`handover`) to the first waiter granted a slot on
    /// that backend (given back if none is). A waiter that gave up meanwhile
    /// drops its receiver; the slot then comes back through `Slot`'s drop and
    /// goes to the next waiter.
    fn deliver(
        &self,
        out: Vec<(oneshot::Sender<Verdict>, Outcome)>,
        mut handover: Option<(BackendId, slot::Remote)>,
    ) {
        for (tx, outcome) in out {
            let grant = match outcome {
                Outcome::Granted(lease) => {
                    let mut slot = Slot::new(self.clone(), lease);
                    if let Some((_, remote)) = handover.take_if(|(id, _)| *id == slot.target().id) {
                        slot.set_handed(remote);
                    }
                    Ok(slot)
                }
                Outcome::Rejected(r) => Err(r),
            };
            // Never used: back at once, not after the settle time.
            if let Err(Ok(slot)) = tx.send(grant) {
                slot.finish();
            }
        }
        if let Some((_, (state, lease))) = handover {
            state.give_back(lease);
        }
    }
}

/// A request's place in the queue; leaves the queue when dropped unless it
/// already left with a grant.
struct QueuePlace<'a> {
    fleet: &'a Fleet,
    seq: Option<u64>,
}

impl QueuePlace<'_> {
    /// Leaves the queue; false when the waiter had already been granted.
    fn leave(&mut self) -> bool {
        self.seq
            .take()
            .is_some_and(|seq| self.fleet.lock().dequeue(seq).is_some())
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}
