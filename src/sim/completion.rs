//! The answers of generate, chat, `/v1` chat and `/v1` completions: a
//! [`Generation`]'s tokens framed as NDJSON lines, SSE events or one whole
//! object, with the mid-stream fault in each API's shape. The
//! [`Completion`] owns the generation, so dropping it (the client went
//! away) stops it, frees the slot and counts a cancel.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::events::connection_reset;
use super::generate::{Metrics, NativeChunk, SSE_DONE, ndjson_line, now_rfc3339, sse_event};
use super::generation::{Generation, Step};
use super::reply::{self, MID_STREAM, Shape};

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

/// What was asked, beyond the tokens.
pub(crate) struct Job {
    pub api: Api,
    /// Model string as sent (echoed).
    pub model: String,
    /// Prompt tokens evaluated (not found in the prompt cache), and how long that took.
    pub prompt_eval_count: u64,
    pub prompt_eval_ns: u64,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate `raw`: no `context`.
    pub raw: bool,
    pub keep_alive: Option<Option<Duration>>,
}

/// A completion being answered.
pub(crate) struct Completion {
    job: Job,
    generation: Generation,
    /// When the request arrived.
    start: Instant,
    load_ns: u64,
    queue: VecDeque<Bytes>,
    finished: bool,
    id: String,
    created: i64,
}

impl Completion {
    /// `start` is when the request arrived; `seq` numbers the `/v1` id.
    pub(crate) fn new(job: Job, generation: Generation, start: Instant, seq: u64) -> Completion {
        let prefix = if job.api == Api::V1Completions {
            "cmpl"
        } else {
            "chatcmpl"
        };
        let load_ns = (start.elapsed().as_nanos() as u64)
            .saturating_sub(job.prompt_eval_ns)
            .max(1);
        Completion {
            job,
            generation,
            load_ns,
            start,
            queue: VecDeque::new(),
            finished: false,
            id: format!("{prefix}-{}", seq % 999),
            created: chrono::Utc::now().timestamp(),
        }
    }

    fn metrics(&self) -> Metrics {
        let ns = |d: Duration| (d.as_nanos() as u64).max(1);
        Metrics {
            total_duration: ns(self.start.elapsed()),
            load_duration: self.load_ns,
            prompt_eval_count: self.job.prompt_eval_count,
            prompt_eval_duration: self.job.prompt_eval_ns.max(1),
            eval_count: self.generation.emitted(),
            eval_duration: ns(self.generation.elapsed()),
        }
    }

    fn usage(&self) -> Value {
        v1_usage(self.job.prompt_eval_count, self.generation.emitted())
    }

    fn context(&self) -> Option<Vec<u64>> {
        let n = (self.generation.prompt_tokens + self.generation.emitted()).min(4096);
        (self.job.api == Api::Generate && !self.job.raw).then(|| (1..=n).collect())
    }

