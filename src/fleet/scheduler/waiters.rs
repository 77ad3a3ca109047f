//! The waiting requests and the tenants they belong to, indexed so that a
//! freed slot finds its waiter in O(log n).
//!
//! A waiter sits in one *lane*: its priority and the model it wants (or the
//! lane of requests that name no model). In a lane, tenants are ordered by
//! their virtual time (slot-nanoseconds used divided by their weight), and
//! each tenant's waiters by arrival: the lane's best waiter is the oldest of
//! the tenant that has had least service. A tenant's virtual time changes
//! when it is granted a slot and when a slot it held comes back; it is then
//! re-keyed in the lanes it waits in (few), not per waiter.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::request::{TenantId, Want};
use crate::fleet::backend::BackendId;
use crate::model::ModelName;
use crate::policy::Priority;

/// Which lane: a priority and the model, `None` for requests without one.
type LaneKey = (Priority, Option<ModelName>);

pub(super) struct Waiter<W> {
    pub want: Want,
    pub tenant: TenantId,
    pub priority: Priority,
    pub bytes: usize,
    /// When it first arrived (kept across retries).
    pub since: Instant,
    pub payload: W,
}

/// The waiters of one priority and model.
#[derive(Default)]
struct Lane {
    /// Tenants with waiters here, least virtual time first.
    tenants: BTreeSet<(u64, TenantId)>,
    /// Each tenant's waiters here, by arrival.
    fifo: HashMap<TenantId, BTreeSet<u64>>,
    len: usize,
}

/// A tenant's standing.
#[derive(Debug, Default)]
pub struct Tenant {
    /// Its name: a key's name, the `X-Corral-Tenant` header or the client address.
    pub name: Arc<str>,
    /// Its share relative to others (TENANT_WEIGHTS, default 1).
    pub weight: f64,
    /// Slot-nanoseconds used divided by the weight, offset so that a tenant
    /// that was idle starts level with the others, not with banked credit.
    pub vt: u64,
    /// Its requests waiting now.
    pub waiting: usize,
    /// Its requests holding a slot now.
    pub in_flight: u32,
    /// Slot-nanoseconds its finished requests held since it became active.
    pub slot_ns: u64,
    /// Corrections (real slot time minus what was charged up front) not yet
    /// applied: folded into its next charge, so that a release re-keys
    /// nobody and a grant re-keys only the tenant served.
    owed: i64,
    /// The lanes it has waiters in.
    lanes: HashSet<LaneKey>,
}

/// The index of waiters and tenants.
pub(super) struct Waiters<W> {
    pub by_arrival: HashMap<u64, Waiter<W>>,
    any: [Lane; 2],
    by_model: HashMap<ModelName, [Lane; 2]>,
    pub tenants: HashMap<TenantId, Tenant>,
    by_name: HashMap<Arc<str>, TenantId>,
    next_tenant: TenantId,
    /// The virtual time of the last tenant served from the queue: where a
    /// tenant that was idle starts.
    vnow: u64,
    pub bytes: usize,
}

impl<W> Default for Waiters<W> {
    fn default() -> Self {
        Self {
            by_arrival: HashMap::new(),
            any: Default::default(),
            by_model: HashMap::new(),
            tenants: HashMap::new(),
            by_name: HashMap::new(),
            next_tenant: 0,
            vnow: 0,
            bytes: 0,
        }
    }
}

impl<W> Waiters<W> {
    /// The tenant named `name`, created (level with the others) if it has
    /// nothing waiting or in flight.
    pub fn tenant(&mut self, name: &Arc<str>, weight: impl FnOnce() -> f64) -> TenantId {
        if let Some(id) = self.by_name.get(name) {
            return *id;
        }
        let id = self.next_tenant;
        self.next_tenant += 1;
        self.by_name.insert(Arc::clone(name), id);
        self.tenants.insert(
            id,
            Tenant {
                name: Arc::clone(name),
                weight: weight().max(f64::MIN_POSITIVE),
                vt: self.vnow,
                ..Tenant::default()
            },
        );
        id
    }

