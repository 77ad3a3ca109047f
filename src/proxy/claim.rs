//! What a routed request holds on its backend while it is answered: a
//! [`Slot`] for local models, or nothing but the backend's address for the
//! requests that use no local GPU (cloud models, which Ollama sends on to
//! ollama.com without touching its scheduler). Either way the relay gives it
//! back when the answer ends.

use std::sync::Arc;

use crate::fleet::{Fleet, Slot, Target};

/// A request's hold on the backend that answers it.
pub enum Claim {
    /// A slot, counted against MAX_CONCURRENT_PER_BACKEND.
    Slot(Slot),
    /// No slot: the backend only relays (cloud models).
    Unslotted {
        /// The fleet, to count the answer.
        fleet: Fleet,
        /// The backend.
        target: Arc<Target>,
    },
}

impl Claim {
    /// The backend.
    pub fn target(&self) -> &Arc<Target> {
        match self {
            Self::Slot(slot) => slot.target(),
            Self::Unslotted { target, .. } => target,
        }
    }

    /// The fleet the backend belongs to.
    pub fn fleet(&self) -> &Fleet {
        match self {
            Self::Slot(slot) => slot.fleet(),
            Self::Unslotted { fleet, .. } => fleet,
        }
    }

    /// Whether a failure here is the backend's own (and marks it unhealthy):
    /// a relayed cloud request that fails may be ollama.com's doing.
    pub fn owns_failures(&self) -> bool {
        matches!(self, Self::Slot(_))
    }

    /// The answer ended cleanly: a slot goes back at once.
    pub fn finish(self) {
        if let Self::Slot(slot) = self {
            slot.finish();
        }
    }
}
