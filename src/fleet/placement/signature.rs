//! A request's placement signature: its prompt cut into chained prefix block
//! hashes, its session signal and its runner context; and why it was placed
//! where it went.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::Value;

/// Bytes per prefix block.
pub const BLOCK_BYTES: usize = 256;
/// Headers that name a session.
const SESSION_HEADERS: [&str; 4] = [
    "x-session-id",
    "x-conversation-id",
    "x-chat-id",
    "x-corral-session",
];

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
    messages: Option<Vec<Value>>,
    prompt: Option<Value>,
    system: Option<Value>,
    /// OpenAI Responses: the system prompt.
    instructions: Option<Value>,
    /// OpenAI Responses: a string or a list of conversation items.
    input: Option<Value>,
    prompt_cache_key: Option<Value>,
    user: Option<Value>,
    options: Option<Options>,
}

#[derive(Deserialize)]
struct Options {
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
            chain = hash_of((chain, block));
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

    /// A prefix, a session or a runner context is at stake.
    pub fn matters(&self) -> bool {
        !self.blocks.is_empty() || self.session.is_some() || self.num_ctx.is_some()
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
