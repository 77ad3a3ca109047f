//! Cache-aware placement (ROUTING=cache-aware), sans-io: which backend most
//! likely holds a request's prompt prefix and its model (with the same
//! runner context), and whether waiting for it beats recomputing elsewhere.
//!
//! What a backend holds is learned from what corral itself routed there: a
//! bounded index of prefix block hashes per backend (the request's prompt
//! bytes cut into [`BLOCK_BYTES`] blocks, each hash chained to the one
//! before, so block `i` present means the prefix up to it is), evicted least
//! recently used as a backend's cache would be; explicit session signals
//! (`prompt_cache_key`, `user`, `X-Session-Id`-style headers); and the models
//! each backend has loaded (`/api/ps` at every probe, and every routing since).
//! No tokenizer is needed: tokens are estimated from bytes.
//!
//! The cost of a backend is the estimated time to the request's first token:
//! the queue ahead of it (measured service time), the prompt tokens it lacks
//! (at its measured prompt speed) and a model load where the model is not
//! loaded with the request's context (at the measured load time, zero until
//! a load was seen). Where no prefix worth keeping is at stake (under a
//! block of prompt, no session, no `num_ctx`) and the least-busy choice has
//! the model warm, the least-busy rule decides alone; so does a choice that
//! would save less than [`WORTH`].

mod prefix;
mod signature;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde_json::Value;

use super::backend::BackendId;
use crate::model::ModelName;
/// Re-exported where the proxy has always found it.
pub use crate::policy::Routing;

pub use prefix::PrefixIndex;
pub use signature::{BLOCK_BYTES, Placed, Reason, Signature};

/// Prefix blocks remembered per backend (about 256k tokens of prompts).
pub const INDEX_BLOCKS: usize = 4096;
/// Scans a routed model is believed loaded without a probe showing it.
const PENDING_PROBES: u32 = 8;
/// Sessions remembered.
const SESSIONS: usize = 65_536;
/// Estimated tokens per byte before any backend reported.
const TOKENS_PER_BYTE: f64 = 0.25;
/// Prompt tokens per second assumed before a backend reported its speed.
const DEFAULT_PROMPT_SPEED: f64 = 2000.0;
/// Time a request is assumed to hold a slot before any was measured.
const DEFAULT_SERVICE: Duration = Duration::from_secs(1);
/// Estimated savings below this leave the choice to the least-busy rule.
const WORTH: Duration = Duration::from_millis(25);

/// What placement remembers of one backend.
#[derive(Debug)]
struct Memory {
    index: PrefixIndex,
    /// Loaded models, most recently used first, with the runner's context.
    models: VecDeque<(ModelName, Option<u64>)>,
    /// Models it was seen holding at once (its OLLAMA_MAX_LOADED_MODELS, as far as known).
    model_room: usize,
    /// Models routed there that no probe has shown loaded yet (a load takes
    /// longer than a scan), with the probes passed since.
    pending: Vec<(ModelName, Option<u64>, u32)>,
    prompt_speed: f64,
    service: Duration,
}

impl Memory {
    fn new() -> Self {
        Self {
            index: PrefixIndex::new(INDEX_BLOCKS),
            models: VecDeque::new(),
            pending: Vec::new(),
            model_room: 1,
            prompt_speed: DEFAULT_PROMPT_SPEED,
            service: DEFAULT_SERVICE,
        }
    }

    fn warm(&self, model: Option<&ModelName>, num_ctx: Option<u64>) -> bool {
        let Some(model) = model else { return true };
        self.models
            .iter()
            .any(|(m, ctx)| m == model && (num_ctx.is_none() || *ctx == num_ctx))
    }
}

/// What a response told about its backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    /// `prompt_eval_count`.
    pub prompt_tokens: u64,
    /// `prompt_eval_duration`.
    pub prompt_ns: u64,
    /// Time the request held its slot.
    pub service: Duration,
    /// `load_duration` of a request placed where its model was cold.
    pub load: Option<Duration>,
}

