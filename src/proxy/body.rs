//! Request bodies: read once under MAX_BODY_BYTES, peek only the fields that
//! routing needs (`model`, legacy `name`, `stream`), and apply the `stream`
//! default of REJECT_STREAMING. The original bytes are what gets forwarded.
//!
//! A request may wait in the queue for a long time, so what it keeps is
//! its own: the body is copied into an allocation of exactly its size, and
//! [`detach`] copies the URI and header values out of the connection's read
//! buffer (hyper hands them out as slices of it), so that thousands of
//! parked requests do not each pin a spare 8 KiB buffer.

use std::time::Duration;

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Uri};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::error::ProxyError;

/// The routing fields of a request body.
#[derive(Debug, Default, PartialEq)]
pub struct Peek {
    /// `model`, else the legacy `name` (for `/api/show`); `None` when absent or empty.
    pub model: Option<String>,
    /// `stream` as sent.
    pub stream: Option<bool>,
}

/// Only the fields routing needs; every other field is skipped (but the whole
/// document is still checked to be JSON).
#[derive(Deserialize)]
struct Fields {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<IgnoredOrString>,
    #[serde(default)]
    stream: Option<bool>,
}

/// `name` is a string on `/api/show`; elsewhere it may be anything we ignore.
#[derive(Deserialize)]
#[serde(untagged)]
enum IgnoredOrString {
    Text(String),
    Other(IgnoredAny),
}

/// Reads the whole body, refusing one over `limit` bytes without reading
/// past the limit (a declared `Content-Length` over it is refused at once).
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ProxyError::BodyTooLarge(limit));
    }
    // At most the declared length up front, so a lying header cannot make
    // us reserve more than the limit.
    let capacity = declared.map_or(0, |len| len as usize);
    let collect = collect_exact(http_body_util::Limited::new(body, limit), capacity);
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(ProxyError::BodyTimeout),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge(limit))
        }
        Ok(Err(e)) => Err(ProxyError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// The data frames of `body`, copied into one allocation of exactly their
/// total length (not slices of the connection's read buffer, and no spare
/// capacity).
async fn collect_exact<B>(mut body: B, capacity: usize) -> Result<Bytes, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut out = Vec::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    out.shrink_to_fit();
    Ok(Bytes::from(out))
}

/// Makes `parts` own what it keeps while the request waits: the URI and the
/// header values are copied into one small allocation of their own (hyper
/// parsed them as slices of the connection's 8 KiB read buffer, which they
/// would otherwise keep alive), and the extensions, which only the tenant
/// lookup before this point needs, are dropped.
pub fn detach(parts: &mut Parts) {
    parts.extensions.clear();
    let uri = parts.uri.to_string();
    let len = uri.len() + parts.headers.values().map(|v| v.len()).sum::<usize>();
    let mut store = BytesMut::with_capacity(len);
    store.put_slice(uri.as_bytes());
    for value in parts.headers.values() {
        store.put_slice(value.as_bytes());
    }
    let mut store = store.freeze();
    let uri_bytes = store.split_to(uri.len());
    if let Ok(copied) = Uri::from_maybe_shared(uri_bytes) {
        parts.uri = copied;
    }
    for value in parts.headers.values_mut() {
        let bytes = store.split_to(value.len());
        // The bytes were a valid value a moment ago.
        if let Ok(mut copied) = HeaderValue::from_maybe_shared(bytes) {
            copied.set_sensitive(value.is_sensitive());
            *value = copied;
        }
    }
}

