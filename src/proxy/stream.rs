//! The response body relayed to the client. It owns the request's
//! [`Claim`] (its slot) until the backend's body ends or the client goes away (dropping it closes
//! the backend connection, which stops the generation), passes every chunk on
//! as it arrives, and ends a stream that breaks after its first byte the way
//! the client can see: an `{"error": ...}` line for NDJSON, an error event for
//! SSE, an aborted connection for a plain body. A body that ends cleanly but
//! is not a whole answer (an `{"error": ...}` line under a 200, an SSE stream
//! without its terminal event) is counted as broken and relayed as it is:
//! corral never invents a terminal event.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::time::Instant;

use super::claim::Claim;
use super::upstream::{BackendBody, FailureKind};
use crate::fleet::placement::{Observed, Placed};
use crate::metrics::{EndpointLabels, Metrics};

/// How a response body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
    /// `text/event-stream`: `data: ...` events.
    Sse,
    /// Anything else: one document.
    Plain,
}

impl Framing {
    /// The framing of a response with this `Content-Type`.
    pub fn of(content_type: Option<&http::HeaderValue>) -> Self {
        let ct = content_type
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if ct.starts_with("application/x-ndjson") {
            Self::Ndjson
        } else if ct.starts_with("text/event-stream") {
            Self::Sse
        } else {
            Self::Plain
        }
    }

    /// The last chunk that tells the client the stream broke, if the
    /// framing has one: an `{"error"}` line, an error event in the shape of
    /// the endpoint's API (Anthropic's and the Responses API's own `error`
    /// events; OpenAI's error object elsewhere). Never a terminal event.
    fn error_chunk(self, endpoint: &str, message: &str) -> Option<Bytes> {
        match self {
            Self::Ndjson => Some(Bytes::from(format!("{}\n", json!({ "error": message })))),
            Self::Sse if endpoint == "/v1/messages" => {
                let event = json!({ "type": "error", "error": { "type": "api_error", "message": message } });
                Some(Bytes::from(format!("event: error\ndata: {event}\n\n")))
            }
            Self::Sse if endpoint == "/v1/responses" => {
                let event = json!({ "type": "error", "code": "api_error", "message": message, "param": null });
                Some(Bytes::from(format!("event: error\ndata: {event}\n\n")))
            }
            Self::Sse => {
                let event = json!({ "error": { "message": message, "type": "api_error", "param": null, "code": null } });
                Some(Bytes::from(format!("data: {event}\n\n")))
            }
            Self::Plain => None,
        }
    }
}

/// Who asked what, and how the proxy got it answered: the fields of the
/// request log line that the metrics do not need.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// The request's `X-Request-Id`.
    pub request_id: Option<http::HeaderValue>,
    /// The HTTP method.
    pub method: http::Method,
    /// The request path, without the query.
    pub path: &'static str,
    /// The backend that answered.
    pub backend: Arc<str>,
    /// Attempts made, this one included.
    pub attempts: u32,
    /// Time spent waiting for slots, over all attempts.
    pub queue_wait: Duration,
    /// Why cache-aware placement chose the backend, and the prompt's
    /// estimated size in tokens; `None` when the least-busy rule did alone.
    pub placed: Option<(Placed, u64)>,
}

/// How a relayed response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The backend's body ended cleanly.
    Complete,
    /// The backend broke or went silent after the first byte.
    Broken,
    /// The client went away before the end.
    ClientGone,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Broken => "broken",
            Self::ClientGone => "client_gone",
        }
    }
}

/// What the relay records when the response is over, however it ends: the
/// metrics and one INFO line `request done`.
pub struct Ledger {
    /// The metrics to record into.
    pub metrics: Arc<Metrics>,
    /// The route path.
    pub endpoint: &'static str,
    /// The model label.
    pub model: Arc<str>,
    /// The status sent to the client.
    pub status: u16,
    /// When the request arrived.
    pub started: Instant,
    /// The request log's fields.
    pub info: RequestInfo,
    outcome: Outcome,
    /// The last bytes of the body, where the final chunk's counts are.
    tail: Vec<u8>,
}

/// Bytes of the body's end kept for the token counts.
const TAIL: usize = 16 << 10;

impl Ledger {
    /// A ledger for a response that is starting.
    pub fn new(
        metrics: Arc<Metrics>,
        endpoint: &'static str,
        model: Arc<str>,
        status: u16,
        started: Instant,
        info: RequestInfo,
    ) -> Self {
        Self {
            metrics,
            endpoint,
            model,
            status,
            started,
            info,
            outcome: Outcome::ClientGone,
            tail: Vec::new(),
        }
    }