/// One candidate backend as the scheduler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a BackendId,
    /// A slot is free now.
    pub free: bool,
    /// Requests it is already working on that come before this one (its
    /// in-flight count when there is no cap, so the backend queues them).
    pub ahead: u32,
    /// The last probe listed the model as loaded.
    pub probed_loaded: bool,
}

/// A candidate with its estimated time to the first token.
struct Costed<'c> {
    id: &'c BackendId,
    free: bool,
    time: Duration,
    placed: Placed,
}

/// How the least-busy rule's choice is recorded.
fn least_busy_placed(cold: bool) -> Placed {
    Placed {
        reason: Reason::LeastBusy,
        expected_hit_tokens: 0,
        cold,
    }
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// This backend (free).
    Go(BackendId, Placed),
    /// A busy backend is cheaper than any free one: wait for a slot.
    Wait,
}

/// Placement state of the fleet.
#[derive(Debug, Default)]
pub struct Placement {
    routing: Routing,
    /// Measured model load time (zero until a load was seen).
    load_cost: Duration,
    backends: HashMap<BackendId, Memory>,
    /// Session → (backend, blocks of its last request, tick).
    sessions: HashMap<u64, (BackendId, usize, u64)>,
    /// Sessions by tick, oldest first, to drop beyond [`SESSIONS`].
    session_age: BTreeMap<u64, u64>,
    session_tick: u64,
}

impl Placement {
    pub fn new(routing: Routing) -> Self {
        Self {
            routing,
            ..Self::default()
        }
    }

    pub fn routing(&self) -> Routing {
        self.routing
    }

    /// Forgets what a backend held (another server took its port, or it is gone).
    pub fn forget(&mut self, id: &BackendId) {
        self.backends.remove(id);
        let age = &mut self.session_age;
        self.sessions.retain(|_, (b, _, tick)| {
            if b == id {
                age.remove(tick);
            }
            b != id
        });
    }

    /// Blocks remembered for a backend.
    pub fn indexed_blocks(&self, id: &BackendId) -> usize {
        self.backends.get(id).map_or(0, |m| m.index.len())
    }

    /// A probe listed these loaded models (`/api/ps` entries).
    pub fn probed(&mut self, id: &BackendId, ps: &[Value]) {
        let m = self.backends.entry(id.clone()).or_insert_with(Memory::new);
        m.models = ps
            .iter()
            .filter_map(|e| {
                let name = e.get("name").or_else(|| e.get("model"))?.as_str()?;
                let ctx = e.get("context_length").and_then(Value::as_u64);
                Some((ModelName::parse(name), ctx))
            })
            .collect();
        m.model_room = m.model_room.max(m.models.len());
        let shown = m.models.clone();
        m.pending.retain_mut(|(name, ctx, probes)| {
            *probes += 1;
            let loaded = shown
                .iter()
                .any(|(n, c)| n == name && (ctx.is_none() || c == ctx));
            !loaded && *probes <= PENDING_PROBES
        });
        for (name, ctx, _) in m.pending.iter().rev() {
            m.models.retain(|(n, _)| n != name);
            m.models.push_front((name.clone(), *ctx));
        }
        m.models.truncate(m.model_room);
    }

    /// A response came back: learn the backend's prompt speed and service
    /// time, and the load time when the model was expected cold there.
    pub fn observed(&mut self, id: &BackendId, seen: &Observed) {
        let (tokens, ns) = (seen.prompt_tokens, seen.prompt_ns);
        if let Some(load) = seen.load {
            self.load_cost = if self.load_cost.is_zero() {
                load
            } else {
                self.load_cost.mul_f64(0.7) + load.mul_f64(0.3)
            };
        }
        let m = self.backends.entry(id.clone()).or_insert_with(Memory::new);
        if tokens >= 64 && ns > 0 {
            let speed = tokens as f64 / (ns as f64 / 1e9);
            m.prompt_speed = 0.8 * m.prompt_speed + 0.2 * speed;
        }
        m.service = m.service.mul_f64(0.8) + seen.service.mul_f64(0.2);
    }