    /// Forgets a tenant with nothing waiting or in flight, so that client
    /// addresses that come and go do not pile up.
    pub fn forget_if_idle(&mut self, id: TenantId) {
        if let Some(t) = self.tenants.get(&id)
            && t.waiting == 0
            && t.in_flight == 0
        {
            self.by_name.remove(&t.name);
            self.tenants.remove(&id);
        }
    }

    /// A tenant's number by name, if it is active.
    pub fn tenant_named(&self, name: &str) -> Option<TenantId> {
        self.by_name.get(name).copied()
    }

    /// Waiting requests of a tenant now.
    pub fn waiting_of(&self, id: TenantId) -> usize {
        self.tenants.get(&id).map_or(0, |t| t.waiting)
    }

    fn lane_mut(&mut self, priority: Priority, model: Option<&ModelName>) -> &mut Lane {
        let lanes = match model {
            None => &mut self.any,
            Some(m) => self.by_model.entry(m.clone()).or_default(),
        };
        &mut lanes[priority as usize]
    }

    fn lane(&self, priority: Priority, model: Option<&ModelName>) -> Option<&Lane> {
        let lanes = match model {
            None => &self.any,
            Some(m) => self.by_model.get(m)?,
        };
        Some(&lanes[priority as usize])
    }

    /// Queues a waiter under its arrival number.
    pub fn insert(&mut self, arrival: u64, waiter: Waiter<W>) {
        let tid = waiter.tenant;
        let Some(tenant) = self.tenants.get_mut(&tid) else {
            debug_assert!(false, "waiter of an unknown tenant");
            return;
        };
        if tenant.waiting == 0 {
            // Back from idle: no credit for the time it asked for nothing.
            tenant.vt = tenant.vt.max(self.vnow);
        }
        tenant.waiting += 1;
        let vt = tenant.vt;
        tenant
            .lanes
            .insert((waiter.priority, waiter.want.model.clone()));
        self.bytes += waiter.bytes;
        let lane = self.lane_mut(waiter.priority, waiter.want.model.as_ref());
        lane.len += 1;
        let fifo = lane.fifo.entry(tid).or_default();
        if fifo.is_empty() {
            lane.tenants.insert((vt, tid));
        }
        fifo.insert(arrival);
        self.by_arrival.insert(arrival, waiter);
    }

    /// Takes a waiter out of the index.
    pub fn remove(&mut self, arrival: u64) -> Option<Waiter<W>> {
        let waiter = self.by_arrival.remove(&arrival)?;
        self.bytes -= waiter.bytes;
        let tid = waiter.tenant;
        let vt = self.tenants.get(&tid).map_or(0, |t| t.vt);
        let lane = self.lane_mut(waiter.priority, waiter.want.model.as_ref());
        lane.len -= 1;
        let emptied = lane.fifo.get_mut(&tid).is_some_and(|fifo| {
            fifo.remove(&arrival);
            fifo.is_empty()
        });
        if emptied {
            lane.fifo.remove(&tid);
            lane.tenants.remove(&(vt, tid));
        }
        if let Some(tenant) = self.tenants.get_mut(&tid) {
            tenant.waiting -= 1;
            if emptied {
                tenant
                    .lanes
                    .remove(&(waiter.priority, waiter.want.model.clone()));
            }
        }
        if emptied
            && let Some(m) = &waiter.want.model
            && self
                .by_model
                .get(m)
                .is_some_and(|l| l.iter().all(|l| l.len == 0))
        {
            self.by_model.remove(m);
        }
        Some(waiter)
    }

    /// Records a correction of a tenant's account (negative: it was charged
    /// too much): at once when it waits nowhere, else with its next charge.
    pub fn correct(&mut self, id: TenantId, delta: i64) {
        let Some(tenant) = self.tenants.get_mut(&id) else {
            return;
        };
        if tenant.lanes.is_empty() {
            self.charge(id, delta, false);
        } else {
            tenant.owed = tenant.owed.saturating_add(delta);
        }
    }