    fn observe(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - TAIL..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(TAIL);
        self.tail.drain(..overflow);
        self.tail.extend_from_slice(chunk);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let m = &self.metrics;
        let duration = self.started.elapsed();
        m.request_done(self.endpoint, &self.model, self.status, duration);
        let counts = TokenCounts::find(&self.tail);
        let eval_seconds = counts.eval_ns.map(|ns| ns as f64 / 1e9);
        m.record_tokens(&self.model, counts.prompt, counts.generated, eval_seconds);
        let info = &self.info;
        if let Some((placed, estimated)) = &info.placed {
            m.record_placement(placed, *estimated, counts.prompt);
        }
        let placement = info.placed.map_or("least_busy", |(p, _)| p.reason.label());
        let expected_hit = info.placed.map_or(0, |(p, _)| p.expected_hit_tokens);
        tracing::info!(
            request_id = info.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default(),
            method = %info.method,
            path = %info.path,
            model = %self.model,
            backend = %info.backend,
            attempts = info.attempts,
            queue_wait_ms = info.queue_wait.as_millis() as u64,
            status = self.status,
            duration_ms = duration.as_millis() as u64,
            tokens_in = counts.prompt,
            tokens_out = counts.generated,
            placement,
            expected_hit_tokens = expected_hit,
            outcome = self.outcome.label(),
            "request done"
        );
    }
}

/// Token counts of a finished generation, native or OpenAI-style.
#[derive(Debug, Default, PartialEq)]
pub struct TokenCounts {
    /// Prompt tokens.
    pub prompt: u64,
    /// Generated tokens.
    pub generated: u64,
    /// Generation time in nanoseconds, where the backend said.
    pub eval_ns: Option<u64>,
    /// Prompt evaluation time in nanoseconds, where the backend said.
    pub prompt_ns: Option<u64>,
    /// Model load time in nanoseconds, where the backend said.
    pub load_ns: Option<u64>,
}

impl TokenCounts {
    /// Finds the last counts in the end of a body: `prompt_eval_count`,
    /// `eval_count`, `eval_duration` (Ollama), or `prompt_tokens`,
    /// `completion_tokens` (OpenAI usage), `input_tokens`, `output_tokens`
    /// (Anthropic Messages and OpenAI Responses usage).
    pub fn find(tail: &[u8]) -> Self {
        // Searched as bytes: this runs once per request, and a UTF-8 check
        // and copy of the tail showed in the profile of small requests.
        let last = |key: &[u8]| -> Option<u64> {
            let at = tail.windows(key.len()).rposition(|w| w == key)? + key.len();
            let rest = &tail[at..];
            let start = rest.iter().position(|b| *b != b' ' && *b != b':')?;
            let rest = &rest[start..];
            let end = rest
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(rest.len());
            std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
        };
        let prompt = last(b"\"prompt_eval_count\"")
            .or_else(|| last(b"\"prompt_tokens\""))
            .or_else(|| last(b"\"input_tokens\""))
            .unwrap_or(0);
        let generated = last(b"\"eval_count\"")
            .or_else(|| last(b"\"completion_tokens\""))
            .or_else(|| last(b"\"output_tokens\""))
            .unwrap_or(0);
        Self {
            prompt,
            generated,
            eval_ns: last(b"\"eval_duration\""),
            prompt_ns: last(b"\"prompt_eval_duration\""),
            load_ns: last(b"\"load_duration\""),
        }
    }
}

/// The relay state: the backend body and what rides along with it.
pub struct Relay {
    body: BackendBody,
    first: Option<Bytes>,
    slot: Option<Claim>,
    framing: Framing,
    read_timeout: Duration,
    ended: bool,
    ledger: Ledger,
}

impl Relay {
    /// A relay that sends `first` (already read from `body`), then the rest.
    pub fn new(
        body: BackendBody,
        first: Option<Bytes>,
        slot: Claim,
        framing: Framing,
        read_timeout: Duration,
        ledger: Ledger,
    ) -> Self {
        let mut relay = Self {
            body,
            first: None,
            slot: Some(slot),
            framing,
            read_timeout,
            ended: false,
            ledger,
        };
        if let Some(chunk) = &first {
            relay.ledger.observe(chunk);
        }
        relay.first = first;
        relay
    }