/// Peeks the routing fields. An empty body, a body that is not a JSON object,
/// or a routing field of the wrong type is a 400, as Ollama answers.
pub fn peek(body: &[u8]) -> Result<Peek, ProxyError> {
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(ProxyError::BadRequest("missing request body".into()));
    };
    // serde would read a struct from a JSON array too (`["m", "x"]` as
    // model "m"): only an object is a request.
    if *first != b'{' {
        return Err(ProxyError::BadRequest(
            "invalid JSON body: expected an object".into(),
        ));
    }
    let fields: Fields = serde_json::from_slice(body)
        .map_err(|e| ProxyError::BadRequest(format!("invalid JSON body: {e}")))?;
    let name = match fields.name {
        Some(IgnoredOrString::Text(n)) => Some(n),
        _ => None,
    };
    let model = fields
        .model
        .filter(|m| !m.is_empty())
        .or(name.filter(|n| !n.is_empty()));
    Ok(Peek {
        model,
        stream: fields.stream,
    })
}

/// Adds `"stream":false` to a JSON object that has no `stream`, keeping every
/// other byte as sent.
pub fn with_stream_false(body: &[u8]) -> Bytes {
    let open = body.iter().position(|b| *b == b'{').unwrap_or(0);
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(if empty {
        b"\"stream\":false"
    } else {
        b"\"stream\":false,"
    });
    out.extend_from_slice(rest);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_is_copied_into_an_allocation_of_its_own_size() {
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let chunks = [read_buffer.slice(0..10), read_buffer.slice(100..105)];
        let stream = futures_util::stream::iter(
            chunks.map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(c))),
        );
        let body = http_body_util::StreamBody::new(stream);
        let bytes = collect_exact(body, 0).await.unwrap();
        assert_eq!(bytes.len(), 15);
        // Not a slice of the 8 KiB buffer: its own 15 bytes.
        let inside = read_buffer.as_ptr_range();
        assert!(!inside.contains(&bytes.as_ptr()));
        assert!(bytes.try_into_mut().is_ok_and(|b| b.capacity() == 15));
    }

    #[test]
    fn detach_keeps_the_request_and_copies_it_out_of_the_read_buffer() {
        let read_buffer = Bytes::from_static(b"/api/generate?x=1 Bearer abc llama");
        let (mut parts, ()) =
            http::Request::post(Uri::from_maybe_shared(read_buffer.slice(0..17)).unwrap())
                .body(())
                .unwrap()
                .into_parts();
        let mut secret = HeaderValue::from_maybe_shared(read_buffer.slice(18..28)).unwrap();
        secret.set_sensitive(true);
        parts.headers.insert(http::header::AUTHORIZATION, secret);
        parts.headers.append(
            "x-model",
            HeaderValue::from_maybe_shared(read_buffer.slice(29..34)).unwrap(),
        );
        parts
            .headers
            .append("x-model", HeaderValue::from_static("two"));
        parts.extensions.insert(7u32);

        detach(&mut parts);

        assert_eq!(parts.uri, "/api/generate?x=1");
        assert_eq!(parts.headers[http::header::AUTHORIZATION], "Bearer abc");
        assert!(parts.headers[http::header::AUTHORIZATION].is_sensitive());
        let models: Vec<_> = parts.headers.get_all("x-model").iter().collect();
        assert_eq!(models, ["llama", "two"]);
        assert!(parts.extensions.get::<u32>().is_none());
        let inside = read_buffer.as_ptr_range();
        for value in parts.headers.values() {
            assert!(!inside.contains(&value.as_bytes().as_ptr()));
        }
        assert!(!inside.contains(&parts.uri.path().as_ptr()));
    }

    #[test]
    fn peek_finds_model_and_stream_and_skips_the_rest() {
        let p = peek(br#"{"messages":[{"role":"user","content":"hi"}],"model":"llama3","stream":false,"options":{"a":[1,2]}}"#)
            .unwrap();
        assert_eq!(
            p,
            Peek {
                model: Some("llama3".into()),
                stream: Some(false)
            }
        );
    }

    #[test]
    fn show_accepts_the_legacy_name_field() {
        assert_eq!(
            peek(br#"{"name":"llama3"}"#).unwrap().model.as_deref(),
            Some("llama3")
        );
        assert_eq!(
            peek(br#"{"model":"a","name":"b"}"#)
                .unwrap()
                .model
                .as_deref(),
            Some("a")
        );
        assert_eq!(peek(br#"{"name":{"x":1}}"#).unwrap().model, None);
    }

    #[test]
    fn bad_bodies_are_400() {
        let cases: [&[u8]; 9] = [
            b"",
            b"   ",
            b"{\"model\":",
            b"[1,2]",
            br#"["llama3", "x", true]"#,
            br#""llama3""#,
            br#"{"model":7}"#,
            br#"{"model":"m","stream":"yes"}"#,
            b"{\"model\":\"\xff\xfe\"}",
        ];
        for body in cases {
            let e = peek(body).unwrap_err();
            assert_eq!(
                e.status(),
                http::StatusCode::BAD_REQUEST,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_in_skipped_fields_does_not_overflow_the_stack() {
        // Skipped values are walked without recursion: 100k levels neither
        // crash the proxy nor stop the request from being routed.
        let deep = format!(
            "{{\"x\":{}{},\"model\":\"m\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(peek(deep.as_bytes()).unwrap().model.as_deref(), Some("m"));
        let unbalanced = format!("{{\"model\":\"m\",\"x\":{}}}", "[".repeat(100_000));
        assert!(peek(unbalanced.as_bytes()).is_err());
    }

    #[test]
    fn stream_false_is_added_without_touching_the_rest() {
        let out = with_stream_false(br#" {"model":"m","prompt":"hi"}"#);
        assert_eq!(&out[..], br#" {"stream":false,"model":"m","prompt":"hi"}"#);
        assert_eq!(&with_stream_false(b"{ }")[..], b"{\"stream\":false }");
        let v: serde_json::Value =
            serde_json::from_slice(&with_stream_false(br#"{"model":"m"}"#)).unwrap();
        assert_eq!(v["stream"], false);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, "1000".parse().unwrap());
        let e = read(&headers, Body::from("x"), 10, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::BodyTooLarge(10)));
        let e = read(
            &HeaderMap::new(),
            Body::from(vec![b'x'; 11]),
            10,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ProxyError::BodyTooLarge(10)));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// Any JSON value, nested a few levels.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn peek_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = peek(&body);
        }

        #[test]
        fn peek_finds_model_and_stream_among_any_other_fields(
            model in ".{0,24}",
            stream in prop::option::of(any::<bool>()),
            extra in prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..6),
        ) {
            let mut doc: serde_json::Map<String, Value> = extra
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "model" | "name" | "stream"))
                .collect();
            doc.insert("model".into(), json!(model));
            if let Some(s) = stream {
                doc.insert("stream".into(), json!(s));
            }
            let bytes = serde_json::to_vec(&Value::Object(doc)).unwrap();
            let p = peek(&bytes).unwrap();
            prop_assert_eq!(p.model, (!model.is_empty()).then(|| model.clone()));
            prop_assert_eq!(p.stream, stream);
        }

        #[test]
        fn a_model_or_stream_of_the_wrong_type_is_400(
            model in any_json().prop_filter("not a string or null", |v| !v.is_string() && !v.is_null()),
            stream in any_json().prop_filter("not a bool or null", |v| !v.is_boolean() && !v.is_null()),
        ) {
            for doc in [json!({"model": model}), json!({"model": "m", "stream": stream})] {
                let e = peek(&serde_json::to_vec(&doc).unwrap()).unwrap_err();
                prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
            }
        }

        #[test]
        fn stream_false_keeps_every_other_field(
            extra in prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..6),
        ) {
            let doc: serde_json::Map<String, Value> =
                extra.into_iter().filter(|(k, _)| k != "stream").collect();
            let bytes = serde_json::to_vec(&Value::Object(doc.clone())).unwrap();
            let out: Value = serde_json::from_slice(&with_stream_false(&bytes)).unwrap();
            let mut expected = doc;
            expected.insert("stream".into(), json!(false));
            prop_assert_eq!(out, Value::Object(expected));
        }
    }
}
