//! The slot guard: a request's claim on one backend's capacity. It lives as
//! long as the request's response body (not just its headers: an Ollama
//! stream can run for minutes), and its drop gives the slot back and hands it
//! to exactly one waiter. In-flight counts therefore come from live guards
//! and cannot drift.

use std::sync::Arc;

use super::{Fleet, Target};

/// A slot on one backend. Dropping it releases the slot.
pub struct Slot {
    fleet: Fleet,
    target: Arc<Target>,
}

impl Slot {
    pub(super) fn new(fleet: Fleet, target: Arc<Target>) -> Self {
        Self { fleet, target }
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
        self.fleet.release(&self.target);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("backend", &self.target.id)
            .finish()
    }
}
