//! The response body relayed to the client. It owns the request's
//! [`Claim`] (its slot) until the backend's body ends or the client goes
//! away (dropping it closes the backend connection, which stops the
//! generation), passes every chunk on as it arrives, and ends a stream that
//! breaks after its first byte the way the client can see: an
//! `{"error": ...}` line for NDJSON, an error event for SSE, an aborted
//! connection for a plain body. A body that ends cleanly but is not a whole
//! answer (an `{"error": ...}` line under a 200, an SSE stream without its
//! terminal event) is counted as broken and relayed as it is: corral never
//! invents a terminal event. What is counted is the [`Ledger`]'s business.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;

use super::claim::Claim;
use super::context::RequestContext;
use super::ledger::{Ledger, TokenCounts};
use super::upstream::{BackendBody, FailureKind};
use crate::fleet::placement::Observed;

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
        let endpoint = self.ledger.context().endpoint;
        if is_whole(endpoint, self.framing, self.ledger.tail()) {
            self.ledger.complete();
        } else {
            let backend = self.slot.as_ref().map(|s| &s.target().label);
            tracing::warn!(
                backend = backend.map(|b| &**b).unwrap_or_default(),
                endpoint,
                "answer ended without its terminal event or with an error line"
            );
            self.ledger.broken();
            self.ledger.count_break(backend, FailureKind::BrokenAnswer);
        }
        if let Some(slot) = self.slot.take() {
            slot.fleet().record_served(slot.target());
            if matches!(slot, Claim::Slot(_)) {
                let counts = self.ledger.counts();
                let seen = observed(self.ledger.context(), &counts);
                slot.fleet().observed(&slot.target().id, &seen);
            }
            slot.finish();
        }
    }

    fn fail(&mut self, detail: &str) -> Option<Result<Bytes, std::io::Error>> {
        self.ended = true;
        self.ledger.broken();
        let slot = self.slot.take()?;
        let backend = &slot.target().label;
        let endpoint = self.ledger.context().endpoint;
        let message = format!("corral: backend {backend} failed mid-response: {detail}");
        tracing::warn!(backend = %backend, error = %detail, endpoint, "stream broke after its first byte");
        self.ledger
            .count_break(Some(backend), FailureKind::MidStream);
        if slot.owns_failures() {
            slot.fleet().mark_failed(&slot.target().id, message.clone());
        }
        drop(slot);
        match self.framing.error_chunk(endpoint, &message) {
            Some(chunk) => Some(Ok(chunk)),
            None => Some(Err(std::io::Error::other(message))),
        }
    }
}

/// What placement learns from a finished answer: the backend's prompt speed
/// and how long a request holds its slot (the GPU's time where the backend
/// said, without its own queue and load; else the time the slot was held).
fn observed(ctx: &RequestContext, counts: &TokenCounts) -> Observed {
    let service = match (counts.prompt_ns, counts.eval_ns) {
        (Some(p), Some(e)) => Duration::from_nanos(p.saturating_add(e)),
        _ => ctx.arrived.elapsed().saturating_sub(ctx.queue_wait),
    };
    let cold = ctx.placed.is_some_and(|(p, _)| p.cold);
    Observed {
        prompt_tokens: counts.prompt,
        prompt_ns: counts.prompt_ns.unwrap_or(0),
        service,
        load: counts.load_ns.filter(|_| cold).map(Duration::from_nanos),
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