    fn memory(&self, id: &BackendId) -> Option<&Memory> {
        self.backends.get(id)
    }

    /// Expected prompt tokens `id` holds for `sig`, and whether the session says so.
    fn hit(&self, id: &BackendId, sig: &Signature) -> (u64, bool) {
        let blocks = self.memory(id).map_or(0, |m| m.index.matched(&sig.blocks));
        let session = sig
            .session
            .and_then(|s| self.sessions.get(&s))
            .filter(|(b, _, _)| b == id)
            .map(|(_, n, _)| *n);
        let by_session = session.is_some_and(|n| n > blocks);
        let blocks = blocks.max(session.unwrap_or(0)).min(sig.blocks.len());
        let tokens = (blocks * BLOCK_BYTES) as f64 * TOKENS_PER_BYTE;
        (tokens as u64, by_session)
    }

    /// Loading another model on `id` would evict the only loaded copy of one.
    fn evicts_last_copy(&self, id: &BackendId) -> bool {
        let Some(m) = self.memory(id) else {
            return false;
        };
        if m.models.len() < m.model_room {
            return false;
        }
        let Some((victim, _)) = m.models.back() else {
            return false;
        };
        !self
            .backends
            .iter()
            .any(|(other, o)| other != id && o.models.iter().any(|(n, _)| n == victim))
    }

    /// Estimated time for `c` to reach the request's first token.
    fn cost(
        &self,
        c: &Candidate<'_>,
        sig: &Signature,
        model: Option<&ModelName>,
        queued: usize,
    ) -> (Duration, Placed) {
        let mem = self.memory(c.id);
        let speed = mem
            .map_or(DEFAULT_PROMPT_SPEED, |m| m.prompt_speed)
            .max(1.0);
        let service = mem.map_or(DEFAULT_SERVICE, |m| m.service);
        let (hit, by_session) = self.hit(c.id, sig);
        let total = (sig.bytes as f64 * TOKENS_PER_BYTE) as u64;
        let miss = total.saturating_sub(hit);
        let warm = mem.map_or(c.probed_loaded && sig.num_ctx.is_none(), |m| {
            m.warm(model, sig.num_ctx)
        }) || (c.probed_loaded && sig.num_ctx.is_none());
        let mut t = Duration::from_secs_f64(miss as f64 / speed);
        if !warm {
            t += self.load_cost;
            if self.evicts_last_copy(c.id) {
                // That model will need a load of its own when it is asked for again.
                t += self.load_cost;
            }
        }
        t += if c.free {
            service * c.ahead
        } else {
            service.mul_f64(1.0 + queued as f64)
        };
        let reason = if by_session {
            Reason::Session
        } else if hit > 0 {
            Reason::Prefix
        } else {
            Reason::Model
        };
        let placed = Placed {
            reason,
            expected_hit_tokens: hit,
            cold: !warm,
        };
        (t, placed)
    }

