//! The routing fields of bodies that are not plain JSON (the endpoint's
//! [`Format`] says which may come): zstd-encoded JSON (decoded only to be
//! read; the original bytes are forwarded) and multipart forms, whose
//! `model` is a form field.

use std::io::Read;

use bytes::Bytes;
use http::HeaderMap;

use super::body::{self, Peek};
use super::endpoint::{Endpoint, Format};
use super::error::ProxyError;

/// The routing fields of a request to `endpoint`.
pub async fn peek(
    endpoint: Endpoint,
    headers: &HeaderMap,
    bytes: &Bytes,
    limit: usize,
) -> Result<(Peek, Option<Bytes>), ProxyError> {
    match endpoint.format() {
        // Boxed: the multipart reader's state is kilobytes, which would
        // otherwise size every routed request's future, parked ones too.
        Format::Form => Ok((Box::pin(form_model(headers, bytes.clone())).await?, None)),
        Format::JsonOrZstd if is_zstd(headers) => {
            let plain = unzstd(bytes, limit)?;
            Ok((body::peek(&plain)?, Some(plain)))
        }
        Format::Json | Format::JsonOrZstd => Ok((body::peek(bytes)?, None)),
    }
}

fn is_zstd(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("zstd"))
}

/// Decodes a zstd body of at most `limit` decoded bytes (window at most 8 MiB).
pub fn unzstd(bytes: &[u8], limit: usize) -> Result<Bytes, ProxyError> {
    let bad = |e: std::io::Error| {
        ProxyError::BadRequest(format!("failed to decompress request body: {e}"))
    };
    let mut decoder = zstd::stream::read::Decoder::new(bytes).map_err(bad)?;
    // Ollama's decoder takes windows of 8 MiB at most: a frame that asks
    // for more memory is refused, not obeyed.
    decoder.window_log_max(23).map_err(bad)?;
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(bad)?;
    if out.len() > limit {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    Ok(Bytes::from(out))
}

/// The `model` field of a `multipart/form-data` body; `None` when the form
/// has none (the backend then answers `model is required`).
async fn form_model(headers: &HeaderMap, bytes: Bytes) -> Result<Peek, ProxyError> {
    let bad = |e: &dyn std::fmt::Display| {
        ProxyError::BadRequest(format!("failed to parse multipart form: {e}"))
    };
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|e| bad(&e))?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
    let mut form = multer::Multipart::new(stream, boundary);
    while let Some(field) = form.next_field().await.map_err(|e| bad(&e))? {
        if field.name() == Some("model") {
            let model = field.text().await.map_err(|e| bad(&e))?.trim().to_string();
            return Ok(Peek {
                model: (!model.is_empty()).then_some(model),
                stream: None,
            });
        }
    }
    Ok(Peek::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoint whose model is a form field.
    const FORM: Endpoint = Endpoint::Transcriptions;

    #[test]
    fn zstd_bodies_decode_and_junk_is_400() {
        let body = br#"{"model":"llama3.2","input":"hi"}"#;
        let packed = zstd::encode_all(&body[..], 3).unwrap();
        assert_eq!(&unzstd(&packed, 1 << 20).unwrap()[..], body);
        let e = unzstd(b"not zstd at all", 1 << 20).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        let big = zstd::encode_all(&vec![b' '; 4096][..], 3).unwrap();
        assert!(matches!(
            unzstd(&big, 100),
            Err(ProxyError::BodyTooLarge(100))
        ));
    }

    #[tokio::test]
    async fn the_form_model_is_found_among_other_fields() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let form = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\0\0\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";
        let (peek, _) = peek(FORM, &headers, &Bytes::from(form), 1 << 20)
            .await
            .unwrap();
        assert_eq!(peek.model.as_deref(), Some("whisper"));
        let e = peek_err(&headers, "garbage").await;
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }

    async fn peek_err(headers: &HeaderMap, body: &'static str) -> ProxyError {
        peek(FORM, headers, &Bytes::from(body), 1 << 20)
            .await
            .unwrap_err()
    }
}
