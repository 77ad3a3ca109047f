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

use super::context::RequestContext;
use super::course::Claim;
use super::endpoint::Framing;
use super::ledger::{Ledger, TokenCounts};
use super::upstream::{BackendBody, Cut, FailureKind, next_chunk};
use crate::fleet::placement::Observed;

/// The relay state: the backend body and what rides along with it.
pub struct Relay {
    body: BackendBody,
    first: Option<Bytes>,
    claim: Option<Claim>,
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
        claim: Claim,
        framing: Framing,
        read_timeout: Duration,
        mut ledger: Ledger,
    ) -> Self {
        if let Some(chunk) = &first {
            ledger.observe(chunk);
        }
        Self {
            body,
            first,
            claim: Some(claim),
            framing,
            read_timeout,
            ended: false,
            ledger,
        }
    }

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
        match next_chunk(&mut self.body, self.read_timeout).await {
            Ok(Some(data)) => {
                self.ledger.observe(&data);
                self.finish_if_ended();
                Some(Ok(data))
            }
            Ok(None) => {
                self.finish();
                None
            }
            Err(Cut::Broke(e)) => self.fail(&format!("connection broke mid-response: {e}")),
            Err(Cut::Silent) => self.fail(&format!(
                "silent for {:.0?} mid-response",
                self.read_timeout
            )),
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
        if endpoint.is_whole(self.framing, self.ledger.tail()) {
            self.ledger.complete();
        } else {
            let backend = self.claim.as_ref().map(|c| &c.target().label);
            tracing::warn!(
                backend = backend.map(|b| &**b).unwrap_or_default(),
                endpoint = endpoint.path(),
                "answer ended without its terminal event or with an error line"
            );
            self.ledger.broken();
            self.ledger.count_break(backend, FailureKind::BrokenAnswer);
        }
        if let Some(claim) = self.claim.take() {
            claim.fleet().record_served(claim.target());
            if matches!(claim, Claim::Slot(_)) {
                let counts = self.ledger.counts();
                let seen = observed(self.ledger.context(), &counts);
                claim.fleet().observed(&claim.target().id, &seen);
            }
            claim.finish();
        }
    }

    fn fail(&mut self, detail: &str) -> Option<Result<Bytes, std::io::Error>> {
        self.ended = true;
        self.ledger.broken();
        let claim = self.claim.take()?;
        let backend = &claim.target().label;
        let endpoint = self.ledger.context().endpoint;
        let message = format!("corral: backend {backend} failed mid-response: {detail}");
        tracing::warn!(backend = %backend, error = %detail, endpoint = endpoint.path(), "stream broke after its first byte");
        self.ledger
            .count_break(Some(backend), FailureKind::MidStream);
        if claim.owns_failures() {
            claim
                .fleet()
                .mark_failed(&claim.target().id, message.clone());
        }
        drop(claim);
        let chunk = endpoint.break_chunk(self.framing, &message);
        Some(chunk.ok_or_else(|| std::io::Error::other(message)))
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
