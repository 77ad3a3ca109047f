//! The accounting of an answered request: the [`Ledger`] keeps the end of
//! the relayed body and how the answer ended, and when it is dropped
//! (however the answer ended: whole, broken, or the client gone) records it
//! exactly once: the request, its duration and tokens through the request's
//! metric handles, what placement predicted against what the backend
//! reported, and the `request done` log line.

use std::sync::Arc;

use super::context::{Done, RequestContext};
use crate::failure::FailureKind;
use crate::metrics::{Metrics, RequestSeries};

/// How a relayed response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The backend's body ended cleanly.
    Complete,
    /// The backend broke or went silent after the first byte.
    Broken,
    /// The client went away before the end.
    ClientGone,
}

impl Ending {
    fn label(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Broken => "broken",
            Self::ClientGone => "client_gone",
        }
    }
}

/// What is recorded when the response is over.
pub struct Ledger {
    metrics: Arc<Metrics>,
    series: Arc<RequestSeries>,
    context: RequestContext,
    status: u16,
    ending: Ending,
    /// The last bytes of the body, where the final chunk's counts are.
    tail: Vec<u8>,
    /// The counts found in `tail`, until it changes.
    counts: Option<TokenCounts>,
}

/// Bytes of the body's end kept for the token counts.
const TAIL: usize = 16 << 10;

impl Ledger {
    /// A ledger for a response with `status` that is starting; counted
    /// under `series`, the handles of its endpoint and model.
    pub fn new(
        metrics: Arc<Metrics>,
        series: Arc<RequestSeries>,
        context: RequestContext,
        status: u16,
    ) -> Self {
        Self {
            metrics,
            series,
            context,
            status,
            ending: Ending::ClientGone,
            tail: Vec::new(),
            counts: None,
        }
    }

    pub fn context(&self) -> &RequestContext {
        &self.context
    }

    pub fn tail(&self) -> &[u8] {
        &self.tail
    }

    /// The token counts at the end of the body seen so far (searched once
    /// however often asked).
    pub fn counts(&mut self) -> TokenCounts {
        *self
            .counts
            .get_or_insert_with(|| TokenCounts::find(&self.tail))
    }

    /// Keeps the end of a chunk that went to the client.
    pub fn observe(&mut self, chunk: &[u8]) {
        self.counts = None;
        let chunk = &chunk[chunk.len().saturating_sub(TAIL)..];
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(TAIL);
        self.tail.drain(..overflow);
        self.tail.extend_from_slice(chunk);
    }

    /// The body ended cleanly and is a whole answer.
    pub fn complete(&mut self) {
        self.ending = Ending::Complete;
    }

    /// The answer broke after its first byte, or ended without being whole.
    pub fn broken(&mut self) {
        self.ending = Ending::Broken;
    }

    /// Counts a break (`kind`: [`FailureKind::MidStream`] or
    /// [`FailureKind::BrokenAnswer`]) against `backend` and as a stream error.
    pub fn count_break(&self, backend: Option<&Arc<str>>, kind: FailureKind) {
        if let Some(backend) = backend {
            self.metrics.backend_failed(backend, kind);
        }
        self.series.stream_error(&self.metrics);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let counts = self.counts();
        let m = &*self.metrics;
        let ctx = &self.context;
        let duration = ctx.arrived.elapsed();
        self.series.request_done(m, self.status, duration);
        let eval_seconds = counts.eval_ns.map(|ns| ns as f64 / 1e9);
        self.series
            .tokens(m, counts.prompt, counts.generated, eval_seconds);
        if let Some((placed, estimated)) = &ctx.placed {
            m.record_placement(placed, *estimated, counts.prompt);
        }
        ctx.log_done(&Done {
            model: self.series.model(),
            status: self.status,
            duration,
            tokens_in: counts.prompt,
            tokens_out: counts.generated,
            outcome: self.ending.label(),
        });
    }
}

/// Token counts of a finished generation, native or OpenAI-style.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TokenCounts {
    pub prompt: u64,
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
        // and copy of the tail showed in the profile of small requests, as
        // did comparing each key at every position (memcmp, 2 % of the
        // proxy's CPU), which memchr's substring search replaces.
        let last = |key: &[u8]| -> Option<u64> {
            let at = memchr::memmem::rfind(tail, key)? + key.len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::endpoint::Endpoint;

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

    fn ledger(metrics: &Arc<Metrics>) -> Ledger {
        let head = http::Request::post("/api/generate")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let ctx = RequestContext::new(Endpoint::Generate, &head, tokio::time::Instant::now());
        let series = metrics.series("/api/generate", "llama3.2:latest");
        Ledger::new(Arc::clone(metrics), series, ctx, 200)
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_only() {
        let metrics = Arc::new(Metrics::new());
        let mut l = ledger(&metrics);
        l.observe(&vec![b'a'; TAIL - 2]);
        l.observe(b"bcd");
        assert_eq!(l.tail().len(), TAIL);
        assert!(l.tail().starts_with(b"aa") && l.tail().ends_with(b"abcd"));
        l.observe(&vec![b'z'; TAIL + 5]);
        assert_eq!(l.tail(), &vec![b'z'; TAIL][..]);
    }

    #[test]
    fn a_dropped_ledger_records_the_request_once() {
        let metrics = Arc::new(Metrics::new());
        let mut l = ledger(&metrics);
        l.observe(br#"{"done":true,"prompt_eval_count":3,"eval_count":4}"#);
        assert_eq!(l.counts().generated, 4);
        l.observe(br#"{"done":true,"prompt_eval_count":3,"eval_count":5}"#);
        assert_eq!(l.counts().generated, 5, "a new chunk is searched again");
        l.broken();
        l.count_break(Some(&Arc::from("24001")), FailureKind::MidStream);
        drop(l);
        let text = metrics.encode();
        for line in [
            "corral_requests_total{endpoint=\"/api/generate\",model=\"llama3.2:latest\",status=\"200\"} 1",
            "corral_tokens_total{model=\"llama3.2:latest\",direction=\"out\"} 5",
            "corral_stream_errors_total{endpoint=\"/api/generate\"} 1",
            "corral_backend_failures_total{backend=\"24001\",kind=\"mid_stream\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert_eq!(metrics.totals.view().requests, 1);
    }
}
