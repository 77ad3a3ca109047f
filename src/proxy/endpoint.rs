//! Every API corral routes, and all it knows about each: its path, whether
//! and how it streams, how a whole stream ends, the chunk that tells a client
//! its stream broke, its error shape, and how its body names the model and
//! the prompt. Per-API rules belong here; no other file matches on paths.

use bytes::Bytes;
use serde_json::json;

/// An endpoint routed to one backend, chosen per request; each is named
/// after its [`path`](Endpoint::path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Generate,
    Chat,
    Embed,
    /// The older embedding call.
    Embeddings,
    Show,
    ChatCompletions,
    Completions,
    OpenAiEmbeddings,
    /// Anthropic's Messages API.
    Messages,
    /// OpenAI's Responses API.
    Responses,
    Transcriptions,
    Speech,
}

/// The API family a path belongs to: the shape of corral's own errors, and
/// of a stream's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/api/*` and everything else: Ollama's.
    Ollama,
    /// `/v1/*`: OpenAI's.
    OpenAi,
    /// `/v1/messages`: Anthropic's.
    Anthropic,
    /// `/v1/responses`: OpenAI's errors, its own stream events.
    Responses,
}

/// Whether an endpoint streams, and in what framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// Never: `stream` means nothing to it.
    Never,
    /// When the body says `"stream": true`.
    Asked(Framing),
    /// Unless the body says `"stream": false`.
    ByDefault(Framing),
}

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

/// How a request body is written, and so where its model and prompt are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON: the model in `model` (or `name`), the prompt in the fields
    /// placement's signature reads (`messages`, `prompt`, `system`,
    /// `instructions`, `input`).
    Json,
    /// The same JSON, or that JSON in `Content-Encoding: zstd`.
    JsonOrZstd,
    /// `multipart/form-data`: the model is a form field; there is no prompt.
    Form,
}

impl Endpoint {
    /// Every routed endpoint, in PRODUCT.md's order.
    pub const ALL: [Self; 12] = [
        Self::Generate,
        Self::Chat,
        Self::Embed,
        Self::Embeddings,
        Self::Show,
        Self::ChatCompletions,
        Self::Completions,
        Self::OpenAiEmbeddings,
        Self::Messages,
        Self::Responses,
        Self::Transcriptions,
        Self::Speech,
    ];

    /// The route path, also the `endpoint` metric label and the log's `path`.
    pub fn path(self) -> &'static str {
        match self {
            Self::Generate => "/api/generate",
            Self::Chat => "/api/chat",
            Self::Embed => "/api/embed",
            Self::Embeddings => "/api/embeddings",
            Self::Show => "/api/show",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::OpenAiEmbeddings => "/v1/embeddings",
            Self::Messages => "/v1/messages",
            Self::Responses => "/v1/responses",
            Self::Transcriptions => "/v1/audio/transcriptions",
            Self::Speech => "/v1/audio/speech",
        }
    }

    /// Its API family.
    pub fn api(self) -> Api {
        match self {
            Self::Generate | Self::Chat | Self::Embed | Self::Embeddings | Self::Show => {
                Api::Ollama
            }
            Self::Messages => Api::Anthropic,
            Self::Responses => Api::Responses,
            Self::ChatCompletions
            | Self::Completions
            | Self::OpenAiEmbeddings
            | Self::Transcriptions
            | Self::Speech => Api::OpenAi,
        }
    }

    /// Whether it streams, and how.
    pub fn streaming(self) -> Streaming {
        match self {
            Self::Generate | Self::Chat => Streaming::ByDefault(Framing::Ndjson),
            Self::ChatCompletions | Self::Completions | Self::Messages | Self::Responses => {
                Streaming::Asked(Framing::Sse)
            }
            Self::Embed
            | Self::Embeddings
            | Self::Show
            | Self::OpenAiEmbeddings
            | Self::Transcriptions
            | Self::Speech => Streaming::Never,
        }
    }

    /// How its request body is written (OpenAI's clients may compress).
    pub fn format(self) -> Format {
        match (self, self.api()) {
            (Self::Transcriptions, _) => Format::Form,
            (_, Api::Ollama) => Format::Json,
            (_, Api::OpenAi | Api::Anthropic | Api::Responses) => Format::JsonOrZstd,
        }
    }

    /// Whether the backend keeps its answers, so that a later request may
    /// continue one by id (`previous_response_id`) on that backend only.
    pub fn keeps_answers(self) -> bool {
        self == Self::Responses
    }

    /// Whether a body that ended cleanly is a whole answer: no
    /// `{"error": ...}` as the last NDJSON line, and the endpoint's terminal
    /// SSE event (`data: [DONE]`, Anthropic's `message_stop`, Responses'
    /// `response.completed` or `response.failed`) at its end.
    pub fn is_whole(self, framing: Framing, tail: &[u8]) -> bool {
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
                // That event, with nothing but its own data after it.
                let last_event = |name: &str| {
                    let needle = format!("event: {name}");
                    memchr::memmem::rfind(trimmed, needle.as_bytes()).is_some_and(|at| {
                        memchr::memmem::find(&trimmed[at + needle.len()..], b"event: ").is_none()
                    })
                };
                match self.api() {
                    Api::Anthropic => last_event("message_stop"),
                    Api::Responses => {
                        last_event("response.completed") || last_event("response.failed")
                    }
                    Api::Ollama | Api::OpenAi => trimmed.ends_with(b"data: [DONE]"),
                }
            }
        }
    }

    /// The last chunk that tells the client the stream broke, if the
    /// framing has one: an `{"error"}` line, an error event in the shape of
    /// the endpoint's API (Anthropic's and the Responses API's own `error`
    /// events; OpenAI's error object elsewhere). Never a terminal event.
    pub fn break_chunk(self, framing: Framing, message: &str) -> Option<Bytes> {
        let chunk = match (framing, self.api()) {
            (Framing::Plain, _) => return None,
            (Framing::Ndjson, _) => format!("{}\n", json!({ "error": message })),
            (Framing::Sse, Api::Anthropic) => {
                let event = json!({ "type": "error", "error": { "type": "api_error", "message": message } });
                format!("event: error\ndata: {event}\n\n")
            }
            (Framing::Sse, Api::Responses) => {
                let event = json!({ "type": "error", "code": "api_error", "message": message, "param": null });
                format!("event: error\ndata: {event}\n\n")
            }
            (Framing::Sse, Api::Ollama | Api::OpenAi) => {
                let event = json!({ "error": { "message": message, "type": "api_error", "param": null, "code": null } });
                format!("data: {event}\n\n")
            }
        };
        Some(Bytes::from(chunk))
    }
}

