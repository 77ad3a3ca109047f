//! The slot guard: a request's claim on one backend's capacity. It lives as
//! long as the request's response body (not just its headers: an Ollama
//! stream can run for minutes), and its drop gives the slot back and hands it
//! to exactly one waiter. In-flight counts therefore come from live guards
//! and cannot drift.
//!
//! A slot whose request ended cleanly is released with [`Slot::finish`], at
//! once. One dropped any other way (the client left, the backend broke) is
//! [abandoned](super::scheduler::Scheduler::abandon): the scheduler keeps it
//! taken for the settle time ([`Policy::settle`](super::Policy)), because the
//! backend learns that its connection closed only when its own event loop
//! gets to it, and a request sent there at once would find the previous one
//! still running, over the cap.

use std::sync::Arc;

use super::scheduler::Grant;
use super::shared::{RedisLease, SharedState};
use super::{Fleet, Target};

/// A slot's lease in the shared state, and where to give it back.
pub(super) type Remote = (Arc<SharedState>, RedisLease);

/// A slot on one backend. Dropping it gives the slot back (after the settle
/// time unless it was [finished](Slot::finish)).
pub struct Slot {
    fleet: Fleet,
    /// Always `Some` until the drop.
    lease: Option<Grant>,
    /// Its lease in the shared state (SHARED_STATE only).
    remote: Option<Remote>,
    /// `remote` was handed over by the request that finished on this
    /// backend before: the new request keeps it through
    /// [`Slot::take_handed`] rather than taking another.
    handed: bool,
    finished: bool,
}

impl Slot {
    pub(super) fn new(fleet: Fleet, lease: Grant) -> Self {
        Self {
            fleet,
            lease: Some(lease),
            remote: None,
            handed: false,
            finished: false,
        }
    }

    /// Ties the slot to its lease in the shared state.
    pub(super) fn set_remote(&mut self, state: Arc<SharedState>, lease: RedisLease) {
        self.remote = Some((state, lease));
    }

    /// Hands the finished request's lease over to this slot.
    pub(super) fn set_handed(&mut self, remote: Remote) {
        self.remote = Some(remote);
        self.handed = true;
    }

    /// The lease handed over from the previous request, if any.
    pub(super) fn take_handed(&mut self) -> Option<Remote> {
        std::mem::take(&mut self.handed).then(|| self.remote.take())?
    }

    /// The backend answered in full: the slot goes back now.
    pub fn finish(mut self) {
        self.finished = true;
    }

    /// The backend this slot is on.
    pub fn target(&self) -> &Arc<Target> {
        &self
            .lease
            .as_ref()
            .expect("a live slot has its lease")
            .target
    }

    /// The fleet this slot belongs to.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let remote = self.remote.take();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !self.finished => self.fleet.abandon(lease, remote, &runtime),
            _ => self.fleet.release(lease, remote),
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("backend", &self.target().id)
            .finish()
    }
}
