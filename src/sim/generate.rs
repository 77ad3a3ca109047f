//! Deterministic output: the tokens of an answer and the embedding of an
//! input, both a pure function of (server seed, model, input), and the wire
//! shapes of NDJSON lines and SSE events (OLLAMA_API.md §3, §4).

use std::hash::{DefaultHasher, Hash, Hasher};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::name::Name;

const WORDS: &[&str] = &[
    "the", "llama", "runs", "across", "green", "hills", "while", "models", "answer", "every",
    "question", "with", "quiet", "care", "tokens", "flow", "like", "water", "over", "stones",
    "and", "servers", "hum", "softly", "in", "dark", "rooms", "a", "proxy", "balances", "load",
    "between", "many", "small", "machines", "that", "never", "sleep", "under", "bright", "stars",
    "each", "request", "finds", "its", "way", "home", "through", "queues", "of", "patient",
    "words", "waiting", "for", "their", "turn", "to", "speak", "clearly", "at", "last", "again",
    "today", "now",
];

/// Stable seed of an output: the same (seed, model, input) gives the same
/// seed within one build of corral. Model names are compared in their
/// canonical form, so `llama3.2` and `Llama3.2:latest` give the same text.
fn seed_of(seed: u64, model: &str, input: &str, salt: u8) -> u64 {
    let key = Name::parse(model).map_or_else(|| model.to_ascii_lowercase(), |n| n.key());
    let mut h = DefaultHasher::new();
    (salt, seed, key, input).hash(&mut h);
    h.finish()
}

/// The tokens of an answer, lazily: the first is a bare word, each other one
/// a space and a word.
pub struct Tokens {
    rng: StdRng,
    first: bool,
}

impl Tokens {
    /// Tokens for `input` (the prompt, or the last user message of a chat).
    pub fn new(seed: u64, model: &str, input: &str) -> Tokens {
        Tokens {
            rng: StdRng::seed_from_u64(seed_of(seed, model, input, 0)),
            first: true,
        }
    }

    /// The next token.
    pub fn next_token(&mut self) -> String {
        let space = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        format!("{space}{}", WORDS[self.rng.random_range(0..WORDS.len())])
    }
}

/// The exact answer text a server with `seed` gives for `model` and `input`
/// (the prompt, or the content of the last user message) with `tokens`
/// tokens. Tests use it to assert on content.
pub fn expected_text(seed: u64, model: &str, input: &str, tokens: usize) -> String {
    expected_tokens(seed, model, input, tokens).concat()
}

/// The exact tokens of [`expected_text`], one per stream chunk.
pub fn expected_tokens(seed: u64, model: &str, input: &str, tokens: usize) -> Vec<String> {
    let mut t = Tokens::new(seed, model, input);
    (0..tokens).map(|_| t.next_token()).collect()
}

/// Raw (not normalised) embedding values; `/api/embeddings` serves these.
pub fn raw_embedding(seed: u64, model: &str, input: &str, dim: usize) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed_of(seed, model, input, 1));
    (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// The L2-normalised embedding `/api/embed` and `/v1/embeddings` serve.
pub fn expected_embedding(seed: u64, model: &str, input: &str, dim: usize) -> Vec<f32> {
    let raw = raw_embedding(seed, model, input, dim);
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// Tokens Ollama would count for a text: here, its words (at least 1).
pub fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count().max(1) as u64
}

/// `created_at`: UTC, RFC 3339, fraction with trailing zeros trimmed (Go style).
pub fn now_rfc3339() -> String {
    let s = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    trim_fraction(s)
}

/// Local time `offset` from now, RFC 3339 with the local offset (`expires_at`).
pub fn local_rfc3339(offset: chrono::Duration) -> String {
    let t = chrono::Local::now() + offset;
    trim_fraction(t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
}

fn trim_fraction(s: String) -> String {
    let Some(dot) = s.find('.') else { return s };
    let end = s[dot..]
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or(s.len(), |i| dot + i);
    let fraction = s[dot..end].trim_end_matches('0').trim_end_matches('.');
    format!("{}{fraction}{}", &s[..dot], &s[end..])
}

/// The six metric fields of a final object, in nanoseconds (never 0).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Metrics {
    /// Request start to done.
    pub total_duration: u64,
    /// Request start to slot acquired (queueing and loading included).
    pub load_duration: u64,
    /// Tokens in the prompt.
    pub prompt_eval_count: u64,
    /// Time spent on the prompt.
    pub prompt_eval_duration: u64,
    /// Tokens generated.
    pub eval_count: u64,
    /// Time spent generating.
    pub eval_duration: u64,
}

/// Chat `message`.
#[derive(Serialize)]
pub struct Message<'a> {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: &'a str,
}

/// One `/api/generate` or `/api/chat` object (stream chunk, final line or
/// whole answer); the fields a kind does not use are left out.
#[derive(Serialize)]
pub struct NativeChunk<'a> {
    /// The model string as sent.
    pub model: &'a str,
    /// UTC timestamp.
    pub created_at: String,
    /// Generate text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<&'a str>,
    /// Chat message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message<'a>>,
    /// True on the last object.
    pub done: bool,
    /// `stop`, `length`, `load` or `unload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_reason: Option<&'a str>,
    /// Token ids (generate only, final object only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Vec<u64>>,
    /// Metrics (final object only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

impl<'a> NativeChunk<'a> {
    /// A generate (or, with `chat`, a chat) object carrying `text`, stamped
    /// now; done when it has a `done_reason`. No context, no metrics.
    pub(crate) fn new(
        model: &'a str,
        chat: bool,
        text: &'a str,
        done_reason: Option<&'a str>,
    ) -> NativeChunk<'a> {
        NativeChunk {
            model,
            created_at: now_rfc3339(),
            response: (!chat).then_some(text),
            message: chat.then_some(Message {
                role: "assistant",
                content: text,
            }),
            done: done_reason.is_some(),
            done_reason,
            context: None,
            metrics: None,
        }
    }
}

/// Serialises `value` as one NDJSON line.
pub fn ndjson_line(value: &impl Serialize) -> Bytes {
    let json = serde_json::to_vec(value).unwrap_or_default();
    Bytes::from([&json[..], b"\n"].concat())
}

/// Serialises `value` as one SSE event `data: <json>\n\n`.
pub fn sse_event(value: &impl Serialize) -> Bytes {
    let json = serde_json::to_vec(value).unwrap_or_default();
    Bytes::from([b"data: ", &json[..], b"\n\n"].concat())
}

/// The SSE end marker.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_deterministic_and_depends_on_every_input() {
        let a = expected_text(1, "llama3.2", "hi", 8);
        assert_eq!(a, expected_text(1, "Llama3.2:latest", "hi", 8));
        assert_ne!(a, expected_text(2, "llama3.2", "hi", 8));
        assert_ne!(a, expected_text(1, "llama3.2", "ho", 8));
        assert_eq!(a, expected_tokens(1, "llama3.2", "hi", 8).concat());
        assert_eq!(a.split(' ').count(), 8);
    }

    #[test]
    fn embeddings_are_unit_length() {
        let e = expected_embedding(0, "all-minilm", "x", 16);
        let norm: f32 = e.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn timestamps_trim_trailing_zeros() {
        assert_eq!(
            trim_fraction("2025-01-01T00:00:00.120000000Z".into()),
            "2025-01-01T00:00:00.12Z"
        );
        assert_eq!(
            trim_fraction("2025-01-01T00:00:00.000000000+02:00".into()),
            "2025-01-01T00:00:00+02:00"
        );
    }
}
