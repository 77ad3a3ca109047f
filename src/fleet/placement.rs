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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::backend::BackendId;
use crate::model::ModelName;

/// Bytes per prefix block.
pub const BLOCK_BYTES: usize = 256;
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
/// Headers that name a session.
const SESSION_HEADERS: [&str; 4] = [
    "x-session-id",
    "x-conversation-id",
    "x-chat-id",
    "x-corral-session",
];

/// How backends are chosen (`ROUTING`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Prefix, session and model warmth, bounded by load.
    #[default]
    CacheAware,
    /// Loaded model, then fewest in flight, then lowest port.
    LeastBusy,
}

/// What placement knows of one request.
#[derive(Debug, Default)]
pub struct Signature {
    /// Chained hashes of the prompt's full blocks.
    pub blocks: Vec<u64>,
    /// Prompt bytes (the rendered messages or prompt and system).
    pub bytes: usize,
    /// Hash of the session signal, if any.
    pub session: Option<u64>,
    /// `options.num_ctx`.
    pub num_ctx: Option<u64>,
    /// Why the request went where it went; written at each grant.
    pub placed: Mutex<Option<Placed>>,
}

impl Signature {
    /// A prefix, a session or a runner context is at stake.
    pub fn matters(&self) -> bool {
        !self.blocks.is_empty() || self.session.is_some() || self.num_ctx.is_some()
    }
}

/// Why a request went to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub reason: Reason,
    /// Prompt tokens the backend was expected to hold.
    pub expected_hit_tokens: u64,
    /// The model was not known to be loaded there (with that context).
    pub cold: bool,
}

/// The rule that chose a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The backend held the longest prompt prefix.
    Prefix,
    /// The session was last served there.
    Session,
    /// The model was loaded there (with the request's `num_ctx`).
    Model,
    /// Nothing worth keeping: fewest in flight.
    LeastBusy,
    /// It waited, and the queue gave it the first slot it could use.
    Queue,
}

impl Reason {
    /// Label value for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Prefix => "prefix",
            Reason::Session => "session",
            Reason::Model => "model",
            Reason::LeastBusy => "least_busy",
            Reason::Queue => "queue",
        }
    }
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    system: Option<Value>,
    /// OpenAI Responses: the system prompt.
    #[serde(default)]
    instructions: Option<Value>,
    /// OpenAI Responses: a string or a list of conversation items.
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    prompt_cache_key: Option<Value>,
    #[serde(default)]
    user: Option<Value>,
    #[serde(default)]
    options: Option<Options>,
}

#[derive(Deserialize)]
struct Options {
    #[serde(default)]
    num_ctx: Option<u64>,
}

impl Signature {
    /// The signature of a request body and its headers; `None` when the
    /// body is not a JSON object.
    pub fn of(body: &[u8], headers: &http::HeaderMap) -> Option<Signature> {
        let b: Body = serde_json::from_slice(body).ok()?;
        let mut text: Vec<u8> = Vec::new();
        let mut push = |v: &Value| match v {
            Value::String(s) => text.extend_from_slice(s.as_bytes()),
            other => text.extend_from_slice(other.to_string().as_bytes()),
        };
        for s in [&b.system, &b.instructions].into_iter().flatten() {
            push(s);
            push(&Value::String("\u{1f}".into()));
        }
        let items = match &b.input {
            Some(Value::Array(items)) => items.as_slice(),
            _ => &[],
        };
        for m in b.messages.iter().flatten().chain(items) {
            if let Some(role) = m.get("role") {
                push(role);
            }
            push(&Value::String("\u{1e}".into()));
            if let Some(c) = m.get("content") {
                push(c);
            }
            push(&Value::String("\u{1f}".into()));
        }
        if let Some(p) = &b.prompt {
            push(p);
        }
        if let Some(i @ Value::String(_)) = &b.input {
            push(i);
        }
        let session = headers
            .iter()
            .find(|(k, _)| SESSION_HEADERS.contains(&k.as_str()))
            .map(|(_, v)| hash_of(v.as_bytes()))
            .or_else(|| b.prompt_cache_key.as_ref().map(|v| hash_of(v.to_string())))
            .or_else(|| b.user.as_ref().map(|v| hash_of(v.to_string())));
        let num_ctx = b.options.and_then(|o| o.num_ctx);
        let mut blocks = Vec::with_capacity(text.len() / BLOCK_BYTES);
        let mut chain = 0u64;
        for block in text.chunks_exact(BLOCK_BYTES) {
            let mut h = DefaultHasher::new();
            (chain, block).hash(&mut h);
            chain = h.finish();
            blocks.push(chain);
        }
        Some(Signature {
            blocks,
            bytes: text.len(),
            session,
            num_ctx,
            placed: Mutex::new(None),
        })
    }

