//! The one token generator of the simulator: a [`Generation`] yields the
//! deterministic tokens of an answer paced by `token_interval`, strikes a
//! reset or mid-stream fault after half of them, and holds the in-flight
//! guard, the slot and the slot's prompt memory, so dropping it (the client
//! went away) stops generation, frees the slot and counts a cancel.
//! Every endpoint frames its steps its own way. [`Generation::start`] is
//! how the endpoints Ollama layers on its chat handler (Anthropic Messages,
//! OpenAI Responses, audio, cloud answers) resolve the model, apply the
//! fault plan and take a slot; the native handlers do that in `inference`.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use super::cache::Lease;
use super::faults::Fault;
use super::generate::{Tokens, count_tokens};
use super::reply::{BUSY, RUNNER_DIED};
use super::sched::Slot;
use super::state::{Kind, ServerState};
use super::stats::InferenceGuard;

/// What comes next in a generation.
pub(crate) enum Step {
    /// One more token.
    Token(String),
    /// The answer is over.
    Done,
    /// A mid-stream error: Ollama loses it and ends the body cleanly.
    Lost,
    /// The connection is reset.
    Reset,
}

/// What a generation holds until it ends.
pub(crate) struct Held {
    pub guard: InferenceGuard,
    /// The slot's prompt memory, stored when the slot is freed.
    pub lease: Option<Lease>,
    /// None for a cloud model, which ollama.com answers.
    pub slot: Option<Slot>,
}

/// The tokens of one answer being generated.
pub(crate) struct Generation {
    tokens: Tokens,
    limit: usize,
    emitted: usize,
    interval: Duration,
    start: Instant,
    fault: Option<Fault>,
    guard: Option<InferenceGuard>,
    // Before `slot`: the slot's memory is stored before the slot is freed.
    lease: Option<Lease>,
    slot: Option<Slot>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// A limit was asked for: the answer ends on `length`.
    pub length_limited: bool,
}

/// What a layered endpoint asks of [`Generation::start`].
pub(crate) struct Ask<'a> {
    /// The model as sent.
    pub model: &'a str,
    /// Text the output is derived from.
    pub input: &'a str,
    /// All the prompt's text, for the token count.
    pub all_text: &'a str,
    /// Tokens asked for at most.
    pub limit: Option<usize>,
    /// A cloud model: ollama.com answers, no local slot and no fault.
    pub cloud: bool,
}

/// Why a layered endpoint's generation could not start: status and
/// message, rendered in the endpoint's own error shape.
pub(crate) type Refusal = (StatusCode, String);

/// Waits the `x-sim-delay-ms` the request asks for, if any.
pub(crate) async fn asked_delay(headers: &HeaderMap) {
    let delay = headers
        .get("x-sim-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// A slot on model `index`, unless `fault` strikes before any byte: then
/// its status and message. A hang never returns (until the client goes
/// away, which drops this future).
pub(crate) async fn slot_unless(
    state: &ServerState,
    fault: Option<Fault>,
    index: usize,
    keep_alive: Option<Option<Duration>>,
    ctx: Option<u64>,
) -> Result<Slot, (StatusCode, &'static str)> {
    let busy = (StatusCode::SERVICE_UNAVAILABLE, BUSY);
    match fault {
        Some(Fault::Error) => Err((StatusCode::INTERNAL_SERVER_ERROR, RUNNER_DIED)),
        Some(Fault::Busy) => Err(busy),
        Some(Fault::Hang) => std::future::pending().await,
        _ => state
            .acquire(index, keep_alive, ctx)
            .await
            .map_err(|_| busy),
    }
}

impl Generation {
    /// `limit` tokens (the server's default if `None`) for `model` and
    /// `input`, paced from now.
    pub(crate) fn new(
        state: &ServerState,
        (model, input): (&str, &str),
        limit: Option<usize>,
        prompt_tokens: u64,
        fault: Option<Fault>,
        held: Held,
    ) -> Generation {
        Generation {
            tokens: Tokens::new(state.spec.seed, model, input),
            limit: limit.unwrap_or(state.spec.tokens),
            emitted: 0,
            interval: state.spec.token_interval,
            start: Instant::now(),
            fault,
            guard: Some(held.guard),
            lease: held.lease,
            slot: held.slot,
            prompt_tokens,
            length_limited: limit.is_some(),
        }
    }

    /// Resolves the model, applies the fault plan and takes a slot, for
    /// the endpoints layered on chat.
    pub(crate) async fn start(
        state: &ServerState,
        headers: &HeaderMap,
        ask: Ask<'_>,
    ) -> Result<Generation, Refusal> {
        let model = ask.model;
        let index = (!ask.cloud)
            .then(|| state.resolve(model, Kind::Chat))
            .transpose()?;
        let guard = state.counters.inference();
        asked_delay(headers).await;
        let fault = if ask.cloud {
            None
        } else {
            state.pick_fault(headers)
        };
        // A cloud model (no index) takes no slot and has no fault.
        let slot = match index {
            None => None,
            Some(i) => match slot_unless(state, fault, i, None, None).await {
                Ok(slot) => Some(slot),
                Err((status, msg)) => {
                    guard.abandon();
                    return Err((status, msg.into()));
                }
            },
        };
        let held = Held {
            guard,
            lease: None,
            slot,
        };
        let (words, tokens) = ((model, ask.input), count_tokens(ask.all_text));
        Ok(Generation::new(
            state, words, ask.limit, tokens, fault, held,
        ))
    }

    /// Tokens this answer has when it is not cut short.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Tokens emitted so far.
    pub(crate) fn emitted(&self) -> u64 {
        self.emitted as u64
    }

    /// Time since generation started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Ollama's `done_reason`: `length` when a limit was asked for.
    pub(crate) fn done_reason(&self) -> &'static str {
        if self.length_limited {
            "length"
        } else {
            "stop"
        }
    }

    /// True while tokens remain.
    pub(crate) fn more(&self) -> bool {
        self.emitted < self.limit
    }

    /// The planned reset or mid-stream fault, if it strikes now (after half
    /// the tokens, at least one): it ends the generation.
    pub(crate) fn cut(&mut self) -> Option<Step> {
        if self.guard.is_none() || self.emitted != (self.limit / 2).max(1) {
            return None;
        }
        let step = match self.fault {
            Some(Fault::Reset) => Step::Reset,
            Some(Fault::MidStreamError) => Step::Lost,
            _ => return None,
        };
        self.end(false);
        Some(step)
    }

    /// The next token, at its time; the slot's memory learns it.
    pub(crate) async fn token(&mut self) -> String {
        self.emitted += 1;
        if !self.interval.is_zero() {
            tokio::time::sleep_until(self.start + self.interval * self.emitted as u32).await;
        }
        let token = self.tokens.next_token();
        if let Some(lease) = &mut self.lease {
            lease.output(&token);
        }
        token
    }

    /// The next step; the last one ends the generation.
    pub(crate) async fn next(&mut self) -> Step {
        if self.guard.is_none() {
            return Step::Done;
        }
        if let Some(cut) = self.cut() {
            return cut;
        }
        if !self.more() {
            self.end(true);
            return Step::Done;
        }
        Step::Token(self.token().await)
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

    /// Stores the slot's memory, frees the slot and ends the in-flight count
    /// as completed or abandoned.
    pub(crate) fn end(&mut self, complete: bool) {
        self.lease.take();
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
