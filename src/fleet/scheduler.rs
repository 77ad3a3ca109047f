//! The routing core, sans-io: which backend a request gets, who waits, and
//! who gets a freed slot. No tokio, no http: the waiter payload `W` is opaque
//! (the fleet uses a oneshot sender), so this is tested with plain values.
//!
//! Invariants, checked by the seeded test at the bottom after every step:
//! no backend holds more than the cap; after every call no waiter could be
//! granted a free slot it is eligible for; a freed slot goes to the oldest
//! waiter that can use it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::backend::{Backend, BackendId, ProbeReport, Target};
use crate::model::ModelName;

/// What a request needs from a backend.
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// The model it names; `None` fits any backend.
    pub model: Option<ModelName>,
    /// Backends it already failed on, not to be tried again.
    pub tried: Vec<BackendId>,
}

/// Why a request is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No backend has listed the model since start, while some backend is healthy.
    UnknownModel,
    /// A retry with no healthy untried backend left that has the model.
    Exhausted,
    /// MAX_QUEUE requests are already waiting.
    QueueFull,
    /// MAX_QUEUE_BYTES of request bodies are already waiting.
    QueueBytesFull,
    /// The proxy is shutting down and takes nothing new.
    ShuttingDown,
}

/// What a waiter is told when it leaves the queue.
#[derive(Debug)]
pub enum Outcome {
    /// A slot on this backend is now the waiter's (its in-flight count is taken).
    Granted(Arc<Target>),
    /// The request cannot be served.
    Rejected(Rejection),
}

/// The answer to a request that asks for a slot now.
#[derive(Debug)]
pub enum Decision {
    /// A slot on this backend is taken for the request.
    Granted(Arc<Target>),
    /// No eligible backend has a free slot: the request should wait.
    Wait,
    /// The request cannot be served.
    Rejected(Rejection),
}

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

struct Waiter<W> {
    want: Want,
    bytes: usize,
    payload: W,
}

/// Backends, their slots and the FIFO queue of waiting requests.
pub struct Scheduler<W> {
    backends: BTreeMap<BackendId, Backend>,
    /// Waiters by arrival number: iteration order is FIFO.
    queue: BTreeMap<u64, Waiter<W>>,
    next_seq: u64,
    queued_bytes: usize,
    limits: Limits,
    /// Every model some backend has listed since start: the 404 test.
    known: HashSet<ModelName>,
    /// Shutting down: no new slots, every waiter turned away.
    closed: bool,
}

