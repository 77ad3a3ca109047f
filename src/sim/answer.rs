//! One text answer in progress (generate, chat, `/v1` chat and completions):
//! tokens paced by `token_interval`, framed as NDJSON lines or SSE events,
//! with reset and mid-stream faults at the halfway token. The [`Answer`]
//! owns the slot and the in-flight guard, so dropping it (the client went
//! away) stops generation, frees the slot and counts a cancel.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::cache::Lease;
use super::faults::Fault;
use super::generate::{
    Message, Metrics, NativeChunk, SSE_DONE, Tokens, ndjson_line, now_rfc3339, sse_event,
};
use super::reply::{self, Shape};
use super::sched::Slot;
use super::stats::InferenceGuard;

/// Which API an answer speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Generate,
    Chat,
    V1Chat,
    V1Completions,
}

impl Api {
    pub(crate) fn shape(self) -> Shape {
        match self {
            Api::Generate | Api::Chat => Shape::Native,
            Api::V1Chat | Api::V1Completions => Shape::OpenAi,
        }
    }
}

/// What was asked.
pub(crate) struct Job {
    pub api: Api,
    /// Model string as sent (echoed).
    pub model: String,
    /// Text the output is derived from.
    pub input: String,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u64,
    /// Of those, evaluated (not found in the prompt cache), and how long that took.
    pub prompt_eval_count: u64,
    pub prompt_eval_ns: u64,
    pub tokens: usize,
    /// `num_predict` / `max_tokens` was given: `done_reason` is `length`.
    pub length_limited: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate `raw`: no `context`.
    pub raw: bool,
    pub keep_alive: Option<Option<Duration>>,
}

/// An answer being generated.
pub(crate) struct Answer {
    job: Job,
    tokens: Tokens,
    emitted: usize,
    interval: Duration,
    start: Instant,
    gen_start: Instant,
    load_ns: u64,
    fault: Option<Fault>,
    guard: Option<InferenceGuard>,
    // Before `slot`: the slot's memory is stored before the slot is freed.
    lease: Option<Lease>,
    slot: Option<Slot>,
    queue: VecDeque<Bytes>,
    finished: bool,
    id: String,
    created: i64,
}

const MID_STREAM: &str = "an error was encountered while running the model: simulated fault";

