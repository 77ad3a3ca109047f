//! One generated turn for the endpoints Ollama layers on its chat handler
//! (Anthropic Messages, OpenAI Responses, audio): resolve the model, apply
//! the fault plan, take a slot (none for a cloud model, which ollama.com
//! answers), then paced tokens. Also the two helpers those endpoints share:
//! [`J`], JSON written in a fixed key order (Go struct order), and
//! [`event_stream`], an SSE body whose head waits for the first event.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::faults::Fault;
use super::generate::Tokens;
use super::name::Name;
use super::reply::BUSY;
use super::sched::Slot;
use super::state::ServerState;
use super::stats::InferenceGuard;

/// JSON with keys in the order given, whatever serde_json's map type is.
pub(crate) enum J {
    /// Any value, written as serde_json writes it.
    V(Value),
    /// An object, keys in this order.
    O(Vec<(&'static str, J)>),
    /// An array.
    A(Vec<J>),
}

impl Serialize for J {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            J::V(v) => v.serialize(s),
            J::O(pairs) => {
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            J::A(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
        }
    }
}

impl From<Value> for J {
    fn from(v: Value) -> J {
        J::V(v)
    }
}

/// `j!(v)`: a plain value as [`J`].
pub(crate) fn v(value: impl Into<Value>) -> J {
    J::V(value.into())
}

/// `J` as bytes.
pub(crate) fn bytes(j: &J) -> Vec<u8> {
    serde_json::to_vec(j).unwrap_or_default()
}

/// A JSON value with every object's keys sorted, as Go writes a map.
pub(crate) fn sorted(mut value: Value) -> Value {
    value.sort_all_objects();
    value
}

/// One `event: <name>\ndata: <json>\n\n` frame.
pub(crate) fn sse(name: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + name.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// A response with this status, content type and body.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Body>,
) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap_or_default()
}

/// Why a turn could not start: status and message, rendered in the
/// endpoint's own error shape.
pub(crate) type Refusal = (StatusCode, String);

/// What comes next in a turn.
pub(crate) enum Step {
    /// One more token.
    Token(String),
    /// The turn is over.
    Done,
    /// A mid-stream error: Ollama loses it and ends the body cleanly.
    Lost,
    /// The connection is reset.
    Reset,
}

/// A turn being generated.
pub(crate) struct Turn {
    tokens: Tokens,
    limit: usize,
    emitted: usize,
    interval: Duration,
    gen_start: Instant,
    slot: Option<Slot>,
    guard: Option<InferenceGuard>,
    fault: Option<Fault>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// A limit was asked for: the turn ends on `length`.
    pub length_limited: bool,
}

/// What a turn is asked.
pub(crate) struct Ask<'a> {
    /// The model as sent.
    pub model: &'a str,
    /// Text the output is derived from.
    pub input: &'a str,
    /// All the prompt's text, for the token count.
    pub all_text: &'a str,
    /// Tokens asked for at most.
    pub limit: Option<usize>,
    /// A cloud model: ollama.com answers, no local slot.
    pub cloud: bool,
}

impl Turn {
    /// Resolves the model, applies the fault plan and takes a slot.
    pub(crate) async fn start(
        state: &Arc<ServerState>,
        headers: &HeaderMap,
        ask: Ask<'_>,
    ) -> Result<Turn, Refusal> {
        let model = ask.model;
        let index = if ask.cloud {
            None
        } else {
            if model.is_empty() {
                return Err((StatusCode::BAD_REQUEST, "model is required".into()));
            }
            let name = Name::parse(model)
                .ok_or((StatusCode::BAD_REQUEST, "invalid model name".to_string()))?;
            let index = state
                .find(&name)
                .ok_or_else(|| (StatusCode::NOT_FOUND, format!("model '{model}' not found")))?;
            if state.model(index).embedding_only {
                let msg = format!("\"{model}\" does not support chat");
                return Err((StatusCode::BAD_REQUEST, msg));
            }
            Some(index)
        };
        let guard = state.counters.inference();
        let delay = headers
            .get("x-sim-delay-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(ms) = delay {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let fault = if ask.cloud {
            None
        } else {
            state.pick_fault(headers)
        };
        match fault {
            Some(Fault::Error) => {
                guard.abandon();
                let msg = "llama runner process has terminated: simulated fault";
                return Err((StatusCode::INTERNAL_SERVER_ERROR, msg.into()));
            }
            Some(Fault::Busy) => {
                guard.abandon();
                return Err((StatusCode::SERVICE_UNAVAILABLE, BUSY.into()));
            }
            Some(Fault::Hang) => std::future::pending::<()>().await,
            _ => {}
        }
        let slot = match index {
            None => None,
            Some(i) => match state
                .sched
                .acquire(i, None, None, || state.counters.oversubscribed())
                .await
            {
                Ok(slot) => Some(slot),
                Err(_) => {
                    guard.abandon();
                    return Err((StatusCode::SERVICE_UNAVAILABLE, BUSY.into()));
                }
            },
        };
        Ok(Turn {
            tokens: Tokens::new(state.spec.seed, model, ask.input),
            limit: ask.limit.unwrap_or(state.spec.tokens),
            emitted: 0,
            interval: state.spec.token_interval,
            gen_start: Instant::now(),
            slot,
            guard: Some(guard),
            fault,
            prompt_tokens: super::generate::count_tokens(ask.all_text),
            length_limited: ask.limit.is_some(),
        })
    }