    /// Adds `delta` slot-nanoseconds and what the tenant owes to its
    /// account, re-keying it in the lanes it waits in.
    pub fn charge(&mut self, id: TenantId, delta: i64, served_from_queue: bool) {
        let Some(tenant) = self.tenants.get_mut(&id) else {
            return;
        };
        let old = tenant.vt;
        let delta = delta.saturating_add(std::mem::take(&mut tenant.owed));
        let scaled = (delta as f64 / tenant.weight) as i64;
        tenant.vt = old.saturating_add_signed(scaled);
        if served_from_queue {
            self.vnow = self.vnow.max(old);
        }
        let new = tenant.vt;
        if new == old {
            return;
        }
        let keys = std::mem::take(&mut tenant.lanes);
        for (priority, model) in &keys {
            let lanes = match model {
                None => Some(&mut self.any),
                Some(m) => self.by_model.get_mut(m),
            };
            if let Some(lanes) = lanes {
                let lane = &mut lanes[*priority as usize];
                lane.tenants.remove(&(old, id));
                lane.tenants.insert((new, id));
            }
        }
        if let Some(tenant) = self.tenants.get_mut(&id) {
            tenant.lanes = keys;
        }
    }

    /// The best waiter of `priority` among the lanes of `models` (and the
    /// lane of requests without a model) that has not tried `backend`: the
    /// oldest of the tenant with least virtual time. Returns its tenant's
    /// virtual time and its arrival.
    pub fn best<'m>(
        &self,
        priority: Priority,
        models: impl Iterator<Item = &'m ModelName>,
        backend: &BackendId,
    ) -> Option<(u64, u64)> {
        let lanes = models
            .filter_map(|m| self.lane(priority, Some(m)))
            .chain(self.lane(priority, None));
        lanes
            .filter(|l| l.len > 0)
            .filter_map(|lane| self.best_in(lane, backend))
            .min()
    }

    /// A lane's best waiter that has not tried `backend`. Waiters that tried
    /// it (retries, few) are stepped over.
    fn best_in(&self, lane: &Lane, backend: &BackendId) -> Option<(u64, u64)> {
        for (vt, tid) in &lane.tenants {
            let fifo = lane.fifo.get(tid)?;
            let fits = fifo.iter().find(|arrival| {
                self.by_arrival
                    .get(arrival)
                    .is_some_and(|w| w.want.may_use(backend))
            });
            if let Some(arrival) = fits {
                return Some((*vt, *arrival));
            }
        }
        None
    }

    /// Waiters of a tenant for a model, in either priority, and how many
    /// tenants wait for that model.
    pub fn standing(&self, tenant: TenantId, model: Option<&ModelName>) -> (usize, usize) {
        let mut mine = 0;
        let mut tenants = 0;
        for priority in [Priority::Interactive, Priority::Batch] {
            if let Some(lane) = self.lane(priority, model) {
                mine += lane.fifo.get(&tenant).map_or(0, BTreeSet::len);
                tenants = tenants.max(lane.tenants.len());
            }
        }
        (mine, tenants)
    }

    /// Waiters of a model (any tenant, any priority).
    pub fn waiting_for(&self, model: Option<&ModelName>) -> usize {
        [Priority::Interactive, Priority::Batch]
            .iter()
            .filter_map(|p| self.lane(*p, model))
            .map(|l| l.len)
            .sum()
    }

    /// The arrival time of the oldest waiter of any tenant.
    pub fn oldest(&self) -> Option<Instant> {
        self.tenants.keys().filter_map(|t| self.oldest_of(*t)).min()
    }

    /// The arrival time of a tenant's oldest waiter.
    pub fn oldest_of(&self, tenant: TenantId) -> Option<Instant> {
        let t = self.tenants.get(&tenant)?;
        t.lanes
            .iter()
            .filter_map(|(p, m)| self.lane(*p, m.as_ref())?.fifo.get(&tenant)?.first())
            .filter_map(|a| self.by_arrival.get(a).map(|w| w.since))
            .min()
    }
}
