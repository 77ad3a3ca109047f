//! The client side: one pooled HTTP/1 client to every backend, the request
//! as a backend must see it (its own `Host`, no hop-by-hop headers, no proxy
//! credentials), and [`BackendError`], which says whether an attempt may be
//! retried elsewhere.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::fleet::Target;
use crate::fleet::discovery::describe;

/// Why one attempt on a backend failed.
#[derive(Debug, thiserror::Error)]
#[error("backend {backend}: {detail}")]
pub struct BackendError {
    kind: FailureKind,
    backend: String,
    detail: String,
}

/// The kinds of attempt failure, as the `kind` label of `corral_backend_failures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// TCP connect refused or timed out.
    Connect,
    /// The backend was silent longer than BACKEND_READ_TIMEOUT_SECONDS.
    Timeout,
    /// The connection broke.
    Reset,
    /// A 5xx status.
    Status5xx,
    /// Ollama's 503 `server busy`: its own queue is full. Not a health
    /// failure: the request goes elsewhere or waits.
    Busy,
    /// The response could not be read.
    Body,
    /// 404 for a model the backend listed: another server took its port
    /// since the last scan. Not a health failure: the model is struck off
    /// that backend's list until the next probe, and another backend is tried.
    ModelMissing,
}

impl FailureKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Status5xx => "status_5xx",
            Self::Busy => "busy",
            Self::Body => "body",
            Self::ModelMissing => "model_missing",
        }
    }
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

    /// The kind of failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// Whether another backend may be tried. Every failure before the first
    /// byte reached the client is; a backend's 4xx is not a failure at all.
    pub fn is_retryable(&self) -> bool {
        true
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

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The pooled client to all backends.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    read_timeout: Duration,
}

impl Upstream {
    /// A client with these timeouts; idle connections are kept for reuse.
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self {
            client,
            read_timeout,
        }
    }

    /// The longest silence allowed from a backend.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Sends one attempt and waits for the response head. A 5xx is returned
    /// as an error: the caller retries it like a broken connection.
    pub async fn send(
        &self,
        target: &Target,
        method: &Method,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, BackendError> {
        let uri = target.uri(path_and_query).map_err(|e| {
            let detail = format!("bad URL {}{path_and_query}: {e}", target.base);
            BackendError::new(FailureKind::Connect, target, detail)
        })?;
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| {
                BackendError::new(FailureKind::Connect, target, format!("bad request: {e}"))
            })?;
        let out = request.headers_mut();
        for (name, value) in headers {
            if !is_dropped_request_header(name) {
                out.append(name.clone(), value.clone());
            }
        }
        strip_hop_by_hop(out);
        out.insert(header::HOST, target.authority.clone());
        let response = tokio::time::timeout(self.read_timeout, self.client.request(request))
            .await
            .map_err(|_| {
                BackendError::new(
                    FailureKind::Timeout,
                    target,
                    format!(
                        "no response within {:.0?} (BACKEND_READ_TIMEOUT_SECONDS)",
                        self.read_timeout
                    ),
                )
            })?
            .map_err(|e| classify(target, &e))?;
        let status = response.status();
        if status.is_server_error() {
            if status == http::StatusCode::SERVICE_UNAVAILABLE && self.is_busy(response).await {
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
    async fn is_busy(&self, response: Response<Incoming>) -> bool {
        use http_body_util::BodyExt;
        let body = http_body_util::Limited::new(response.into_body(), 4096).collect();
        match tokio::time::timeout(self.read_timeout, body).await {
            Ok(Ok(body)) => {
                let body = body.to_bytes();
                body.windows(BUSY.len()).any(|w| w == BUSY)
            }
            _ => false,
        }
    }
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
        || name == "x-api-key"
        || name == header::ORIGIN
        || name == header::ACCEPT_ENCODING
}

/// Classifies a client error: connect failures and broken connections.
fn classify(target: &Target, e: &hyper_util::client::legacy::Error) -> BackendError {
    let kind = if e.is_connect() {
        FailureKind::Connect
    } else {
        FailureKind::Reset
    };
    BackendError::new(kind, target, describe(e))
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
