//! What a simulated server counted: requests per path, in-flight inference,
//! completions, cancellations, oversubscription, injected faults, and the
//! cost model's work: prompt tokens evaluated and reused, model loads,
//! reloads and evictions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A snapshot of a server's counters (also served at `GET /__sim/stats`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Stats {
    /// Requests received per path (`/api/generate`, …), probes included.
    pub requests: BTreeMap<String, u64>,
    /// All requests received (`/__sim/stats` excluded).
    pub total: u64,
    /// Inference requests in progress right now.
    pub in_flight: u64,
    /// Highest `in_flight` seen.
    pub concurrent_peak: u64,
    /// Inference requests answered fully.
    pub completed: u64,
    /// Inference requests whose client went away before the answer was complete.
    pub cancelled: u64,
    /// Inference requests that arrived while every slot of their model was taken.
    pub oversubscribed: u64,
    /// Injected faults by kind (`error`, `busy`, `reset`, `hang`, `garbage`,
    /// `mid-stream-error`).
    pub faults: BTreeMap<String, u64>,
    /// Prompt tokens evaluated (not found in the prompt cache).
    pub prompt_tokens_evaluated: u64,
    /// Prompt tokens found in the prompt cache and not evaluated again.
    pub prompt_tokens_reused: u64,
    /// Model loads (runners started), reloads included.
    pub loads: u64,
    /// Loads of a loaded model because a request's `num_ctx` differed.
    pub reloads: u64,
    /// Idle models unloaded to make room for another (`max_loaded`).
    pub evictions: u64,
}

/// The live counters of one server incarnation.
#[derive(Clone, Default)]
pub(crate) struct Counters {
    // A std Mutex: every update is a few integer operations and nothing is
    // awaited while it is held.
    inner: Arc<Mutex<Stats>>,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn request(&self, path: &str) {
        let mut s = self.lock();
        s.total += 1;
        if let Some(n) = s.requests.get_mut(path) {
            *n += 1;
        } else {
            s.requests.insert(path.to_owned(), 1);
        }
    }

    pub(crate) fn fault(&self, kind: &str) {
        *self.lock().faults.entry(kind.to_owned()).or_default() += 1;
    }

    pub(crate) fn oversubscribed(&self) {
        self.lock().oversubscribed += 1;
    }

    pub(crate) fn prompt(&self, evaluated: u64, reused: u64) {
        let mut s = self.lock();
        s.prompt_tokens_evaluated += evaluated;
        s.prompt_tokens_reused += reused;
    }

    pub(crate) fn load(&self) {
        self.lock().loads += 1;
    }

    pub(crate) fn reload(&self) {
        self.lock().reloads += 1;
    }

    pub(crate) fn eviction(&self) {
        self.lock().evictions += 1;
    }

    /// Starts counting one inference request; the guard ends it.
    pub(crate) fn inference(&self) -> InferenceGuard {
        let mut s = self.lock();
        s.in_flight += 1;
        s.concurrent_peak = s.concurrent_peak.max(s.in_flight);
        InferenceGuard {
            counters: self.clone(),
            ended: false,
        }
    }
}

/// One inference request in flight. Dropped without [`InferenceGuard::complete`]
/// or [`InferenceGuard::abandon`], it counts as cancelled: that is what happens
/// when the client goes away and its handler future or body stream is dropped.
pub(crate) struct InferenceGuard {
    counters: Counters,
    ended: bool,
}

impl InferenceGuard {
    /// The answer was sent in full.
    pub(crate) fn complete(mut self) {
        self.end(|s| s.completed += 1);
    }

    /// The request ended in an error or fault: neither completed nor cancelled.
    pub(crate) fn abandon(mut self) {
        self.end(|_| {});
    }

    fn end(&mut self, f: impl FnOnce(&mut Stats)) {
        self.ended = true;
        let mut s = self.counters.lock();
        debug_assert!(s.in_flight > 0, "in_flight underflow");
        s.in_flight = s.in_flight.saturating_sub(1);
        f(&mut s);
    }
}

impl Drop for InferenceGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.end(|s| s.cancelled += 1);
        }
    }
}
