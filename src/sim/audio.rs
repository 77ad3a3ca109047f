//! Audio: `POST /v1/audio/transcriptions` (Ollama v0.20+, OLLAMA_API_ADDENDUM.md
//! §6: a multipart form, nothing sent until the transcript is whole, `{"text"}`
//! or bare text) and `POST /v1/audio/speech` (§10, known only from the
//! documentation of v0.40.8+: OpenAI's `{model, input, voice,
//! response_format}`, voices `Freya` (default), `Harper`, `Sterling`, `Toby`,
//! input up to 4,096 characters; the validation texts are the simulator's).
//! Speech is a WAV (or raw PCM) stream, one 20 ms chunk of tone per token,
//! sent as it is generated.

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::events::connection_reset;
use super::generation::{Ask, Generation, Step};
use super::reply::{self, Shape, respond, v1_json};
use super::state::SharedState;

fn bad_request(msg: &str) -> Response {
    reply::error(Shape::OpenAi, StatusCode::BAD_REQUEST, msg)
}

/// The fields of a transcription form.
#[derive(Default)]
struct Form {
    model: String,
    file: Option<Bytes>,
    response_format: String,
    prompt: String,
}

async fn read_form(headers: &HeaderMap, body: Bytes) -> Result<Form, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(ct).map_err(|e| e.to_string())?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
        let name = field.name().unwrap_or_default().to_string();
        let data = field.bytes().await.map_err(|e| e.to_string())?;
        let text = || String::from_utf8_lossy(&data).trim().to_string();
        match name.as_str() {
            "model" => form.model = text(),
            "response_format" => form.response_format = text(),
            "prompt" => form.prompt = text(),
            "file" => form.file = Some(data),
            _ => {}
        }
    }
    Ok(form)
}

/// `POST /v1/audio/transcriptions`.
pub(crate) async fn transcriptions(
    State(state): SharedState,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = match read_form(&headers, body).await {
        Ok(f) => f,
        Err(e) => return bad_request(&format!("failed to parse multipart form: {e}")),
    };
    if form.model.is_empty() {
        return bad_request("model is required");
    }
    let Some(file) = form.file else {
        return bad_request("file is required: http: no such file");
    };
    if file.is_empty() {
        return bad_request("audio file is empty");
    }
    let mut h = DefaultHasher::new();
    file.hash(&mut h);
    let input = format!("audio {:016x} {}", h.finish(), form.prompt);
    let ask = Ask {
        model: &form.model,
        input: &input,
        all_text: &input,
        limit: None,
        cloud: false,
    };
    let mut turn = match Generation::start(&state, &headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return reply::error(Shape::OpenAi, status, &msg),
    };
    let Ok(text) = turn.whole().await else {
        // A failure after the head: Ollama sends 200 with an empty body.
        return respond(StatusCode::OK, "application/json", Body::empty());
    };
    let text = text.trim().to_string();
    if form.response_format == "text" {
        return respond(StatusCode::OK, "text/plain; charset=utf-8", text);
    }
    v1_json(StatusCode::OK, &json!({ "text": text }))
}

/// Voices of the speech model, as the documentation lists them.
const VOICES: [&str; 4] = ["Freya", "Harper", "Sterling", "Toby"];
/// Samples per second of the generated audio.
const RATE: u32 = 24_000;
/// Samples per token: 20 ms.
const PER_TOKEN: usize = 480;

/// The 44-byte header of a mono 16-bit WAV with `samples` samples.
fn wav_header(samples: usize) -> Vec<u8> {
    let data = (samples * 2) as u32;
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&RATE.to_le_bytes());
    h.extend_from_slice(&(RATE * 2).to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data.to_le_bytes());
    h
}

/// 20 ms of a tone whose pitch comes from the token.
fn tone(token: &str) -> Vec<u8> {
    let mut h = DefaultHasher::new();
    token.hash(&mut h);
    let period = 20 + (h.finish() % 80) as usize;
    (0..PER_TOKEN)
        .flat_map(|i| {
            let s: i16 = if (i % period) < period / 2 {
                6000
            } else {
                -6000
            };
            s.to_le_bytes()
        })
        .collect()
}

/// `POST /v1/audio/speech`.
pub(crate) async fn speech(State(state): SharedState, headers: HeaderMap, body: Bytes) -> Response {
    let req: Value = match reply::parse(Shape::OpenAi, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let model = req["model"].as_str().unwrap_or_default();
    if model.is_empty() {
        return bad_request("model is required");
    }
    let input = req["input"].as_str().unwrap_or_default();
    if input.trim().is_empty() {
        return bad_request("input is required");
    }
    if input.chars().count() > 4096 {
        return bad_request("input must be at most 4096 characters");
    }
    let voice = req["voice"].as_str().unwrap_or("Freya");
    if !VOICES.contains(&voice) {
        return bad_request(&format!("voice {} not found", json!(voice)));
    }
    let wav = !matches!(req["response_format"].as_str(), Some("pcm"));
    let text = format!("{voice} {input}");
    let ask = Ask {
        model,
        input: &text,
        all_text: input,
        limit: None,
        cloud: false,
    };
    let mut turn = match Generation::start(&state, &headers, ask).await {
        Ok(t) => t,
        Err((status, msg)) => return reply::error(Shape::OpenAi, status, &msg),
    };
    let samples = turn.limit() * PER_TOKEN;
    let first = match turn.next().await {
        Step::Token(t) => t,
        _ => {
            return reply::error(
                Shape::OpenAi,
                StatusCode::INTERNAL_SERVER_ERROR,
                "speech failed",
            );
        }
    };
    let mut head = if wav { wav_header(samples) } else { Vec::new() };
    head.extend(tone(&first));
    let rest = futures_util::stream::unfold(turn, |mut turn| async move {
        match turn.next().await {
            Step::Token(t) => Some((Ok(Bytes::from(tone(&t))), turn)),
            Step::Reset => Some((Err(connection_reset()), turn)),
            Step::Done | Step::Lost => None,
        }
    });
    use futures_util::StreamExt;
    let body =
        futures_util::stream::iter([Ok::<Bytes, std::io::Error>(Bytes::from(head))]).chain(rest);
    let content_type = if wav { "audio/wav" } else { "audio/pcm" };
    respond(StatusCode::OK, content_type, Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wav_header_describes_its_data() {
        let h = wav_header(480);
        assert_eq!(h.len(), 44);
        assert_eq!(&h[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(h[40..44].try_into().unwrap()), 960);
        assert_eq!(tone("x").len(), 960);
    }
}
