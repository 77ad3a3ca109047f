//! Response helpers: Ollama's native JSON and error shapes and texts, the
//! OpenAI ones of `/v1`, JSON in Go struct order ([`Ordered`]), random
//! hex ids, and request-body parsing with Go-decoder-like messages.

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::Value;

/// Which error shape a path answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `{"error":"…"}`
    Native,
    /// `{"error":{"message","type","param":null,"code":null}}`
    OpenAi,
}

/// Busy text, two spaces included, as Ollama has it.
pub const BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// The injected error before any byte.
pub const RUNNER_DIED: &str = "llama runner process has terminated: simulated fault";

/// The injected error after some tokens.
pub const MID_STREAM: &str = "an error was encountered while running the model: simulated fault";

/// A response with this status, content type and body.
pub fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap_or_default()
}

/// Native JSON (gin): `application/json; charset=utf-8`, no trailing newline.
pub fn native_json(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    respond(status, "application/json; charset=utf-8", body)
}

/// `/v1` JSON: `application/json` with a trailing newline.
pub fn v1_json(status: StatusCode, value: &impl Serialize) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

/// An error in the given shape.
pub fn error(shape: Shape, status: StatusCode, message: &str) -> Response {
    match shape {
        Shape::Native => native_json(status, &serde_json::json!({ "error": message })),
        Shape::OpenAi => {
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                404 => "not_found_error",
                _ => "api_error",
            };
            v1_json(
                status,
                &serde_json::json!({
                    "error": {"message": message, "type": kind, "param": null, "code": null}
                }),
            )
        }
    }
}

/// A plain-text answer (`/`, 404, 405).
pub fn text(status: StatusCode, body: &'static str) -> Response {
    respond(status, "text/plain; charset=utf-8", body)
}

/// A streaming body of already-framed chunks.
pub fn stream(content_type: &'static str, body: Body) -> Response {
    respond(StatusCode::OK, content_type, body)
}

/// JSON with keys in the order given (Go struct order), whatever
/// serde_json's map type is.
pub(crate) enum Ordered {
    /// Any value, written as serde_json writes it.
    Plain(Value),
    /// An object, keys in this order.
    Object(Vec<(&'static str, Ordered)>),
    /// An array.
    Array(Vec<Ordered>),
}

/// A plain value as [`Ordered`].
pub(crate) fn plain(value: impl Into<Value>) -> Ordered {
    Ordered::Plain(value.into())
}

impl Ordered {
    /// The JSON text.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Serialize for Ordered {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ordered::Plain(v) => v.serialize(s),
            Ordered::Object(pairs) => {
                let mut map = s.serialize_map(Some(pairs.len()))?;
                for (k, v) in pairs {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            Ordered::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
        }
    }
}

/// Random lowercase hex digits.
pub(crate) fn hex(digits: usize) -> String {
    (0..digits)
        .map(|_| char::from_digit(rand::random::<u32>() % 16, 16).unwrap_or('0'))
        .collect()
}

/// The text of a message's content: a string, or the `text` of its parts.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Parses a request body as Ollama would: 400 `missing request body` (or
/// `EOF` on `/v1`) when empty, Go-like decoder messages when malformed.
#[expect(
    clippy::result_large_err,
    reason = "the error is the answer, built once per failed request"
)]
pub fn parse<T: DeserializeOwned>(shape: Shape, body: &Bytes) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        let msg = match shape {
            Shape::Native => "missing request body",
            Shape::OpenAi => "EOF",
        };
        return Err(error(shape, StatusCode::BAD_REQUEST, msg));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = go_message(&e, body);
        error(shape, StatusCode::BAD_REQUEST, &msg)
    })
}

fn go_message(e: &serde_json::Error, body: &[u8]) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => "unexpected EOF".into(),
        Category::Syntax => {
            // serde_json's column is 1-based and points at the offending byte on its line.
            let line = body.split(|&b| b == b'\n').nth(e.line().saturating_sub(1));
            let offending = line.and_then(|l| l.get(e.column().saturating_sub(1)).copied());
            match offending {
                Some(b) if b.is_ascii_graphic() => {
                    format!(
                        "invalid character '{}' looking for beginning of value",
                        b as char
                    )
                }
                _ => "invalid character looking for beginning of value".into(),
            }
        }
        Category::Data | Category::Io => format!("json: cannot unmarshal {e}"),
    }
}