    /// Tokens this turn produces when it is not cut short.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Tokens emitted so far.
    pub(crate) fn emitted(&self) -> u64 {
        self.emitted as u64
    }

    /// The next step, paced by the token interval.
    pub(crate) async fn next(&mut self) -> Step {
        if self.guard.is_none() {
            return Step::Done;
        }
        if self.emitted == (self.limit / 2).max(1) {
            match self.fault {
                Some(Fault::Reset) => {
                    self.end(false);
                    return Step::Reset;
                }
                Some(Fault::MidStreamError) => {
                    self.end(false);
                    return Step::Lost;
                }
                _ => {}
            }
        }
        if self.emitted >= self.limit {
            self.end(true);
            return Step::Done;
        }
        self.emitted += 1;
        if !self.interval.is_zero() {
            tokio::time::sleep_until(self.gen_start + self.interval * self.emitted as u32).await;
        }
        Step::Token(self.tokens.next_token())
    }

    /// Generates the rest: `Ok(text)`, or the step that cut it short.
    pub(crate) async fn whole(&mut self) -> Result<String, Step> {
        let mut text = String::new();
        loop {
            match self.next().await {
                Step::Token(t) => text.push_str(&t),
                Step::Done => return Ok(text),
                cut => return Err(cut),
            }
        }
    }

    fn end(&mut self, complete: bool) {
        self.slot.take();
        if let Some(g) = self.guard.take() {
            if complete {
                g.complete();
            } else {
                g.abandon();
            }
        }
    }
}

/// Sender side of an event stream.
pub(crate) type Events = mpsc::Sender<std::io::Result<Bytes>>;

/// The parameter a simulated tool call fills: the first required one of a
/// JSON schema, else its first property.
pub(crate) fn first_param(schema: &Value) -> Option<String> {
    schema["required"][0]
        .as_str()
        .or_else(|| {
            schema["properties"]
                .as_object()?
                .keys()
                .next()
                .map(String::as_str)
        })
        .map(str::to_string)
}

/// Ends an event stream the way a reset connection does.
pub(crate) async fn reset(tx: &Events) {
    let reset = std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "simulated connection reset",
    );
    let _ = tx.send(Err(reset)).await;
}

/// Sends a step's frames; false when the client has gone.
pub(crate) async fn send_all(tx: &Events, frames: Vec<Bytes>) -> bool {
    for frame in frames {
        if tx.send(Ok(frame)).await.is_err() {
            return false;
        }
    }
    true
}

/// An SSE answer fed by `produce`, which runs as its own task: the head is
/// sent with the first event (nothing before the first token), and a client
/// that goes away stops the task at its next event.
pub(crate) async fn event_stream<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Events) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(produce(tx));
    let first = rx.recv().await;
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = futures_util::stream::iter(first).chain(rest);
    let mut response = respond(StatusCode::OK, "text/event-stream", Body::from_stream(body));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    response
}

use futures_util::StreamExt;

/// Random lowercase hex digits.
pub(crate) fn hex(digits: usize) -> String {
    (0..digits)
        .map(|_| char::from_digit(rand::random::<u32>() % 16, 16).unwrap_or('0'))
        .collect()
}

/// Ollama's tool-call id: `call_` and 8 of `[a-z0-9]`.
pub(crate) fn call_id() -> String {
    const ABC: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..8)
        .map(|_| char::from(ABC[rand::random::<u32>() as usize % ABC.len()]))
        .collect();
    format!("call_{tail}")
}