    /// A native object (generate or chat) carrying `text`.
    fn native_bytes(&self, text: &str, done: bool, line: bool) -> Bytes {
        let chat = self.job.api == Api::Chat;
        let reason = done.then(|| self.generation.done_reason());
        let c = NativeChunk {
            context: if done { self.context() } else { None },
            metrics: done.then(|| self.metrics()),
            ..NativeChunk::new(&self.job.model, chat, text, reason)
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
        let mut v = v1_head(&self.id, object, self.created, &self.job.model);
        v["choices"] = if choice.is_null() {
            json!([])
        } else {
            json!([choice])
        };
        if let Some(u) = usage {
            v["usage"] = u;
        }
        sse_event(&v)
    }

    fn token_frame(&self, tok: &str) -> Bytes {
        match self.job.api {
            Api::Generate | Api::Chat => self.native_bytes(tok, false, true),
            Api::V1Chat => self.v1_chunk(v1_delta(self.generation.emitted() <= 1, tok), None),
            Api::V1Completions => self.v1_chunk(
                json!({"text": tok, "index": 0, "finish_reason": null}),
                self.job.include_usage.then(|| v1_usage(0, 0)),
            ),
        }
    }

    fn push_tail(&mut self) {
        let r = self.generation.done_reason();
        let tail: Vec<Bytes> = match self.job.api {
            Api::Generate | Api::Chat => vec![self.native_bytes("", true, true)],
            Api::V1Chat | Api::V1Completions => {
                let finish = if self.job.api == Api::V1Chat {
                    json!({"index": 0, "delta": {}, "finish_reason": r})
                } else {
                    json!({"text": "", "index": 0, "finish_reason": r})
                };
                let zero = (self.job.api == Api::V1Completions && self.job.include_usage)
                    .then(|| v1_usage(0, 0));
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
                    self.generation.end(true);
                }
                return Some(Ok(b));
            }
            if self.finished {
                return None;
            }
            match self.generation.cut() {
                Some(Step::Reset) => {
                    self.finished = true;
                    return Some(Err(connection_reset()));
                }
                Some(_) => {
                    self.finished = true;
                    let b = match self.job.api.shape() {
                        Shape::Native => ndjson_line(&json!({ "error": MID_STREAM })),
                        // Ollama's /v1 writer turns the error into an empty
                        // content chunk and ends with no finish and no [DONE].
                        Shape::OpenAi => self.token_frame(""),
                    };
                    return Some(Ok(b));
                }
                None => {}
            }
            if self.generation.more() {
                let tok = self.generation.token().await;
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
        let text = match self.generation.whole().await {
            Ok(text) => text,
            Err(Step::Reset) => {
                let partial = format!(
                    "{{\"model\":{},\"created_at\":\"{}\",",
                    json!(self.job.model),
                    now_rfc3339()
                );
                let body =
                    futures_util::stream::iter([Ok(Bytes::from(partial)), Err(connection_reset())]);
                return reply::stream(content_type_json(self.job.api), Body::from_stream(body));
            }
            Err(_) => {
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                return reply::error(self.job.api.shape(), status, MID_STREAM);
            }
        };
        let reason = self.generation.done_reason();
        match self.job.api {
            Api::Generate | Api::Chat => {
                let body = self.native_bytes(&text, true, false);
                reply::stream("application/json; charset=utf-8", Body::from(body))
            }
            Api::V1Chat | Api::V1Completions => {
                let (object, choice) = if self.job.api == Api::V1Chat {
                    let message = json!({"role": "assistant", "content": text});
                    let choice = json!({"index": 0, "message": message, "finish_reason": reason});
                    ("chat.completion", choice)
                } else {
                    let choice = json!({"text": text, "index": 0, "finish_reason": reason});
                    ("text_completion", choice)
                };
                let mut v = v1_head(&self.id, object, self.created, &self.job.model);
                v["choices"] = json!([choice]);
                v["usage"] = self.usage();
                reply::v1_json(StatusCode::OK, &v)
            }
        }
    }
}

/// The fields every `/v1` chat or completions object starts with.
pub(crate) fn v1_head(id: &str, object: &str, created: i64, model: &str) -> Value {
    json!({"id": id, "object": object, "created": created, "model": model,
           "system_fingerprint": "fp_ollama"})
}

/// The choice of one streamed chat token; the first names the role.
pub(crate) fn v1_delta(first: bool, token: &str) -> Value {
    let delta = if first {
        json!({"role": "assistant", "content": token})
    } else {
        json!({"content": token})
    };
    json!({"index": 0, "delta": delta, "finish_reason": null})
}

/// `/v1` usage of `p` prompt and `c` completion tokens.
pub(crate) fn v1_usage(p: u64, c: u64) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

fn content_type_json(api: Api) -> &'static str {
    match api.shape() {
        Shape::Native => "application/json; charset=utf-8",
        Shape::OpenAi => "application/json",
    }
}