impl Answer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        job: Job,
        seed: u64,
        interval: Duration,
        start: Instant,
        fault: Option<Fault>,
        guard: InferenceGuard,
        (lease, slot): (Lease, Slot),
        seq: u64,
    ) -> Answer {
        let prefix = if job.api == Api::V1Completions {
            "cmpl"
        } else {
            "chatcmpl"
        };
        let load_ns = (start.elapsed().as_nanos() as u64)
            .saturating_sub(job.prompt_eval_ns)
            .max(1);
        Answer {
            tokens: Tokens::new(seed, &job.model, &job.input),
            job,
            emitted: 0,
            interval,
            load_ns,
            start,
            gen_start: Instant::now(),
            fault,
            guard: Some(guard),
            lease: Some(lease),
            slot: Some(slot),
            queue: VecDeque::new(),
            finished: false,
            id: format!("{prefix}-{}", seq % 999),
            created: chrono::Utc::now().timestamp(),
        }
    }

    /// The token index after which a reset or mid-stream fault strikes.
    fn fault_at(&self) -> usize {
        (self.job.tokens / 2).max(1)
    }

    async fn next_token(&mut self) -> String {
        self.emitted += 1;
        if !self.interval.is_zero() {
            tokio::time::sleep_until(self.gen_start + self.interval * self.emitted as u32).await;
        }
        let tok = self.tokens.next_token();
        if let Some(l) = &mut self.lease {
            l.output(&tok);
        }
        tok
    }

    /// Stores the slot's memory, then frees the slot.
    fn free_slot(&mut self) {
        self.lease.take();
        self.slot.take();
    }

    fn abandon(&mut self) {
        self.free_slot();
        if let Some(g) = self.guard.take() {
            g.abandon();
        }
    }

    fn reason(&self) -> &'static str {
        if self.job.length_limited {
            "length"
        } else {
            "stop"
        }
    }

    fn metrics(&self) -> Metrics {
        let ns = |d: Duration| (d.as_nanos() as u64).max(1);
        Metrics {
            total_duration: ns(self.start.elapsed()),
            load_duration: self.load_ns,
            prompt_eval_count: self.job.prompt_eval_count,
            prompt_eval_duration: self.job.prompt_eval_ns.max(1),
            eval_count: self.emitted as u64,
            eval_duration: ns(self.gen_start.elapsed()),
        }
    }

    fn usage(&self) -> Value {
        let (p, c) = (self.job.prompt_eval_count, self.emitted as u64);
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    }

    fn context(&self) -> Option<Vec<u64>> {
        let n = (self.job.prompt_tokens + self.emitted as u64).min(4096);
        (self.job.api == Api::Generate && !self.job.raw).then(|| (1..=n).collect())
    }

    /// A native object (generate or chat) carrying `text`.
    fn native_bytes(&self, text: &str, done: bool, line: bool) -> Bytes {
        let chat = self.job.api == Api::Chat;
        let c = NativeChunk {
            model: &self.job.model,
            created_at: now_rfc3339(),
            response: (!chat).then_some(text),
            message: chat.then_some(Message {
                role: "assistant",
                content: text,
            }),
            done,
            done_reason: done.then(|| self.reason()),
            context: if done { self.context() } else { None },
            metrics: done.then(|| self.metrics()),
        };
        if line {
            ndjson_line(&c)
        } else {
            Bytes::from(serde_json::to_vec(&c).unwrap_or_default())
        }
    }

    fn v1_chunk(&self, choice: Value, usage: Option<Value>) -> Bytes {
        let object = match self.job.api {
            Api::V1Chat => "chat.completion.chunk",
            _ => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.job.model,
            "system_fingerprint": "fp_ollama",
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        sse_event(&v)
    }

    fn token_frame(&self, tok: &str) -> Bytes {
        match self.job.api {
            Api::Generate | Api::Chat => self.native_bytes(tok, false, true),
            Api::V1Chat => {
                let delta = if self.emitted <= 1 {
                    json!({"role": "assistant", "content": tok})
                } else {
                    json!({"content": tok})
                };
                self.v1_chunk(
                    json!({"index": 0, "delta": delta, "finish_reason": null}),
                    None,
                )
            }
            Api::V1Completions => self.v1_chunk(
                json!({"text": tok, "index": 0, "finish_reason": null}),
                self.job.include_usage.then(zero_usage),
            ),
        }
    }

    fn push_tail(&mut self) {
        let r = self.reason();
        let tail: Vec<Bytes> = match self.job.api {
            Api::Generate | Api::Chat => vec![self.native_bytes("", true, true)],
            Api::V1Chat | Api::V1Completions => {
                let finish = if self.job.api == Api::V1Chat {
                    json!({"index": 0, "delta": {}, "finish_reason": r})
                } else {
                    json!({"text": "", "index": 0, "finish_reason": r})
                };
                let zero =
                    (self.job.api == Api::V1Completions && self.job.include_usage).then(zero_usage);
                let mut t = vec![self.v1_chunk(finish, zero)];
                if self.job.include_usage {
                    t.push(self.v1_chunk(Value::Null, Some(self.usage())));
                }
                t.push(Bytes::from_static(SSE_DONE));
                t
            }
        };
        self.queue.extend(tail);
    }

    /// The next framed piece of a streamed answer; `Err` resets the connection.
    pub(crate) async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                if self.queue.is_empty() && self.finished {
                    self.free_slot();
                    if let Some(g) = self.guard.take() {
                        g.complete();
                    }
                }
                return Some(Ok(b));
            }
            if self.finished {
                return None;
            }
            if self.emitted == self.fault_at() && self.guard.is_some() {
                match self.fault {
                    Some(Fault::Reset) => {
                        self.abandon();
                        self.finished = true;
                        let e = std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "simulated connection reset",
                        );
                        return Some(Err(e));
                    }
                    Some(Fault::MidStreamError) => {
                        self.abandon();
                        self.finished = true;
                        let b = match self.job.api.shape() {
                            Shape::Native => ndjson_line(&json!({ "error": MID_STREAM })),
                            // Ollama's /v1 writer turns the error into an empty
                            // content chunk and ends with no finish and no [DONE].
                            Shape::OpenAi => self.token_frame(""),
                        };
                        return Some(Ok(b));
                    }
                    _ => {}
                }
            }
            if self.emitted < self.job.tokens {
                let tok = self.next_token().await;
                let frame = self.token_frame(&tok);
                self.queue.push_back(frame);
            } else {
                self.finished = true;
                self.push_tail();
            }
        }
    }

    /// Streams the answer; the first piece exists before headers are sent.
    pub(crate) async fn stream(mut self) -> Response {
        let first = self.next().await;
        let content_type = match self.job.api.shape() {
            Shape::Native => "application/x-ndjson",
            Shape::OpenAi => "text/event-stream",
        };
        let rest = futures_util::stream::unfold(self, |mut a| async move {
            a.next().await.map(|item| (item, a))
        });
        let body = futures_util::stream::iter(first).chain(rest);
        reply::stream(content_type, Body::from_stream(body))
    }

    /// Generates the whole answer and sends it as one object.
    pub(crate) async fn whole(mut self) -> Response {
        let mut text = String::with_capacity(self.job.tokens * 8);
        while self.emitted < self.job.tokens {
            let tok = self.next_token().await;
            text.push_str(&tok);
            if self.emitted == self.fault_at() {
                match self.fault {
                    Some(Fault::Reset) => {
                        self.abandon();
                        let partial = format!(
                            "{{\"model\":{},\"created_at\":\"{}\",",
                            json!(self.job.model),
                            now_rfc3339()
                        );
                        let reset = std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "simulated connection reset",
                        );
                        let body =
                            futures_util::stream::iter([Ok(Bytes::from(partial)), Err(reset)]);
                        return reply::stream(
                            content_type_json(self.job.api),
                            Body::from_stream(body),
                        );
                    }
                    Some(Fault::MidStreamError) => {
                        self.abandon();
                        let status = StatusCode::INTERNAL_SERVER_ERROR;
                        return reply::error(self.job.api.shape(), status, MID_STREAM);
                    }
                    _ => {}
                }
            }
        }
        let resp = match self.job.api {
            Api::Generate | Api::Chat => {
                let body = self.native_bytes(&text, true, false);
                reply::stream("application/json; charset=utf-8", Body::from(body))
            }
            Api::V1Chat => reply::v1_json(
                StatusCode::OK,
                &json!({
                    "id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.job.model, "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": self.reason()}],
                    "usage": self.usage(),
                }),
            ),
            Api::V1Completions => reply::v1_json(
                StatusCode::OK,
                &json!({
                    "id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.job.model, "system_fingerprint": "fp_ollama",
                    "choices": [{"text": text, "index": 0, "finish_reason": self.reason()}],
                    "usage": self.usage(),
                }),
            ),
        };
        self.free_slot();
        if let Some(g) = self.guard.take() {
            g.complete();
        }
        resp
    }
}

fn zero_usage() -> Value {
    json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
}

fn content_type_json(api: Api) -> &'static str {
    match api.shape() {
        Shape::Native => "application/json; charset=utf-8",
        Shape::OpenAi => "application/json",
    }
}
