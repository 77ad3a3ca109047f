//! Where a routed request may go next, as the fleet grants it, and what it
//! holds there while it is answered ([`Claim`], given back by the relay when
//! the answer ends): a backend slot, or for a cloud model an unslotted
//! grant; a Responses request that continues a response is pinned to the
//! backend that produced it (`responses.rs`). Once every backend left has
//! answered Ollama's 503 `server busy`, the same backends are asked again
//! after a pause that doubles, within QUEUE_TIMEOUT_SECONDS (a busy backend
//! is healthy; its queue is full).
//!
//! Cloud models (`gpt-oss:120b:cloud`, `gpt-oss:120b-cloud`): Ollama relays
//! them to ollama.com without a local model or a scheduler slot, so they
//! take none here either and do not count against
//! MAX_CONCURRENT_PER_BACKEND. The name rules are OLLAMA_API_ADDENDUM.md §3.1.

use std::sync::Arc;

use tokio::time::Instant;

use super::App;
use super::error::ProxyError;
use super::upstream::BackendError;
use crate::fleet::{BackendId, Fleet, Rejection, Slot, Target, Ticket, Want};

/// Where a request may still go: a cloud model takes no slot, and backends
/// that answered `server busy` are tried again after a pause once no other
/// is left.
pub struct Course {
    /// A cloud model: no slot.
    pub cloud: bool,
    /// Backends that answered busy since the last pause.
    pub busy: Vec<BackendId>,
    pub busy_rounds: u32,
    /// QUEUE_TIMEOUT_SECONDS after arrival.
    pub deadline: Instant,
}

impl Course {
    /// The next backend to try, held by a slot or (cloud) not.
    pub async fn claim(
        &mut self,
        app: &App,
        want: &mut Want,
        bytes: usize,
        ticket: &mut Ticket,
        attempts: u32,
        last: Option<&BackendError>,
    ) -> Result<Claim, Rejection> {
        loop {
            let claimed = if self.cloud {
                app.fleet
                    .grant_unslotted(want)
                    .map(|target| Claim::Unslotted {
                        fleet: app.fleet.clone(),
                        target,
                    })
                    .ok_or(Rejection::Exhausted)
            } else {
                app.fleet
                    .acquire(want.clone(), bytes, ticket)
                    .await
                    .map(Claim::Slot)
            };
            match claimed {
                Ok(claim) => return Ok(claim),
                Err(Rejection::Exhausted) if !self.busy.is_empty() => {}
                Err(Rejection::Exhausted) => break,
                Err(why) => return Err(why),
            }
            // Every backend left is busy: try them again after a pause that
            // doubles (25 ms up to 0.8 s), within the queue timeout.
            let pause = std::time::Duration::from_millis(25 << self.busy_rounds.min(5));
            self.busy_rounds += 1;
            if Instant::now() + pause >= self.deadline {
                return Err(Rejection::QueueTimeout);
            }
            want.tried.retain(|id| !self.busy.contains(id));
            self.busy.clear();
            tokio::time::sleep(pause).await;
        }
        if want.pin.is_some() {
            return Err(Rejection::PreviousResponseGone);
        }
        if self.cloud && attempts == 0 && last.is_none() {
            return Err(Rejection::NoHealthyBackend);
        }
        Err(Rejection::Exhausted)
    }
}

/// The backend a Responses request must go to: the one that produced its
/// `previous_response_id`, if corral relayed that answer; a 404 at once when
/// that backend is gone. An id corral never saw goes anywhere (the backend
/// answers for itself).
pub fn pinned_backend(app: &App, previous: &str) -> Result<Option<BackendId>, ProxyError> {
    let Some(owner) = app.responses.owner(previous) else {
        return Ok(None);
    };
    let alive = app.fleet.read(|s| {
        s.backends()
            .get(&owner)
            .is_some_and(|b| b.healthy && !b.draining)
    });
    if !alive {
        app.metrics.rejected(Rejection::PreviousResponseGone);
        return Err(ProxyError::PreviousResponseGone);
    }
    Ok(Some(owner))
}

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

/// Whether `name` asks explicitly for a cloud model: its last `:` part is
/// `cloud`, or its tag ends in `-cloud` (with no `/` after the last `:`);
/// case does not matter. A conflicting `:cloud:local` counts as cloud too:
/// the backend answers it with its own 400.
pub fn is_cloud(name: &str) -> bool {
    let name = name.trim();
    let Some((_, tag)) = name.rsplit_once(':') else {
        return false;
    };
    if tag.contains('/') {
        return false;
    }
    let tag = tag.to_ascii_lowercase();
    tag == "cloud" || tag.ends_with("-cloud")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_names_follow_ollamas_suffix_rules() {
        for cloud in [
            "gpt-oss:120b:cloud",
            "qwen3:cloud",
            "gpt-oss:120b-cloud",
            "QWEN3:CLOUD",
            " deepseek-v3.1:671b-cloud ",
            "x:cloud:local:cloud",
        ] {
            assert!(is_cloud(cloud), "{cloud}");
        }
        for local in [
            "llama3.2",
            "gpt-oss:20b:local",
            "model-cloud",
            "host:5000/ns/m-cloud",
            "qwen3:8b",
            "",
        ] {
            assert!(!is_cloud(local), "{local}");
        }
    }
}