    /// Chooses among eligible backends. `least_busy` is the least-busy
    /// rule's choice among the free ones; `queued` counts the requests
    /// already waiting for the same model. Without a signature, or in
    /// least-busy mode, or when no free backend saves [`WORTH`] over the
    /// least-busy one, the least-busy choice stands.
    pub fn choose(
        &self,
        sig: Option<&Signature>,
        model: Option<&ModelName>,
        candidates: &[Candidate<'_>],
        least_busy: Option<&BackendId>,
        queued: usize,
    ) -> Choice {
        let num_ctx = sig.and_then(|s| s.num_ctx);
        let is_cold = |id: &BackendId| self.is_cold(id, model, num_ctx, candidates);
        let plain = || {
            least_busy.map_or(Choice::Wait, |id| {
                Choice::Go(id.clone(), least_busy_placed(is_cold(id)))
            })
        };
        let Some(sig) = sig.filter(|_| self.routing == Routing::CacheAware) else {
            return plain();
        };
        // Only the model's warmth at stake: the least-busy choice stands
        // unless it would load the model.
        if !sig.matters() && (self.load_cost < WORTH || !least_busy.is_some_and(is_cold)) {
            return plain();
        }
        let Some(lb) = least_busy else {
            return Choice::Wait;
        };
        // The waiters for this model, spread over the backends that could serve them.
        let queued = queued / candidates.len().max(1);
        let costs: Vec<Costed<'_>> = candidates
            .iter()
            .map(|c| {
                let (time, placed) = self.cost(c, sig, model, queued);
                Costed {
                    id: c.id,
                    free: c.free,
                    time,
                    placed,
                }
            })
            .collect();
        let cheapest = |free: bool| {
            costs
                .iter()
                .filter(|c| c.free == free)
                .min_by_key(|c| c.time)
        };
        let time = |c: Option<&Costed<'_>>| c.map_or(Duration::MAX, |c| c.time);
        let mut chosen = costs.iter().find(|c| c.id == lb);
        if let Some(free) = cheapest(true).filter(|f| f.time + WORTH < time(chosen)) {
            chosen = Some(free);
        }
        if cheapest(false).is_some_and(|busy| busy.time + WORTH < time(chosen)) {
            return Choice::Wait;
        }
        match chosen {
            // The least-busy backend, for no prefix and no load saved.
            Some(c) if !(c.id == lb && c.placed.expected_hit_tokens == 0 && !c.placed.cold) => {
                Choice::Go(c.id.clone(), c.placed)
            }
            _ => Choice::Go(lb.clone(), least_busy_placed(false)),
        }
    }

    /// Whether `model` (with `num_ctx`) would have to be loaded on `id`.
    fn is_cold(
        &self,
        id: &BackendId,
        model: Option<&ModelName>,
        num_ctx: Option<u64>,
        candidates: &[Candidate<'_>],
    ) -> bool {
        let c = candidates.iter().find(|c| c.id == id);
        let probed = c.is_some_and(|c| c.probed_loaded) && num_ctx.is_none();
        model.is_some() && !probed && !self.memory(id).is_some_and(|m| m.warm(model, num_ctx))
    }

    /// Why a waiter handed a slot of `id` by the queue went there, with what
    /// `id` was expected to hold of its prompt.
    pub fn queued(&self, id: &BackendId, sig: &Signature, model: Option<&ModelName>) -> Placed {
        let warm = self.memory(id).is_some_and(|m| m.warm(model, sig.num_ctx));
        Placed {
            reason: Reason::Queue,
            expected_hit_tokens: self.hit(id, sig).0,
            cold: model.is_some() && !warm,
        }
    }

    /// The request is now on `id`: remember its prefix, session and model there.
    pub fn routed(&mut self, id: &BackendId, sig: Option<&Signature>, model: Option<&ModelName>) {
        let m = self.backends.entry(id.clone()).or_insert_with(Memory::new);
        if let Some(model) = model {
            let ctx = sig.and_then(|s| s.num_ctx);
            let known = m.models.iter().position(|(n, _)| n == model);
            let warm = known.is_some_and(|i| ctx.is_none() || m.models[i].1 == ctx);
            if !warm {
                m.pending.retain(|(n, _, _)| n != model);
                m.pending.push((model.clone(), ctx, 0));
            }
            let old_ctx = known.and_then(|i| m.models.remove(i)).and_then(|(_, c)| c);
            m.models.push_front((model.clone(), ctx.or(old_ctx)));
            m.models.truncate(m.model_room.max(1));
        }
        let Some(sig) = sig else { return };
        m.index.insert(&sig.blocks);
        if let Some(s) = sig.session {
            self.session_tick += 1;
            let tick = self.session_tick;
            if let Some((_, _, old)) = self
                .sessions
                .insert(s, (id.clone(), sig.blocks.len(), tick))
            {
                self.session_age.remove(&old);
            }
            self.session_age.insert(tick, s);
            while self.sessions.len() > SESSIONS {
                let Some((_, oldest)) = self.session_age.pop_first() else {
                    break;
                };
                self.sessions.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests;
