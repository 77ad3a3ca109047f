//! The client side: requests to backends on corral's own connections
//! ([`pool`](crate::pool)), the request as a backend must see it (its own
//! `Host`, no hop-by-hop headers, no proxy credentials), their bodies read
//! chunk by chunk under the read timeout ([`next_chunk`]), and
//! [`BackendError`], why an attempt failed (every such failure, before the
//! client has a byte, may be retried elsewhere; a backend's 4xx is no
//! failure at all).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};

use super::headers::X_API_KEY;
use crate::config::ServeArgs;
pub use crate::failure::FailureKind;
use crate::fleet::Target;
pub use crate::pool::BackendBody;

/// Why one attempt on a backend failed.
#[derive(Debug, thiserror::Error)]
#[error("backend {backend}: {detail}")]
pub struct BackendError {
    kind: FailureKind,
    backend: String,
    detail: String,
}

impl BackendError {
    /// A failure of `kind` on `target`.
    pub fn new(kind: FailureKind, target: &Target, detail: impl Into<String>) -> Self {
        Self {
            kind,
            backend: target.id.to_string(),
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> FailureKind {
        self.kind
    }
}

/// Why a backend's body stopped short of its end.
#[derive(Debug)]
pub enum Cut {
    /// The connection broke.
    Broke(hyper::Error),
    /// Nothing came for the read timeout.
    Silent,
}

/// The next non-empty data chunk of `body` (`None` at its end), waiting at
/// most `timeout` for each frame.
pub async fn next_chunk(body: &mut BackendBody, timeout: Duration) -> Result<Option<Bytes>, Cut> {
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => return Ok(Some(data)),
                _ => {}
            },
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(Cut::Broke(e)),
            Err(_) => return Err(Cut::Silent),
        }
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header
/// names. Most messages have none: one pass over the names finds that.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = connection_named(headers).collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The headers a `Connection` header names.
fn connection_named(headers: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
}

/// Sends one attempt of the client's request `head` and waits for the
/// response head, under BACKEND_CONNECT_TIMEOUT_SECONDS and
/// BACKEND_READ_TIMEOUT_SECONDS. A 5xx is returned as an error: the caller
/// retries it like a broken connection.
pub async fn send(
    args: &ServeArgs,
    target: &Target,
    head: &http::request::Parts,
    body: Bytes,
) -> Result<Response<BackendBody>, BackendError> {
    let read_timeout = args.backend_read_timeout;
    let root = http::uri::PathAndQuery::from_static("/");
    let path = head.uri.path_and_query().unwrap_or(&root);
    let request = outgoing(target, &head.method, path, &head.headers, body)?;
    let sent = target.conns.send(request, args.backend_connect_timeout);
    let response = tokio::time::timeout(read_timeout, sent)
        .await
        .map_err(|_| {
            BackendError::new(
                FailureKind::Timeout,
                target,
                format!("no response within {read_timeout:.0?} (BACKEND_READ_TIMEOUT_SECONDS)"),
            )
        })?
        .map_err(|e| BackendError::new(e.kind(), target, e.to_string()))?;
    let status = response.status();
    if status.is_server_error() {
        if status == http::StatusCode::SERVICE_UNAVAILABLE && is_busy(response, read_timeout).await
        {
            return Err(BackendError::new(
                FailureKind::Busy,
                target,
                "server busy: its own queue is full (503)",
            ));
        }
        return Err(BackendError::new(
            FailureKind::Status5xx,
            target,
            format!("answered {status}"),
        ));
    }
    Ok(response)
}

/// Whether a 503 is Ollama's `server busy, please try again.  maximum
/// pending requests exceeded` (a short body, read with the read timeout).
async fn is_busy(response: Response<BackendBody>, read_timeout: Duration) -> bool {
    let body = http_body_util::Limited::new(response.into_body(), 4096).collect();
    let body = tokio::time::timeout(read_timeout, body).await;
    body.is_ok_and(|b| b.is_ok_and(|b| memchr::memmem::find(&b.to_bytes(), BUSY).is_some()))
}

/// The request as the backend gets it: origin-form path (with the backend
/// URL's prefix), its own `Host`, end-to-end headers only.
fn outgoing(
    target: &Target,
    method: &Method,
    path_and_query: &http::uri::PathAndQuery,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, BackendError> {
    let uri = target.path(path_and_query).map_err(|e| {
        let detail = format!("bad URL {}{path_and_query}: {e}", target.base);
        BackendError::new(FailureKind::Connect, target, detail)
    })?;
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    let out = request.headers_mut();
    out.reserve(headers.len() + 1);
    for (name, value) in headers {
        if !is_dropped_request_header(name) && !HOP_BY_HOP.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    if headers.contains_key(header::CONNECTION) {
        for name in connection_named(headers) {
            out.remove(name);
        }
    }
    out.insert(header::HOST, target.authority.clone());
    Ok(request)
}

/// The start of Ollama's busy message.
const BUSY: &[u8] = b"server busy, please try again.";

/// Request headers a backend must not get: its `Host` is set anew, the body
/// length is recomputed, the proxy's credentials stay with the proxy, and a
/// browser's `Origin` would make a loopback Ollama answer 403.
fn is_dropped_request_header(name: &HeaderName) -> bool {
    name == header::HOST
        || name == header::CONTENT_LENGTH
        || name == header::AUTHORIZATION
        || name == X_API_KEY
        || name == header::ORIGIN
        || name == header::ACCEPT_ENCODING
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn the_backend_gets_its_own_host_an_origin_form_path_and_end_to_end_headers() {
        let target = Target::new(
            crate::fleet::BackendId::Port(24001),
            &"http://127.0.0.1:24001".parse().unwrap(),
        );
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "corral.example".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.append("x-trace", "a".parse().unwrap());
        h.append("x-trace", "b".parse().unwrap());
        let pq = http::uri::PathAndQuery::from_static("/api/chat?x=1");
        let request = outgoing(&target, &Method::POST, &pq, &h, Bytes::new()).unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/api/chat?x=1");
        let out = request.headers();
        assert_eq!(out[header::HOST], "127.0.0.1:24001");
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
        assert_eq!(out.get_all("x-trace").iter().count(), 2);
        assert_eq!(out.len(), 4, "{out:?}");
    }

    #[test]
    fn host_credentials_and_origin_are_not_forwarded() {
        for name in [
            header::HOST,
            header::AUTHORIZATION,
            header::ORIGIN,
            header::CONTENT_LENGTH,
            HeaderName::from_static("x-api-key"),
        ] {
            assert!(is_dropped_request_header(&name), "{name}");
        }
        assert!(!is_dropped_request_header(&header::USER_AGENT));
    }
}
