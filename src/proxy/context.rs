//! What a routed request is, carried from arrival to its request-log line:
//! who asked (id, tenant, priority), what for (endpoint, model, stream),
//! when (arrival, time queued, first byte), and how it was answered
//! (attempts, the failures among them, the backend chosen and why).
//! Routing fills it in, the relay's ledger ends it with the `request done`
//! line; a request turned away ends with `request refused`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::endpoint::Endpoint;
use super::headers::REQUEST_ID;
use super::upstream::FailureKind;
use crate::fleet::Priority;
use crate::fleet::placement::Placed;
use crate::model::ModelName;

/// One routed request, from arrival to the log line.
#[derive(Debug)]
pub struct RequestContext {
    /// The request's `X-Request-Id` (set by the request-id middleware).
    pub id: Option<HeaderValue>,
    pub method: Method,
    pub endpoint: Endpoint,
    /// The model asked for, once the body is read.
    pub model: Option<ModelName>,
    /// The tenant, once the headers are checked.
    pub tenant: Option<Arc<str>>,
    /// The priority, once the headers are checked.
    pub priority: Priority,
    /// The body's `stream`, where it said.
    pub stream: Option<bool>,
    pub arrived: Instant,
    /// Time spent waiting for slots, over every attempt.
    pub queue_wait: Duration,
    /// Time from arrival until the answer's first byte was ready.
    pub first_byte: Option<Duration>,
    pub attempts: u32,
    /// The attempts that failed, in order.
    pub failures: Vec<Failure>,
    /// The backend that answers.
    pub backend: Option<Arc<str>>,
    /// Why cache-aware placement chose the backend, and the prompt's
    /// estimated size in tokens; `None` when the least-busy rule did alone.
    pub placed: Option<(Placed, u64)>,
}

/// A failed attempt.
#[derive(Debug, Clone)]
pub struct Failure {
    pub backend: Arc<str>,
    pub kind: FailureKind,
}

impl RequestContext {
    /// The context of a request that just arrived on `endpoint`.
    pub fn new(endpoint: Endpoint, head: &http::request::Parts, arrived: Instant) -> Self {
        Self {
            id: head.headers.get(REQUEST_ID).cloned(),
            method: head.method.clone(),
            endpoint,
            model: None,
            tenant: None,
            priority: Priority::default(),
            stream: None,
            arrived,
            queue_wait: Duration::ZERO,
            first_byte: None,
            attempts: 0,
            failures: Vec::new(),
            backend: None,
            placed: None,
        }
    }

    /// Failed attempts that count against MAX_RETRIES: all but `server busy`.
    pub fn retries_spent(&self) -> u32 {
        let n = self
            .failures
            .iter()
            .filter(|f| f.kind != FailureKind::Busy)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The request id as the log shows it (empty when absent).
    pub fn request_id(&self) -> &str {
        self.id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The tenant as the log shows it (empty when not known yet).
    pub fn tenant_name(&self) -> &str {
        self.tenant.as_deref().unwrap_or_default()
    }

    /// The failed attempts for the log: `backend:kind` joined by commas,
    /// written as the line is, without a `String` of its own.
    pub fn failed(&self) -> Failed<'_> {
        Failed(&self.failures)
    }

    /// Writes the `request done` line.
    pub fn log_done(&self, done: &Done<'_>) {
        tracing::info!(
            request_id = self.request_id(),
            method = %self.method,
            path = self.endpoint.path(),
            tenant = self.tenant_name(),
            model = %done.model,
            backend = self.backend.as_deref().unwrap_or_default(),
            attempts = self.attempts,
            failed = %self.failed(),
            queue_wait_ms = self.queue_wait.as_millis() as u64,
            first_byte_ms = self.first_byte.unwrap_or_default().as_millis() as u64,
            status = done.status,
            duration_ms = done.duration.as_millis() as u64,
            tokens_in = done.tokens_in,
            tokens_out = done.tokens_out,
            // The rule that placed it, and the prompt tokens it expected there.
            placement = self.placed.map_or("least_busy", |(p, _)| p.reason.label()),
            expected_hit_tokens = self.placed.map_or(0, |(p, _)| p.expected_hit_tokens),
            outcome = done.outcome,
            "request done"
        );
    }

    /// Writes the `request refused` line.
    pub fn log_refused(
        &self,
        model: &str,
        status: u16,
        duration: Duration,
        error: &dyn fmt::Display,
    ) {
        tracing::info!(
            request_id = self.request_id(),
            endpoint = self.endpoint.path(),
            tenant = self.tenant_name(),
            model,
            status,
            attempts = self.attempts,
            failed = %self.failed(),
            duration_ms = duration.as_millis() as u64,
            error = %error,
            "request refused"
        );
    }
}

/// The fields of the `request done` line that the context does not hold.
#[derive(Debug)]
pub struct Done<'a> {
    /// The model label.
    pub model: &'a str,
    /// The status sent to the client.
    pub status: u16,
    /// From arrival to the end of the answer.
    pub duration: Duration,
    /// Prompt tokens, as the backend counted them.
    pub tokens_in: u64,
    /// Generated tokens.
    pub tokens_out: u64,
    /// `complete`, `broken` or `client_gone`.
    pub outcome: &'static str,
}

