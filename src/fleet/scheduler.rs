//! The routing core, sans-io: which backend a request gets, who waits, and
//! who gets a freed slot. No tokio, no http: the waiter payload `W` is opaque
//! (the fleet uses a oneshot sender), so this is tested with plain values.
//!
//! Invariants, checked by the seeded test at the bottom after every step:
//! no backend holds more than the cap; after every call no waiter could be
//! granted a free slot it is eligible for; a freed slot goes to the oldest
//! waiter that can use it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::backend::{Backend, BackendId, ProbeReport, Target};
use super::placement::{Candidate, Choice, Placement, Routing, Signature};
use crate::model::ModelName;

/// What a request needs from a backend.
#[derive(Debug, Clone, Default)]
pub struct Want {
    /// The model it names; `None` fits any backend.
    pub model: Option<ModelName>,
    /// Backends it already failed on, not to be tried again.
    pub tried: Vec<BackendId>,
    /// What cache-aware placement knows of it; `None` under
    /// ROUTING=least-busy or for a body that is not a JSON object.
    pub signature: Option<Arc<Signature>>,
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
    /// What each backend holds (issue 12), beside the scheduler state.
    placement: Placement,
    /// Waiters per model, for placement's queue estimate.
    waiting_for: HashMap<Option<ModelName>, usize>,
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
            placement: Placement::new(Routing::LeastBusy),
            waiting_for: HashMap::new(),
        }
    }

    /// Sets the placement rule (ROUTING); a new scheduler uses least-busy.
    pub fn set_routing(&mut self, routing: Routing) {
        self.placement = Placement::new(routing);
    }

    /// The placement memory, to learn from responses.
    pub fn placement_mut(&mut self) -> &mut Placement {
        &mut self.placement
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
        self.placement.forget(id);
    }

    /// Records a successful probe; true when the server looks replaced.
    pub fn apply_probe(&mut self, id: &BackendId, report: ProbeReport) -> bool {
        let Some(backend) = self.backends.get_mut(id) else {
            return false;
        };
        self.known.extend(backend_models(&report));
        let ps = report.ps.clone();
        let replaced = backend.apply_probe(report);
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
            Some(id) => Decision::Granted(self.take_slot(&id, want)),
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
        *self.waiting_for.entry(want.model.clone()).or_default() += 1;
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
        if let Some(n) = self.waiting_for.get_mut(&waiter.want.model) {
            *n -= 1;
            if *n == 0 {
                self.waiting_for.remove(&waiter.want.model);
            }
        }
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
            let want = self.queue[&seq].want.clone();
            let payload = self.dequeue(seq).expect("seq was just found in the queue");
            out.push((payload, Outcome::Granted(self.take_slot(&target.id, &want))));
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
            let want = self.queue[&seq].want.clone();
            let target = self.take_slot(&id, &want);
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
        // Placement hook (issue 12): among the eligible backends, cache-aware
        // placement may prefer another free one than the least-busy choice,
        // or wait for a busy one that holds the request's prefix or model.
        // Without a signature (nothing worth keeping) the choice stands.
        self.place(want, Some(&chosen.target.id))
    }

    /// The placement hook: `least_busy` is the least-busy choice among free
    /// eligible backends; `None` means wait.
    fn place(&self, want: &Want, least_busy: Option<&BackendId>) -> Option<BackendId> {
        let Some(sig) = want.signature.as_deref() else {
            return least_busy.cloned();
        };
        if self.placement.routing() == Routing::LeastBusy {
            return least_busy.cloned();
        }
        let candidates: Vec<Candidate<'_>> = self
            .backends
            .values()
            .filter(|b| self.is_eligible(b, want))
            .map(|b| Candidate {
                id: &b.target.id,
                free: self.slot_free(b),
                ahead: if self.limits.cap == 0 { b.in_flight } else { 0 },
                probed_loaded: b.has_loaded(want.model.as_ref()),
            })
            .collect();
        let queued = self.waiting_for.get(&want.model).copied().unwrap_or(0);
        let model = want.model.as_ref();
        match self
            .placement
            .choose(Some(sig), model, &candidates, least_busy, queued)
        {
            Choice::Go(id, placed) => {
                *sig.placed.lock().unwrap_or_else(|e| e.into_inner()) = Some(placed);
                Some(id)
            }
            Choice::Wait => None,
        }
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
            .find(|(_, w)| {
                // Placement hook (issue 12): a waiter that would rather keep
                // waiting for a busy backend holding its prefix or model
                // lets this slot go to the next one.
                self.is_eligible(backend, &w.want)
                    && (w.want.signature.is_none() || self.pick(&w.want).is_some())
            })
            .map(|(seq, _)| *seq)
    }

    fn take_slot(&mut self, id: &BackendId, want: &Want) -> Arc<Target> {
        self.placement
            .routed(id, want.signature.as_deref(), want.model.as_ref());
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