impl<W> Scheduler<W> {
    /// An empty fleet.
    pub fn new(limits: Limits) -> Self {
        Self {
            backends: BTreeMap::new(),
            queue: BTreeMap::new(),
            next_seq: 0,
            queued_bytes: 0,
            limits,
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

    /// One backend, to change its flags or counters.
    pub fn backend_mut(&mut self, id: &BackendId) -> Option<&mut Backend> {
        self.backends.get_mut(id)
    }

    /// Adds a backend (unhealthy until probed) unless one with that id exists.
    pub fn add_backend(&mut self, target: Arc<Target>) -> &mut Backend {
        self.backends
            .entry(target.id.clone())
            .or_insert_with(|| Backend::new(target))
    }

    /// Forgets a backend (gone for long). Slots still held on it are released
    /// into nothing.
    pub fn remove_backend(&mut self, id: &BackendId) {
        self.backends.remove(id);
    }

    /// Records a successful probe; true when the server looks replaced.
    pub fn apply_probe(&mut self, id: &BackendId, report: ProbeReport) -> bool {
        let Some(backend) = self.backends.get_mut(id) else {
            return false;
        };
        self.known.extend(backend_models(&report));
        backend.apply_probe(report)
    }

    /// Marks a backend unhealthy; true when it was healthy.
    pub fn mark_unhealthy(&mut self, id: &BackendId, error: String) -> bool {
        let Some(backend) = self.backends.get_mut(id) else {
            return false;
        };
        let was = backend.healthy;
        backend.healthy = false;
        backend.last_error = Some(error);
        was
    }

    /// Requests waiting now.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes of request bodies waiting now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
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
    /// or go. Does not queue it: see [`Scheduler::enqueue`].
    pub fn try_acquire(&mut self, want: &Want) -> Decision {
        if let Some(rejection) = self.rejection(want) {
            return Decision::Rejected(rejection);
        }
        match self.pick(want) {
            Some(id) => Decision::Granted(self.take_slot(&id)),
            None => Decision::Wait,
        }
    }

    /// Queues a request that must wait; returns its place, to leave with
    /// [`Scheduler::dequeue`].
    pub fn enqueue(&mut self, want: Want, bytes: usize, payload: W) -> Result<u64, Rejection> {
        if self.queue.len() >= self.limits.max_queue {
            return Err(Rejection::QueueFull);
        }
        if self.queued_bytes.saturating_add(bytes) > self.limits.max_queue_bytes {
            return Err(Rejection::QueueBytesFull);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queued_bytes += bytes;
        self.queue.insert(
            seq,
            Waiter {
                want,
                bytes,
                payload,
            },
        );
        Ok(seq)
    }

    /// Takes a waiter out of the queue (timeout, client gone). `None` when it
    /// already left with an outcome.
    pub fn dequeue(&mut self, seq: u64) -> Option<W> {
        let waiter = self.queue.remove(&seq)?;
        self.queued_bytes -= waiter.bytes;
        Some(waiter.payload)
    }

    /// Gives back a slot of `target` and hands it (and any other free slot of
    /// that backend) to the oldest waiters that can use it.
    pub fn release(&mut self, target: &Arc<Target>) -> Vec<(W, Outcome)> {
        let Some(backend) = self.backends.get_mut(&target.id) else {
            return Vec::new();
        };
        // A slot of a backend that was since replaced under the same id is not
        // this backend's to give back.
        if !Arc::ptr_eq(&backend.target, target) {
            return Vec::new();
        }
        debug_assert!(
            backend.in_flight > 0,
            "slot released twice on {}",
            target.id
        );
        backend.in_flight = backend.in_flight.saturating_sub(1);
        let mut out = Vec::new();
        while self.has_free_slot(&target.id) {
            let Some(seq) = self.oldest_waiter_for(&target.id) else {
                break;
            };
            let payload = self.dequeue(seq).expect("seq was just found in the queue");
            out.push((payload, Outcome::Granted(self.take_slot(&target.id))));
        }
        out
    }

    /// Re-examines the whole queue after the fleet changed (a scan, a backend
    /// marked unhealthy, an undrain): rejects waiters that can no longer be
    /// served and grants free slots, oldest waiter first.
    pub fn dispatch(&mut self) -> Vec<(W, Outcome)> {
        let mut out = Vec::new();
        let rejected: Vec<(u64, Rejection)> = self
            .queue
            .iter()
            .filter_map(|(seq, w)| self.rejection(&w.want).map(|r| (*seq, r)))
            .collect();
        for (seq, rejection) in rejected {
            let payload = self.dequeue(seq).expect("seq was just found in the queue");
            out.push((payload, Outcome::Rejected(rejection)));
        }
        let seqs: Vec<u64> = self.queue.keys().copied().collect();
        for seq in seqs {
            if !self.backends.keys().any(|id| self.has_free_slot(id)) {
                break;
            }
            let Some(id) = self.pick(&self.queue[&seq].want) else {
                continue;
            };
            let target = self.take_slot(&id);
            let payload = self.dequeue(seq).expect("seq was just found in the queue");
            out.push((payload, Outcome::Granted(target)));
        }
        out
    }

    // ===== selection =====

    /// The best backend with a free slot for `want`, if any. With a cap:
    /// model loaded first, then fewest in flight, then lowest id. Without a
    /// cap: fewest in flight first, so one warm backend does not take all.
    fn pick(&self, want: &Want) -> Option<BackendId> {
        let uncapped = self.limits.cap == 0;
        let chosen = self
            .backends
            .values()
            .filter(|b| self.is_eligible(b, want) && self.slot_free(b))
            .min_by(|a, b| {
                let (la, lb) = (
                    a.has_loaded(want.model.as_ref()),
                    b.has_loaded(want.model.as_ref()),
                );
                let loaded = lb.cmp(&la); // loaded (true) sorts first
                let load = a.in_flight.cmp(&b.in_flight);
                let (first, second) = if uncapped {
                    (load, loaded)
                } else {
                    (loaded, load)
                };
                first
                    .then(second)
                    .then_with(|| a.target.id.cmp(&b.target.id))
            })?;
        tracing::trace!(
            backend = %chosen.target.id,
            in_flight = chosen.in_flight,
            loaded = chosen.has_loaded(want.model.as_ref()),
            "picked"
        );
        Some(chosen.target.id.clone())
    }

    fn is_eligible(&self, b: &Backend, want: &Want) -> bool {
        b.healthy
            && !b.draining
            && b.has_model(want.model.as_ref())
            && !want.tried.contains(&b.target.id)
    }

    fn slot_free(&self, b: &Backend) -> bool {
        self.limits.cap == 0 || b.in_flight < self.limits.cap
    }

    fn has_free_slot(&self, id: &BackendId) -> bool {
        self.backends
            .get(id)
            .is_some_and(|b| b.healthy && !b.draining && self.slot_free(b))
    }

    fn oldest_waiter_for(&self, id: &BackendId) -> Option<u64> {
        let backend = self.backends.get(id)?;
        self.queue
            .iter()
            .find(|(_, w)| self.is_eligible(backend, &w.want))
            .map(|(seq, _)| *seq)
    }

    fn take_slot(&mut self, id: &BackendId) -> Arc<Target> {
        let backend = self.backends.get_mut(id).expect("picked backend exists");
        backend.in_flight += 1;
        debug_assert!(self.limits.cap == 0 || backend.in_flight <= self.limits.cap);
        Arc::clone(&backend.target)
    }

    fn rejection(&self, want: &Want) -> Option<Rejection> {
        if self.closed {
            return Some(Rejection::ShuttingDown);
        }
        let any_healthy = || self.backends.values().any(|b| b.healthy);
        if let Some(model) = &want.model {
            if !self.known.contains(model) && any_healthy() {
                return Some(Rejection::UnknownModel);
            }
        }
        let retry_has_nowhere_to_go =
            !want.tried.is_empty() && !self.backends.values().any(|b| self.is_eligible(b, want));
        retry_has_nowhere_to_go.then_some(Rejection::Exhausted)
    }
}

fn backend_models(report: &ProbeReport) -> impl Iterator<Item = ModelName> + '_ {
    report.models.iter().map(|m| ModelName::parse(m))
}

#[cfg(test)]
mod tests;
