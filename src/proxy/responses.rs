//! Stateful OpenAI Responses across a fleet. Each Ollama server keeps the
//! responses it produced in its own memory (OLLAMA_API_ADDENDUM.md §10), so a
//! request that continues one (`previous_response_id`) must go to that very
//! backend. corral remembers `response id → backend` from the answers it
//! relays, for [`TTL`] and at most [`CAPACITY`] ids (oldest first out); when
//! the backend is gone the client gets at once the 404 Ollama gives for an
//! unknown id.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::fleet::BackendId;

/// How long an id is remembered: Ollama keeps a response 30 minutes.
pub const TTL: Duration = Duration::from_secs(30 * 60);
/// Ids remembered at most.
pub const CAPACITY: usize = 65_536;

/// The body Ollama answers for an unknown or expired `previous_response_id`.
pub const NOT_FOUND_BODY: &str = r#"{"error":{"type":"invalid_request_error","code":"previous_response_not_found","param":"previous_response_id","message":"previous_response_id was not found or has expired; resend the full conversation"}}"#;

/// Which backend produced which response.
#[derive(Default)]
pub struct Owners {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, (BackendId, Instant)>,
    order: VecDeque<(String, Instant)>,
}

impl Owners {
    /// Remembers that `backend` produced response `id`.
    pub fn remember(&self, id: String, backend: BackendId) {
        self.remember_at(id, backend, Instant::now());
    }

    /// The backend that produced `id`, if it is remembered and fresh.
    pub fn owner(&self, id: &str) -> Option<BackendId> {
        self.owner_at(id, Instant::now())
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember_at(&self, id: String, backend: BackendId, now: Instant) {
        let mut inner = self.lock();
        inner.order.push_back((id.clone(), now));
        inner.by_id.insert(id, (backend, now));
        while let Some((oldest, at)) = inner.order.front().cloned() {
            let expired = now.duration_since(at) >= TTL;
            if !expired && inner.by_id.len() <= CAPACITY {
                break;
            }
            inner.order.pop_front();
            // A re-remembered id has a newer entry: keep that one.
            if inner.by_id.get(&oldest).is_some_and(|(_, t)| *t == at) {
                inner.by_id.remove(&oldest);
            }
        }
    }

    fn owner_at(&self, id: &str, now: Instant) -> Option<BackendId> {
        let inner = self.lock();
        let (backend, at) = inner.by_id.get(id)?;
        (now.duration_since(*at) < TTL).then(|| backend.clone())
    }
}

/// The `previous_response_id` of a Responses request body, if any.
pub fn previous_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Fields {
        previous_response_id: Option<serde_json::Value>,
    }
    let fields: Fields = serde_json::from_slice(body).ok()?;
    match fields.previous_response_id? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// The response id in the first bytes of a relayed answer: the first
/// `"id":"resp_…"` (the top-level `id` of a whole response, or that of the
/// `response` object of `response.created`, whose keys are sorted).
pub fn response_id(first: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"id\":\"resp_";
    let at = first.windows(KEY.len()).position(|w| w == KEY)? + KEY.len() - 5;
    let rest = &first[at..];
    let end = rest.iter().take(128).position(|b| *b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(port: u16) -> BackendId {
        BackendId::parse(&port.to_string())
    }

    #[test]
    fn ids_are_found_in_whole_and_streamed_answers() {
        assert_eq!(
            response_id(br#"{"id":"resp_482913","object":"response"}"#).as_deref(),
            Some("resp_482913")
        );
        let created = br#"event: response.created
data: {"response":{"background":false,"completed_at":null,"created_at":1,"error":null,"frequency_penalty":0,"id":"resp_7","incomplete_details":null},"sequence_number":0}"#;
        assert_eq!(response_id(created).as_deref(), Some("resp_7"));
        assert_eq!(response_id(br#"{"id":"msg_1"}"#), None);
        assert_eq!(response_id(br#"{"id":"resp_unterminated"#), None);
    }

    #[test]
    fn previous_ids_are_read_from_the_body() {
        assert_eq!(
            previous_id(br#"{"model":"m","previous_response_id":"resp_1"}"#).as_deref(),
            Some("resp_1")
        );
        assert_eq!(previous_id(br#"{"model":"m"}"#), None);
        assert_eq!(previous_id(br#"{"previous_response_id":null}"#), None);
        assert_eq!(previous_id(b"junk"), None);
    }

    #[test]
    fn owners_expire_after_the_ttl() {
        let owners = Owners::default();
        let t0 = Instant::now();
        owners.remember_at("resp_1".into(), b(1), t0);
        assert_eq!(owners.owner_at("resp_1", t0), Some(b(1)));
        let t1 = t0 + TTL - Duration::from_secs(1);
        owners.remember_at("resp_2".into(), b(2), t1);
        assert_eq!(owners.owner_at("resp_1", t1), Some(b(1)));
        let t2 = t0 + TTL;
        assert_eq!(owners.owner_at("resp_1", t2), None);
        assert_eq!(owners.owner_at("resp_2", t2), Some(b(2)));
        // The expired entry is dropped by the next insert.
        owners.remember_at("resp_3".into(), b(3), t2);
        assert_eq!(owners.len(), 2);
    }

    #[test]
    fn owners_are_bounded() {
        let owners = Owners::default();
        let now = Instant::now();
        for i in 0..CAPACITY + 10 {
            owners.remember_at(format!("resp_{i}"), b(1), now);
        }
        assert_eq!(owners.len(), CAPACITY);
        assert_eq!(owners.owner_at("resp_0", now), None);
        assert!(
            owners
                .owner_at(&format!("resp_{}", CAPACITY + 9), now)
                .is_some()
        );
    }
}
