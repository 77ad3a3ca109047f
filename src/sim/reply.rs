//! Response helpers: Ollama's native JSON and error shapes, the OpenAI ones
//! of `/v1`, and request-body parsing with Go-decoder-like messages.

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

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

fn with_body(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap_or_default()
}

/// Native JSON (gin): `application/json; charset=utf-8`, no trailing newline.
pub fn native_json(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    with_body(status, "application/json; charset=utf-8", body)
}

/// `/v1` JSON: `application/json` with a trailing newline.
pub fn v1_json(status: StatusCode, value: &impl Serialize) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    with_body(status, "application/json", body)
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
    with_body(status, "text/plain; charset=utf-8", body)
}

/// A streaming body of already-framed chunks.
pub fn stream(content_type: &'static str, body: Body) -> Response {
    with_body(StatusCode::OK, content_type, body)
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
            // serde_json's column is 1-based and points at the bad byte on its line.
            let line = body.split(|&b| b == b'\n').nth(e.line().saturating_sub(1));
            let bad = line.and_then(|l| l.get(e.column().saturating_sub(1)).copied());
            match bad {
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