    /// What the last grant decided.
    pub fn placed(&self) -> Option<Placed> {
        *self.placed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn hash_of(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A bounded set of block hashes, least recently used out first.
#[derive(Debug)]
pub struct PrefixIndex {
    capacity: usize,
    tick: u64,
    blocks: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl PrefixIndex {
    /// An empty index of at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            blocks: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// Leading blocks of `blocks` present.
    pub fn matched(&self, blocks: &[u64]) -> usize {
        blocks
            .iter()
            .take_while(|b| self.blocks.contains_key(b))
            .count()
    }

    /// Remembers `blocks` as just used, evicting the oldest beyond capacity.
    pub fn insert(&mut self, blocks: &[u64]) {
        for b in blocks {
            self.tick += 1;
            if let Some(old) = self.blocks.insert(*b, self.tick) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(self.tick, *b);
        }
        while self.blocks.len() > self.capacity {
            let Some((_, b)) = self.by_age.pop_first() else {
                break;
            };
            self.blocks.remove(&b);
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

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

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// This backend (free).
    Go(BackendId, Placed),
    /// A busy backend is cheaper than any free one: wait for a slot.
    Wait,
}

/// Placement state of the fleet.
#[derive(Debug)]
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
    /// Empty memory.
    pub fn new(routing: Routing) -> Self {
        Self {
            routing,
            load_cost: Duration::ZERO,
            backends: HashMap::new(),
            sessions: HashMap::new(),
            session_age: BTreeMap::new(),
            session_tick: 0,
        }
    }

    /// The routing rule.
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
        let Observed {
            prompt_tokens,
            prompt_ns,
            service,
            load,
        } = *seen;
        if let Some(load) = load {
            self.load_cost = if self.load_cost.is_zero() {
                load
            } else {
                self.load_cost.mul_f64(0.7) + load.mul_f64(0.3)
            };
        }
        let m = self.backends.entry(id.clone()).or_insert_with(Memory::new);
        if prompt_tokens >= 64 && prompt_ns > 0 {
            let speed = prompt_tokens as f64 / (prompt_ns as f64 / 1e9);
            m.prompt_speed = 0.8 * m.prompt_speed + 0.2 * speed;
        }
        m.service = m.service.mul_f64(0.8) + service.mul_f64(0.2);
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
        let is_cold = |id: &BackendId| {
            let c = candidates.iter().find(|c| c.id == id);
            let probed = c.is_some_and(|c| c.probed_loaded) && num_ctx.is_none();
            model.is_some() && !probed && !self.memory(id).is_some_and(|m| m.warm(model, num_ctx))
        };
        let plain = |id: &BackendId| {
            let placed = Placed {
                reason: Reason::LeastBusy,
                expected_hit_tokens: 0,
                cold: is_cold(id),
            };
            Choice::Go(id.clone(), placed)
        };
        let Some(sig) = sig.filter(|_| self.routing == Routing::CacheAware) else {
            return least_busy.map_or(Choice::Wait, plain);
        };
        if !sig.matters() {
            // Only the model's warmth is at stake: the least-busy choice
            // stands unless it would load the model.
            let cold = least_busy.is_some_and(is_cold);
            if !cold || self.load_cost < WORTH {
                return least_busy.map_or(Choice::Wait, plain);
            }
        }
        // The waiters for this model, spread over the backends that could serve them.
        let queued = queued / candidates.len().max(1);
        let costs: Vec<(Duration, Placed, &Candidate<'_>)> = candidates
            .iter()
            .map(|c| {
                let (t, p) = self.cost(c, sig, model, queued);
                (t, p, c)
            })
            .collect();
        let best_free = costs
            .iter()
            .filter(|(_, _, c)| c.free)
            .min_by_key(|(t, _, _)| *t);
        let best_busy = costs
            .iter()
            .filter(|(_, _, c)| !c.free)
            .min_by_key(|(t, _, _)| *t);
        let Some(lb) = least_busy else {
            return Choice::Wait;
        };
        let (lb_cost, lb_placed) = costs
            .iter()
            .find(|(_, _, c)| c.id == lb)
            .map_or((Duration::MAX, None), |(t, p, _)| (*t, Some(*p)));
        let mut choice = (lb_cost, lb.clone(), lb_placed);
        if let Some((t, p, c)) = best_free
            && *t + WORTH < lb_cost
        {
            choice = (*t, c.id.clone(), Some(*p));
        }
        if let Some((t, _, _)) = best_busy
            && *t + WORTH < choice.0
        {
            return Choice::Wait;
        }
        let placed = choice.2.map_or(
            Placed {
                reason: Reason::LeastBusy,
                expected_hit_tokens: 0,
                cold: false,
            },
            |p| {
                if choice.1 == *lb && p.expected_hit_tokens == 0 && !p.cold {
                    Placed {
                        reason: Reason::LeastBusy,
                        ..p
                    }
                } else {
                    p
                }
            },
        );
        Choice::Go(choice.1, placed)
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
mod tests {
    use super::*;

    fn chat(system: &str, turns: &[&str]) -> Vec<u8> {
        let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
        for t in turns {
            messages.push(serde_json::json!({"role": "user", "content": t}));
        }
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
    }

    fn sig(body: &[u8]) -> Signature {
        Signature::of(body, &http::HeaderMap::new()).expect("a signature")
    }

    fn free(id: &BackendId) -> Candidate<'_> {
        Candidate {
            id,
            free: true,
            ahead: 0,
            probed_loaded: true,
        }
    }

    #[test]
    fn a_responses_conversation_shares_its_prefix_from_turn_to_turn() {
        let turn = |n: usize| {
            let input: Vec<Value> = (0..n)
                .map(|i| serde_json::json!({"role": "user", "content": format!("question {i}")}))
                .collect();
            let body = serde_json::json!({
                "model": "m",
                "instructions": "i".repeat(2_000),
                "input": input,
            });
            sig(&serde_json::to_vec(&body).unwrap())
        };
        let (a, b) = (turn(1), turn(2));
        assert!(
            a.blocks.len() >= 7,
            "instructions are hashed: {}",
            a.blocks.len()
        );
        assert!(b.bytes > a.bytes, "input items are hashed");
        assert_eq!(a.blocks[..], b.blocks[..a.blocks.len()]);
        let plain = serde_json::json!({"model": "m", "input": "x".repeat(600)});
        assert_eq!(sig(&serde_json::to_vec(&plain).unwrap()).bytes, 600);
    }

    #[test]
    fn short_prompts_without_session_have_nothing_at_stake() {
        let body = br#"{"model":"m","prompt":"hello"}"#;
        assert!(!sig(body).matters());
        let mut h = http::HeaderMap::new();
        h.insert("x-session-id", "abc".parse().unwrap());
        assert!(Signature::of(body, &h).unwrap().matters());
        let keyed = br#"{"model":"m","prompt":"hi","prompt_cache_key":"k"}"#;
        assert!(sig(keyed).matters());
        assert!(Signature::of(b"[1]", &http::HeaderMap::new()).is_none());
    }

    #[test]
    fn a_cold_least_busy_choice_waits_for_a_warm_backend_once_loads_are_known_slow() {
        let mut p = Placement::new(Routing::CacheAware);
        let (a, b) = (BackendId::Port(1), BackendId::Port(2));
        let model = ModelName::parse("m");
        p.routed(&b, None, Some(&model));
        let s = sig(br#"{"model":"m","prompt":"hi"}"#);
        let busy_b = Candidate {
            id: &b,
            free: false,
            ahead: 0,
            probed_loaded: false,
        };
        let cold_a = Candidate {
            probed_loaded: false,
            ..free(&a)
        };
        let cands = [cold_a, busy_b];
        let go_a = |c: Choice| matches!(c, Choice::Go(id, _) if id == a);
        assert!(go_a(p.choose(Some(&s), Some(&model), &cands, Some(&a), 0)));
        let slow_load = Observed {
            service: Duration::from_millis(200),
            load: Some(Duration::from_secs(3)),
            ..Observed::default()
        };
        p.observed(&b, &slow_load);
        assert_eq!(
            p.choose(Some(&s), Some(&model), &cands, Some(&a), 0),
            Choice::Wait
        );
        // A long queue for the model justifies loading it on another backend.
        assert!(go_a(p.choose(Some(&s), Some(&model), &cands, Some(&a), 40)));
    }

    #[test]
    fn a_longer_conversation_extends_the_blocks_of_the_shorter() {
        let long = "x".repeat(2000);
        let a = sig(&chat(&long, &["first"]));
        let b = sig(&chat(&long, &["first", "second"]));
        assert!(a.blocks.len() >= 7);
        assert_eq!(a.blocks[..], b.blocks[..a.blocks.len()]);
        let other = sig(&chat(&"y".repeat(2000), &["first"]));
        assert_ne!(a.blocks[0], other.blocks[0]);
    }

    #[test]
    fn the_index_is_bounded_and_forgets_the_least_recently_used() {
        let mut index = PrefixIndex::new(4);
        index.insert(&[1, 2, 3]);
        index.insert(&[10, 11]);
        assert_eq!(index.len(), 4);
        assert_eq!(index.matched(&[1, 2, 3]), 0, "block 1 went first");
        assert_eq!(index.matched(&[10, 11, 12]), 2);
        index.insert(&[2, 3]);
        index.insert(&[20]);
        assert_eq!(index.len(), 4);
        assert_eq!(index.matched(&[10, 11]), 0);
        assert!(!index.is_empty());
    }

    #[test]
    fn the_backend_holding_the_prefix_wins_and_a_replaced_one_starts_empty() {
        let mut p = Placement::new(Routing::CacheAware);
        let (a, b) = (BackendId::Port(1), BackendId::Port(2));
        let long = "x".repeat(4000);
        let turn1 = sig(&chat(&long, &["first"]));
        p.routed(&b, Some(&turn1), None);
        let turn2 = sig(&chat(&long, &["first", "second"]));
        let cands = [free(&a), free(&b)];
        match p.choose(Some(&turn2), None, &cands, Some(&a), 0) {
            Choice::Go(id, placed) => {
                assert_eq!(id, b);
                assert_eq!(placed.reason, Reason::Prefix);
                assert!(placed.expected_hit_tokens >= 900, "{placed:?}");
            }
            other => panic!("{other:?}"),
        }
        p.forget(&b);
        assert_eq!(p.indexed_blocks(&b), 0);
        assert_eq!(
            p.choose(Some(&turn2), None, &cands, Some(&a), 0),
            Choice::Go(
                a.clone(),
                Placed {
                    reason: Reason::LeastBusy,
                    expected_hit_tokens: 0,
                    cold: false
                }
            )
        );
    }

    #[test]
    fn least_busy_mode_and_missing_signatures_keep_the_old_rule() {
        let mut p = Placement::new(Routing::LeastBusy);
        let (a, b) = (BackendId::Port(1), BackendId::Port(2));
        let s = sig(&chat(&"x".repeat(4000), &["q"]));
        p.routed(&b, Some(&s), None);
        let cands = [free(&a), free(&b)];
        let go_a = |c: Choice| matches!(c, Choice::Go(id, _) if id == a);
        assert!(go_a(p.choose(Some(&s), None, &cands, Some(&a), 0)));
        let p = Placement::new(Routing::CacheAware);
        assert!(go_a(p.choose(None, None, &cands, Some(&a), 0)));
    }

    #[test]
    fn a_busy_affine_backend_is_waited_for_only_when_cheaper() {
        let mut p = Placement::new(Routing::CacheAware);
        let (a, b) = (BackendId::Port(1), BackendId::Port(2));
        // 40 kB of shared prefix: about 10k tokens, 5 s to recompute.
        let s = sig(&chat(&"x".repeat(40_000), &["q"]));
        p.routed(&b, Some(&s), None);
        let quick = Observed {
            service: Duration::from_millis(100),
            ..Observed::default()
        };
        p.observed(&b, &quick);
        let cands = [
            free(&a),
            Candidate {
                id: &b,
                free: false,
                ahead: 0,
                probed_loaded: true,
            },
        ];
        assert_eq!(p.choose(Some(&s), None, &cands, Some(&a), 0), Choice::Wait);
        // A short prefix is cheaper to recompute than the wait.
        let short = sig(&chat(&"y".repeat(600), &["q"]));
        p.routed(&b, Some(&short), None);
        assert!(matches!(
            p.choose(Some(&short), None, &cands, Some(&a), 0),
            Choice::Go(id, _) if id == a
        ));
    }

    #[test]
    fn a_warm_model_with_the_same_context_is_preferred() {
        let mut p = Placement::new(Routing::CacheAware);
        let (a, b) = (BackendId::Port(1), BackendId::Port(2));
        let model = ModelName::parse("m");
        let ps = |ctx: u64| vec![serde_json::json!({"name": "m:latest", "context_length": ctx})];
        p.probed(&a, &ps(4096));
        p.probed(&b, &ps(8192));
        let load = Observed {
            load: Some(Duration::from_secs(2)),
            ..Observed::default()
        };
        p.observed(&a, &load);
        let body = br#"{"model":"m","prompt":"hi","options":{"num_ctx":8192}}"#;
        let s = sig(body);
        let cands = [free(&a), free(&b)];
        match p.choose(Some(&s), Some(&model), &cands, Some(&a), 0) {
            Choice::Go(id, placed) => {
                assert_eq!(id, b);
                assert!(!placed.cold);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sessions_stick_and_are_forgotten_with_their_backend() {
        let mut p = Placement::new(Routing::CacheAware);
        let (a, b) = (BackendId::Port(1), BackendId::Port(2));
        let mut h = http::HeaderMap::new();
        h.insert("x-session-id", "s1".parse().unwrap());
        let first = Signature::of(&chat(&"z".repeat(3000), &["q"]), &h).unwrap();
        p.routed(&b, Some(&first), None);
        // Same session, a prompt whose bytes share no block (say, re-rendered).
        let next = Signature::of(&chat(&"w".repeat(3000), &["q"]), &h).unwrap();
        let cands = [free(&a), free(&b)];
        match p.choose(Some(&next), None, &cands, Some(&a), 0) {
            Choice::Go(id, placed) => {
                assert_eq!((id, placed.reason), (b.clone(), Reason::Session));
            }
            other => panic!("{other:?}"),
        }
        p.forget(&b);
        assert!(p.sessions.is_empty() && p.session_age.is_empty());
    }

    #[test]
    fn sessions_are_bounded_oldest_out() {
        let mut p = Placement::new(Routing::CacheAware);
        let b = BackendId::Port(2);
        for n in 0..SESSIONS as u64 + 10 {
            let s = Signature {
                session: Some(n),
                ..Signature::default()
            };
            p.routed(&b, Some(&s), None);
        }
        assert_eq!(p.sessions.len(), SESSIONS);
        assert_eq!(p.session_age.len(), SESSIONS);
        assert!(!p.sessions.contains_key(&0) && p.sessions.contains_key(&(SESSIONS as u64 + 9)));
    }
}