impl Api {
    /// The family of any request path, routed or not (an API key's refusal
    /// comes before routing).
    pub fn of(path: &str) -> Self {
        if let Some(endpoint) = Endpoint::ALL.into_iter().find(|e| e.path() == path) {
            endpoint.api()
        } else if path.starts_with("/v1/messages/") {
            Self::Anthropic
        } else if path.starts_with("/v1/") {
            Self::OpenAi
        } else {
            Self::Ollama
        }
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use Endpoint::*;

    #[test]
    fn every_endpoint_has_its_own_path_and_its_family_by_prefix() {
        for (i, e) in Endpoint::ALL.iter().enumerate() {
            assert!(!Endpoint::ALL[..i].iter().any(|o| o.path() == e.path()));
            let v1 = e.api() != Api::Ollama;
            assert_eq!(e.path().starts_with("/v1/"), v1, "{e:?}");
        }
        assert_eq!(Api::of("/v1/messages/count_tokens"), Api::Anthropic);
        assert_eq!(Api::of("/v1/models"), Api::OpenAi);
        assert_eq!(Api::of("/api/tags"), Api::Ollama);
    }

    #[test]
    fn a_break_chunk_never_reads_as_a_whole_stream() {
        for e in Endpoint::ALL {
            if let Streaming::Asked(framing) | Streaming::ByDefault(framing) = e.streaming() {
                let chunk = e.break_chunk(framing, "boom").unwrap();
                assert!(!e.is_whole(framing, &chunk), "{e:?}");
            }
        }
    }

    #[test]
    fn whole_answers_end_with_their_terminal_event() {
        let done = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert!(ChatCompletions.is_whole(Framing::Sse, done));
        assert!(!ChatCompletions.is_whole(Framing::Sse, b"data: {\"choices\":[]}\n\n"));
        let stop = b"event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(Messages.is_whole(Framing::Sse, stop));
        assert!(!Messages.is_whole(Framing::Sse, b"event: content_block_delta\ndata: {}\n\n"));
        let completed = b"event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n";
        assert!(Responses.is_whole(Framing::Sse, completed));
        let cut = b"event: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n";
        assert!(!Responses.is_whole(Framing::Sse, cut));
        assert!(Chat.is_whole(Framing::Ndjson, b"{\"done\":false}\n{\"done\":true}\n"));
        assert!(!Chat.is_whole(Framing::Ndjson, b"{\"done\":false}\n{\"error\":\"boom\"}\n"));
        assert!(Speech.is_whole(Framing::Plain, b"RIFF"));
    }

    #[test]
    fn error_chunks_fit_their_framing() {
        let line = Chat.break_chunk(Framing::Ndjson, "boom").unwrap();
        assert_eq!(&line[..], b"{\"error\":\"boom\"}\n");
        let event = ChatCompletions.break_chunk(Framing::Sse, "boom").unwrap();
        assert!(event.starts_with(b"data: {\"error\":{") && event.ends_with(b"\n\n"));
        let event = Messages.break_chunk(Framing::Sse, "boom").unwrap();
        assert!(event.starts_with(b"event: error\ndata: {") && event.ends_with(b"\n\n"));
        assert!(!Messages.is_whole(Framing::Sse, &event));
        let event = Responses.break_chunk(Framing::Sse, "boom").unwrap();
        assert!(!Responses.is_whole(Framing::Sse, &event));
        assert!(Speech.break_chunk(Framing::Plain, "boom").is_none());
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
