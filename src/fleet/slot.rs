//! The slot guard: a request's claim on one backend's capacity. It lives as
//! long as the request's response body (not just its headers: an Ollama
//! stream can run for minutes), and its drop gives the slot back and hands it
//! to exactly one waiter. In-flight counts therefore come from live guards
//! and cannot drift.
//!
//! A slot whose request ended cleanly is released with [`Slot::finish`], at
//! once. One dropped any other way (the client left, the backend broke) is
//! released [`SETTLE`] later: the backend learns that its connection closed
//! only when its own event loop gets to it, and a request sent there at once
//! would find the previous one still running, over the cap.

use std::sync::Arc;
use std::time::Duration;

use super::{Fleet, Target};

/// How long a slot abandoned mid-request stays taken after its drop, so that
/// the backend notices the closed connection before the next request comes.
pub const SETTLE: Duration = Duration::from_millis(50);

/// A slot on one backend. Dropping it releases the slot ([`SETTLE`] later
/// unless it was [finished](Slot::finish)).
pub struct Slot {
    fleet: Fleet,
    target: Arc<Target>,
    finished: bool,
}

impl Slot {
    pub(super) fn new(fleet: Fleet, target: Arc<Target>) -> Self {
        Self {
            fleet,
            target,
            finished: false,
        }
    }

    /// The backend answered in full: the slot goes back now.
    pub fn finish(mut self) {
        self.finished = true;
    }

    /// The backend this slot is on.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// The fleet this slot belongs to.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if !self.finished => {
                let (fleet, target) = (self.fleet.clone(), Arc::clone(&self.target));
                runtime.spawn(async move {
                    tokio::time::sleep(SETTLE).await;
                    fleet.release(&target);
                });
            }
            _ => self.fleet.release(&self.target),
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("backend", &self.target.id)
            .finish()
    }
}
