//! Request bodies: read once under MAX_BODY_BYTES, peek only the fields that
//! routing needs (`model`, legacy `name`, `stream`), and apply the `stream`
//! default of REJECT_STREAMING. The original bytes are what gets forwarded.

use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
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
    let collect = http_body_util::Limited::new(body, limit).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(ProxyError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge(limit))
        }
        Ok(Err(e)) => Err(ProxyError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
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