    /// The client's body.
    pub fn into_body(self) -> Body {
        Body::from_stream(futures_util::stream::unfold(self, |mut relay| async move {
            relay.next().await.map(|item| (item, relay))
        }))
    }

    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if let Some(first) = self.first.take() {
            self.finish_if_ended();
            return Some(Ok(first));
        }
        if self.ended {
            return None;
        }
        loop {
            match tokio::time::timeout(self.read_timeout, self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            self.ledger.observe(&data);
                            self.finish_if_ended();
                            return Some(Ok(data));
                        }
                    }
                }
                Ok(None) => {
                    self.finish();
                    return None;
                }
                Ok(Some(Err(e))) => {
                    return self.fail(&format!("connection broke mid-response: {e}"));
                }
                Err(_) => {
                    return self.fail(&format!(
                        "silent for {:.0?} mid-response",
                        self.read_timeout
                    ));
                }
            }
        }
    }

    /// A body with a `Content-Length` is over with its last byte: hyper stops
    /// polling the client's body once that many bytes went out, so waiting
    /// for the end-of-stream poll would count a complete answer as cut off.
    fn finish_if_ended(&mut self) {
        if !self.ended && hyper::body::Body::is_end_stream(&self.body) {
            self.finish();
        }
    }

    /// The body ended cleanly: the slot goes back now, not when the client
    /// finishes reading.
    fn finish(&mut self) {
        self.ended = true;
        self.ledger.outcome = Outcome::Complete;
        if !is_whole(self.ledger.endpoint, self.framing, &self.ledger.tail) {
            self.ledger.outcome = Outcome::Broken;
            let backend = self.slot.as_ref().map(|s| Arc::clone(&s.target().label));
            tracing::warn!(
                backend = backend.as_deref().unwrap_or_default(),
                endpoint = self.ledger.endpoint,
                "answer ended without its terminal event or with an error line"
            );
            if let Some(backend) = &backend {
                self.ledger
                    .metrics
                    .backend_failed(backend, FailureKind::BrokenAnswer);
            }
            self.ledger
                .metrics
                .stream_errors
                .get_or_create(&EndpointLabels {
                    endpoint: self.ledger.endpoint,
                })
                .inc();
        }
        if let Some(slot) = self.slot.take() {
            slot.fleet().record_served(slot.target());
            // What placement learns: the backend's prompt speed and how
            // long a request holds its slot.
            let counts = TokenCounts::find(&self.ledger.tail);
            // The GPU's time where the backend said (without its own queue
            // and load), else the time the request held the slot.
            let service = match (counts.prompt_ns, counts.eval_ns) {
                (Some(p), Some(e)) => Duration::from_nanos(p.saturating_add(e)),
                _ => self
                    .ledger
                    .started
                    .elapsed()
                    .saturating_sub(self.ledger.info.queue_wait),
            };
            let cold = self.ledger.info.placed.is_some_and(|(p, _)| p.cold);
            let seen = Observed {
                prompt_tokens: counts.prompt,
                prompt_ns: counts.prompt_ns.unwrap_or(0),
                service,
                load: counts.load_ns.filter(|_| cold).map(Duration::from_nanos),
            };
            if matches!(slot, Claim::Slot(_)) {
                slot.fleet().observed(&slot.target().id, &seen);
            }
            slot.finish();
        }
    }

    fn fail(&mut self, detail: &str) -> Option<Result<Bytes, std::io::Error>> {
        self.ended = true;
        self.ledger.outcome = Outcome::Broken;
        let slot = self.slot.take()?;
        let backend = Arc::clone(&slot.target().label);
        let message = format!("corral: backend {backend} failed mid-response: {detail}");
        tracing::warn!(backend = %backend, error = %detail, endpoint = self.ledger.endpoint, "stream broke after its first byte");
        self.ledger
            .metrics
            .backend_failed(&backend, FailureKind::MidStream);
        self.ledger
            .metrics
            .stream_errors
            .get_or_create(&EndpointLabels {
                endpoint: self.ledger.endpoint,
            })
            .inc();
        if slot.owns_failures() {
            slot.fleet().mark_failed(&slot.target().id, message.clone());
        }
        drop(slot);
        match self.framing.error_chunk(self.ledger.endpoint, &message) {
            Some(chunk) => Some(Ok(chunk)),
            None => Some(Err(std::io::Error::other(message))),
        }
    }
}