/// Failed attempts, displayed as `24001:connect,24002:timeout`.
pub struct Failed<'a>(&'a [Failure]);

impl fmt::Display for Failed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut comma = "";
        for failure in self.0 {
            write!(f, "{comma}{}:{}", failure.backend, failure.kind.label())?;
            comma = ",";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    fn context() -> RequestContext {
        let head = http::Request::post("/api/chat")
            .header(REQUEST_ID, "req-7")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        RequestContext::new(Endpoint::Chat, &head, Instant::now())
    }

    fn failure(backend: &str, kind: FailureKind) -> Failure {
        Failure {
            backend: Arc::from(backend),
            kind,
        }
    }

    #[test]
    fn failures_read_as_backend_and_kind_and_busy_is_no_retry() {
        let mut ctx = context();
        assert_eq!(ctx.failed().to_string(), "");
        ctx.failures.push(failure("24001", FailureKind::Connect));
        ctx.failures.push(failure("24002", FailureKind::Busy));
        ctx.failures
            .push(failure("gpu7:11434", FailureKind::Timeout));
        assert_eq!(
            ctx.failed().to_string(),
            "24001:connect,24002:busy,gpu7:11434:timeout"
        );
        assert_eq!(ctx.retries_spent(), 2);
    }

    /// The JSON lines a closure logs.
    fn logged(f: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_done_line_carries_the_tenant_and_the_failed_attempts() {
        let mut ctx = context();
        ctx.tenant = Some(Arc::from("team-a"));
        ctx.attempts = 2;
        ctx.failures.push(failure("24001", FailureKind::Reset));
        ctx.backend = Some(Arc::from("24002"));
        ctx.queue_wait = Duration::from_millis(12);
        ctx.first_byte = Some(Duration::from_millis(30));
        let lines = logged(|| {
            ctx.log_done(&Done {
                model: "llama3.2:latest",
                status: 200,
                duration: Duration::from_millis(40),
                tokens_in: 26,
                tokens_out: 94,
                outcome: "complete",
            })
        });
        let [line] = &lines[..] else {
            panic!("{lines:?}")
        };
        assert_eq!(line["message"], "request done");
        assert_eq!(line["request_id"], "req-7");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/api/chat");
        assert_eq!(line["tenant"], "team-a");
        assert_eq!(line["model"], "llama3.2:latest");
        assert_eq!(line["backend"], "24002");
        assert_eq!(line["attempts"], 2);
        assert_eq!(line["failed"], "24001:reset");
        assert_eq!(line["queue_wait_ms"], 12);
        assert_eq!(line["first_byte_ms"], 30);
        assert_eq!(line["duration_ms"], 40);
        assert_eq!(line["tokens_in"], 26);
        assert_eq!(line["tokens_out"], 94);
        assert_eq!(line["placement"], "least_busy");
        assert_eq!(line["expected_hit_tokens"], 0);
        assert_eq!(line["outcome"], "complete");
    }

    #[test]
    fn the_refused_line_carries_the_tenant_when_it_is_known() {
        let mut ctx = context();
        let before = logged(|| ctx.log_refused("none", 400, Duration::ZERO, &"bad tenant header"));
        assert_eq!(before[0]["tenant"], "", "{:?}", before[0]);
        ctx.tenant = Some(Arc::from("127.0.0.1"));
        let after = logged(|| {
            ctx.log_refused(
                "unknown",
                404,
                Duration::from_millis(3),
                &"model 'ghost' not found",
            )
        });
        assert_eq!(after[0]["message"], "request refused");
        assert_eq!(after[0]["tenant"], "127.0.0.1");
        assert_eq!(after[0]["model"], "unknown");
        assert_eq!(after[0]["status"], 404);
        assert_eq!(after[0]["duration_ms"], 3);
        assert_eq!(after[0]["error"], "model 'ghost' not found");
    }
}
