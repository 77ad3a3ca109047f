//! The backends with a free slot, indexed by model in preference order, so
//! that an arrival finds its backend without looking at the others. A
//! backend is re-indexed (a few set operations per model it lists) whenever
//! its slots, health, drain flag or models change; the index also counts the
//! healthy backends and remembers which gained a free slot since the last
//! hand-out.

use std::collections::{BTreeSet, HashMap};

use crate::fleet::backend::{Backend, BackendId};
use crate::model::ModelName;

/// Preference order among free backends: smaller first.
type Rank = (u32, u32, BackendId);

/// Where a backend sits in the index, to take it out again.
#[derive(Default)]
struct Entry {
    healthy: bool,
    any: Option<Rank>,
    models: Vec<(ModelName, Rank)>,
}

#[derive(Default)]
pub(super) struct FreeIndex {
    any: BTreeSet<Rank>,
    by_model: HashMap<ModelName, BTreeSet<Rank>>,
    entries: HashMap<BackendId, Entry>,
    /// Healthy backends (drained ones included).
    pub healthy: usize,
    /// Backends that gained a free slot since their last hand-out.
    pub dirty: BTreeSet<BackendId>,
}

impl FreeIndex {
    /// The free backends for `model` (any backend for `None`), best first.
    pub fn candidates(&self, model: Option<&ModelName>) -> impl Iterator<Item = &BackendId> {
        let ranks = match model {
            None => Some(&self.any),
            Some(m) => self.by_model.get(m),
        };
        ranks.into_iter().flatten().map(|(_, _, id)| id)
    }

    /// Puts backend `id` where its state says: `backend` is `None` when it
    /// left the table, `free` whether it can take a request now. With a cap,
    /// backends with the model loaded come first, then the fewest in flight,
    /// then the lowest id; without one, the fewest in flight first.
    pub fn update(
        &mut self,
        id: &BackendId,
        backend: Option<&Backend>,
        free: bool,
        uncapped: bool,
    ) {
        let mut entry = self.entries.remove(id).unwrap_or_default();
        if entry.healthy {
            self.healthy -= 1;
        }
        if let Some(rank) = entry.any.take() {
            self.any.remove(&rank);
        }
        for (model, rank) in entry.models.drain(..) {
            if let Some(set) = self.by_model.get_mut(&model) {
                set.remove(&rank);
                if set.is_empty() {
                    self.by_model.remove(&model);
                }
            }
        }
        let Some(b) = backend else {
            self.dirty.remove(id);
            return;
        };
        let rank = |loaded: bool| {
            let not_loaded = u32::from(!loaded);
            if uncapped {
                (b.in_flight + b.foreign, not_loaded, id.clone())
            } else {
                (not_loaded, b.in_flight + b.foreign, id.clone())
            }
        };
        entry.healthy = b.healthy;
        if b.healthy {
            self.healthy += 1;
        }
        if free {
            let r = rank(false);
            self.any.insert(r.clone());
            entry.any = Some(r);
            for model in &b.models {
                let r = rank(b.loaded.contains(model));
                self.by_model
                    .entry(model.clone())
                    .or_default()
                    .insert(r.clone());
                entry.models.push((model.clone(), r));
            }
            self.dirty.insert(id.clone());
        } else {
            self.dirty.remove(id);
        }
        self.entries.insert(id.clone(), entry);
    }
}