/// Whether a body that ended cleanly is a whole answer: no `{"error": ...}`
/// as the last NDJSON line, and the terminal event of the endpoint's SSE
/// stream (`data: [DONE]`, Anthropic's `message_stop`, Responses'
/// `response.completed` or `response.failed`) at its end.
pub fn is_whole(endpoint: &str, framing: Framing, tail: &[u8]) -> bool {
    let trimmed = tail.trim_ascii_end();
    match framing {
        Framing::Plain => true,
        Framing::Ndjson => {
            let last = trimmed
                .rsplit(|b| *b == b'\n')
                .next()
                .unwrap_or_default()
                .trim_ascii_start();
            !last.starts_with(b"{\"error\"")
        }
        Framing::Sse => {
            let last_event = |name: &[u8]| {
                let mut needle = b"event: ".to_vec();
                needle.extend_from_slice(name);
                let Some(at) = trimmed.windows(needle.len()).rposition(|w| w == needle) else {
                    return false;
                };
                // Nothing but that event's own data after it.
                !trimmed[at + needle.len()..]
                    .windows(7)
                    .any(|w| w == b"event: ")
            };
            match endpoint {
                "/v1/messages" => last_event(b"message_stop"),
                "/v1/responses" => {
                    last_event(b"response.completed") || last_event(b"response.failed")
                }
                _ => trimmed.ends_with(b"data: [DONE]"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_answers_end_with_their_terminal_event() {
        let done = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert!(is_whole("/v1/chat/completions", Framing::Sse, done));
        assert!(!is_whole(
            "/v1/chat/completions",
            Framing::Sse,
            b"data: {\"choices\":[]}\n\n"
        ));
        let stop = b"event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(is_whole("/v1/messages", Framing::Sse, stop));
        assert!(!is_whole(
            "/v1/messages",
            Framing::Sse,
            b"event: content_block_delta\ndata: {}\n\n"
        ));
        let completed = b"event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n";
        assert!(is_whole("/v1/responses", Framing::Sse, completed));
        let cut = b"event: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n";
        assert!(!is_whole("/v1/responses", Framing::Sse, cut));
        assert!(is_whole(
            "/api/chat",
            Framing::Ndjson,
            b"{\"done\":false}\n{\"done\":true}\n"
        ));
        assert!(!is_whole(
            "/api/chat",
            Framing::Ndjson,
            b"{\"done\":false}\n{\"error\":\"boom\"}\n"
        ));
        assert!(is_whole("/v1/audio/speech", Framing::Plain, b"RIFF"));
    }

    #[test]
    fn counts_come_from_the_final_ollama_chunk() {
        let tail = br#"{"response":"x","done":false}
{"done":true,"prompt_eval_count":26,"prompt_eval_duration":5,"eval_count":94,"eval_duration":2000000000}
"#;
        assert_eq!(
            TokenCounts::find(tail),
            TokenCounts {
                prompt: 26,
                generated: 94,
                eval_ns: Some(2_000_000_000),
                prompt_ns: Some(5),
                load_ns: None,
            }
        );
    }

    #[test]
    fn counts_come_from_openai_usage() {
        let tail = br#"data: {"choices":[],"usage":{"prompt_tokens":26,"completion_tokens":3,"total_tokens":29}}

data: [DONE]

"#;
        assert_eq!(
            TokenCounts::find(tail),
            TokenCounts {
                prompt: 26,
                generated: 3,
                eval_ns: None,
                prompt_ns: None,
                load_ns: None,
            }
        );
    }

    #[test]
    fn error_chunks_fit_their_framing() {
        let line = Framing::Ndjson.error_chunk("/api/chat", "boom").unwrap();
        assert_eq!(&line[..], b"{\"error\":\"boom\"}\n");
        let event = Framing::Sse
            .error_chunk("/v1/chat/completions", "boom")
            .unwrap();
        assert!(event.starts_with(b"data: {\"error\":{") && event.ends_with(b"\n\n"));
        let event = Framing::Sse.error_chunk("/v1/messages", "boom").unwrap();
        assert!(event.starts_with(b"event: error\ndata: {") && event.ends_with(b"\n\n"));
        assert!(!is_whole("/v1/messages", Framing::Sse, &event));
        let event = Framing::Sse.error_chunk("/v1/responses", "boom").unwrap();
        assert!(!is_whole("/v1/responses", Framing::Sse, &event));
        assert!(
            Framing::Plain
                .error_chunk("/v1/audio/speech", "boom")
                .is_none()
        );
    }

    #[test]
    fn framing_is_read_from_the_content_type() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(
            Framing::of(Some(&v("application/x-ndjson"))),
            Framing::Ndjson
        );
        assert_eq!(
            Framing::of(Some(&v("text/event-stream; charset=utf-8"))),
            Framing::Sse
        );
        assert_eq!(
            Framing::of(Some(&v("application/json; charset=utf-8"))),
            Framing::Plain
        );
        assert_eq!(Framing::of(None), Framing::Plain);
    }
}
