//! The placement hook (ROUTING): which eligible backend an arriving request
//! goes to when cache-aware placement has something to weigh (its prompt
//! prefix, session or runner options, see [`crate::fleet::placement`]), and
//! the waiters placement holds back for a busy backend.
//!
//! Only arrivals are placed: a slot freed later goes to the waiter next in
//! the fair order, as for any request, so a release stays O(log n). A
//! request placement prefers to hold back while a free backend could serve
//! it waits at most its model's usual service time for the busy one; then
//! the free backends are offered to it again ([`Scheduler::expire`]), so a
//! busy backend that dies or lingers costs it no more than that.

use tokio::time::Instant;

use super::{Scheduler, Want};
use crate::fleet::backend::BackendId;
use crate::fleet::placement::{Candidate, Choice, Placement};
use crate::policy::Routing;

impl<W> Scheduler<W> {
    /// Sets the placement rule (ROUTING); a new scheduler uses least-busy.
    pub fn set_routing(&mut self, routing: Routing) {
        self.placement = Placement::new(routing);
    }

    /// The placement memory, to learn from responses.
    pub fn placement_mut(&mut self) -> &mut Placement {
        &mut self.placement
    }

    /// Holds a waiter back for a busy backend until `due`: then the free
    /// backends for its model are offered to it again.
    pub fn hold(&mut self, arrival: u64, due: Instant) {
        self.held.insert((due, arrival));
    }

    /// Which backend an arriving request goes to, given the least-busy
    /// choice among the free eligible ones; `None`: it should wait. Without
    /// a signature, or under ROUTING=least-busy, the least-busy choice.
    pub(super) fn place(&self, want: &Want, least_busy: Option<&BackendId>) -> Option<BackendId> {
        let sig = want
            .signature
            .as_deref()
            .filter(|_| self.placement.routing() == Routing::CacheAware);
        let Some(sig) = sig else {
            return least_busy.cloned();
        };
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
        let model = want.model.as_ref();
        let queued = self.waiters.waiting_for(model);
        let choice = self
            .placement
            .choose(Some(sig), model, &candidates, least_busy, queued);
        let Choice::Go(id, placed) = choice else {
            return None;
        };
        *sig.placed.lock().unwrap_or_else(|e| e.into_inner()) = Some(placed);
        Some(id)
    }

    /// A waiter granted `id` from the queue: placement remembers what it
    /// leaves there, and the request log says it came from the queue.
    pub(super) fn placed_from_queue(&mut self, id: &BackendId, want: &Want) {
        let sig = want.signature.as_deref();
        if let Some(sig) = sig.filter(|_| self.placement.routing() == Routing::CacheAware) {
            let placed = self.placement.queued(id, sig, want.model.as_ref());
            *sig.placed.lock().unwrap_or_else(|e| e.into_inner()) = Some(placed);
        }
        self.placement.routed(id, sig, want.model.as_ref());
    }

    /// Offers the free backends again to the held waiters whose time is up.
    pub(super) fn release_held(&mut self, now: Instant, out: &mut Vec<(W, super::Outcome)>) {
        while let Some(&(due, arrival)) = self.held.first() {
            if due > now {
                break;
            }
            self.held.pop_first();
            let Some(waiter) = self.waiters.by_arrival.get(&arrival) else {
                continue;
            };
            let free: Vec<BackendId> = self
                .free
                .candidates(waiter.want.model.as_ref())
                .cloned()
                .collect();
            for id in free {
                self.hand_out(&id, now, out);
            }
        }
    }
}
