//! The path of a routed request, from body to streamed answer:
//!
//! ```text
//! read body (MAX_BODY_BYTES) ─ peek model/stream ─ REJECT_STREAMING rule
//!   └─> acquire a slot (404 unknown model · 503 queue full/timeout · wait FIFO)
//!         └─> send to the slot's backend, wait for the head and first chunk
//!               ├─ ok ──> answer: head + first chunk + the rest as it comes;
//!               │         the slot rides with the body until it ends or the
//!               │         client leaves
//!               └─ connect error · timeout · reset · 5xx (nothing sent yet)
//!                     └─> mark backend unhealthy, exclude it, and acquire
//!                         again, up to MAX_RETRIES times; then 502
//! ```

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use http::request::Parts;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::App;
use super::body;
use super::error::{Api, ProxyError};
use super::routes::REQUEST_ID;
use super::stream::{Framing, Ledger, Relay, RequestInfo};
use super::upstream::{BackendError, FailureKind, strip_hop_by_hop};
use crate::fleet::placement::{Routing, Signature};
use crate::fleet::{AcquireError, Rejection, Slot, Want};
use crate::metrics::EndpointLabels;
use crate::model::ModelName;

/// Endpoints that stream when `stream` is absent.
const STREAM_BY_DEFAULT: [&str; 2] = ["/api/generate", "/api/chat"];
/// Endpoints that can stream at all.
const CAN_STREAM: [&str; 4] = [
    "/api/generate",
    "/api/chat",
    "/v1/chat/completions",
    "/v1/completions",
];

/// Handles one routed request on `endpoint`.
pub async fn forward(
    State(app): State<Arc<App>>,
    endpoint: &'static str,
    request: Request,
) -> Response {
    let started = Instant::now();
    let api = Api::of(endpoint);
    let mut model: Option<ModelName> = None;
    // The request-id middleware has set it; kept for the refusal line.
    let request_id = request.headers().get(REQUEST_ID).cloned();
    match route(&app, endpoint, request, started, &mut model).await {
        Ok(response) => response,
        Err(error) => {
            // A model no backend ever listed is labelled `unknown`, so that
            // made-up names cannot grow the series without bound.
            let model_label = match &model {
                None => Arc::from("none"),
                Some(m) if app.fleet.read(|s| s.is_known(m)) => Arc::from(m.display()),
                Some(_) => Arc::from("unknown"),
            };
            let response = error.render(api);
            let status = response.status().as_u16();
            let duration = started.elapsed();
            tracing::info!(
                request_id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default(),
                endpoint,
                model = %model_label,
                status,
                duration_ms = duration.as_millis() as u64,
                error = %error,
                "request refused"
            );
            app.metrics
                .request_done(endpoint, &model_label, status, duration);
            response
        }
    }
}

async fn route(
    app: &App,
    endpoint: &'static str,
    request: Request,
    started: Instant,
    model_out: &mut Option<ModelName>,
) -> Result<Response, ProxyError> {
    let (parts, body) = request.into_parts();
    let bytes = body::read(
        &parts.headers,
        body,
        app.args.max_body_bytes,
        app.args.client_header_timeout,
    )
    .await?;
    let peek = body::peek(&bytes)?;
    let bytes = apply_stream_rule(app.args.reject_streaming, endpoint, peek.stream, bytes)?;
    let model = peek.model.as_deref().map(ModelName::parse);
    *model_out = model.clone();
    let signature = (app.args.routing == Routing::CacheAware)
        .then(|| Signature::of(&bytes, &parts.headers))
        .flatten()
        .map(Arc::new);
    let mut want = Want {
        model,
        tried: Vec::new(),
        signature,
    };
    let mut attempts: u32 = 0;
    let mut queue_wait = std::time::Duration::ZERO;
    let mut last_error: Option<BackendError> = None;
    loop {
        let waited = Instant::now();
        let slot = match app.fleet.acquire(want.clone(), bytes.len()).await {
            Ok(slot) => slot,
            Err(e) => return Err(refusal(app, e, peek.model.as_deref(), last_error.as_ref())),
        };
        let wait = waited.elapsed();
        queue_wait += wait;
        app.metrics.queue_waited(wait);
        attempts += 1;
        if attempts > 1 {
            app.metrics.retries.inc();
        }
        let backend = Arc::clone(&slot.target().label);
        app.metrics.backend_attempted(&backend);
        match attempt(app, &slot, &parts, bytes.clone(), want.model.as_ref()).await {
            Ok((head, rest, first)) => {
                // A backend that listed the model took it: it is known.
                let model_label = want.model.as_ref().map_or("none", ModelName::display);
                let ledger = Ledger::new(
                    Arc::clone(&app.metrics),
                    endpoint,
                    Arc::from(model_label),
                    head.status.as_u16(),
                    started,
                    RequestInfo {
                        request_id: parts.headers.get(REQUEST_ID).cloned(),
                        method: parts.method.clone(),
                        path: endpoint,
                        backend: Arc::clone(&backend),
                        attempts,
                        queue_wait,
                        placed: want.signature.as_deref().and_then(|s| {
                            let estimated = (s.bytes / 4) as u64;
                            s.placed().map(|p| (p, estimated))
                        }),
                    },
                );
                app.metrics
                    .time_to_first_byte
                    .get_or_create(&EndpointLabels { endpoint })
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(endpoint, %backend, attempts, queue_wait_ms = queue_wait.as_millis() as u64, status = head.status.as_u16(), "answering");
                return Ok(respond(
                    app, head, rest, first, slot, ledger, attempts, queue_wait,
                ));
            }
            Err(error) => {
                tracing::warn!(endpoint, %backend, attempt = attempts, error = %error, "attempt failed");
                app.metrics.backend_failed(&backend, error.kind().label());
                match (error.kind(), &want.model) {
                    (FailureKind::ModelMissing, Some(model)) => {
                        app.fleet.forget_model(&slot.target().id, model);
                    }
                    _ => app.fleet.mark_failed(&slot.target().id, error.to_string()),
                }
                want.tried.push(slot.target().id.clone());
                drop(slot);
                let retryable = error.is_retryable();
                last_error = Some(error);
                if !retryable || attempts > app.args.max_retries {
                    let detail = last_error.map(|e| e.to_string()).unwrap_or_default();
                    return Err(ProxyError::AllAttemptsFailed(format!(
                        "{attempts} attempt(s), last: {detail}"
                    )));
                }
            }
        }
    }
}

/// REJECT_STREAMING=true: `"stream": true` is refused, and a missing `stream`
/// on an endpoint that would stream becomes `false`.
fn apply_stream_rule(
    reject: bool,
    endpoint: &str,
    stream: Option<bool>,
    bytes: Bytes,
) -> Result<Bytes, ProxyError> {
    if !reject || !CAN_STREAM.contains(&endpoint) {
        return Ok(bytes);
    }
    match stream {
        Some(true) => Err(ProxyError::StreamingRefused),
        None if STREAM_BY_DEFAULT.contains(&endpoint) => Ok(body::with_stream_false(&bytes)),
        _ => Ok(bytes),
    }
}

/// The client's answer when no slot was had.
fn refusal(
    app: &App,
    error: AcquireError,
    model: Option<&str>,
    last: Option<&BackendError>,
) -> ProxyError {
    let (reason, error) = match error {
        AcquireError::QueueTimeout => (
            "queue_timeout",
            ProxyError::QueueTimeout(app.args.queue_timeout.as_secs()),
        ),
        AcquireError::Rejected(Rejection::UnknownModel) => (
            "unknown_model",
            ProxyError::UnknownModel(model.unwrap_or_default().to_string()),
        ),
        AcquireError::Rejected(Rejection::QueueFull) => {
            ("queue_full", ProxyError::QueueFull("MAX_QUEUE"))
        }
        AcquireError::Rejected(Rejection::QueueBytesFull) => {
            ("queue_bytes_full", ProxyError::QueueFull("MAX_QUEUE_BYTES"))
        }
        AcquireError::Rejected(Rejection::ShuttingDown) => {
            ("shutting_down", ProxyError::ShuttingDown)
        }
        AcquireError::Rejected(Rejection::Exhausted)
            if last.is_some_and(|e| e.kind() == FailureKind::ModelMissing) =>
        {
            // The backends that had it were replaced by servers without it.
            (
                "unknown_model",
                ProxyError::UnknownModel(model.unwrap_or_default().to_string()),
            )
        }
        AcquireError::Rejected(Rejection::Exhausted) => {
            let detail =
                last.map_or_else(|| "no backend left to try".to_string(), |e| e.to_string());
            (
                "exhausted",
                ProxyError::AllAttemptsFailed(format!("no untried backend left; last: {detail}")),
            )
        }
    };
    app.metrics.rejected(reason);
    error
}

/// One attempt: send, then wait for the head and the first chunk, so that a
/// backend that dies before its first byte is retried like one that refused.
/// A 404 for a model the backend was picked for means its model list is
/// stale (another server now listens on its port): retried elsewhere.
async fn attempt(
    app: &App,
    slot: &Slot,
    parts: &Parts,
    body: Bytes,
    model: Option<&ModelName>,
) -> Result<(http::response::Parts, Incoming, Option<Bytes>), BackendError> {
    let target = slot.target();
    let root = http::uri::PathAndQuery::from_static("/");
    let path = parts.uri.path_and_query().unwrap_or(&root);
    let response = app
        .upstream
        .send(target, &parts.method, path, &parts.headers, body)
        .await?;
    if let Some(model) = model.filter(|_| response.status() == http::StatusCode::NOT_FOUND) {
        return Err(BackendError::new(
            FailureKind::ModelMissing,
            target,
            format!(
                "answered 404 for model '{}', which it listed at the last scan",
                model.display()
            ),
        ));
    }
    let (head, mut rest) = response.into_parts();
    let read_timeout = app.upstream.read_timeout();
    loop {
        match tokio::time::timeout(read_timeout, rest.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok((head, rest, Some(data)));
                    }
                }
            }
            Ok(None) => return Ok((head, rest, None)),
            Ok(Some(Err(e))) => {
                return Err(BackendError::new(
                    FailureKind::Reset,
                    target,
                    format!("connection broke before the first byte: {e}"),
                ));
            }
            Err(_) => {
                return Err(BackendError::new(
                    FailureKind::Timeout,
                    target,
                    format!("no body within {read_timeout:.0?}"),
                ));
            }
        }
    }
}

/// The client's response: the backend's status and end-to-end headers, ours,
/// and the relayed body.
#[allow(clippy::too_many_arguments)]
fn respond(
    app: &App,
    mut head: http::response::Parts,
    rest: Incoming,
    first: Option<Bytes>,
    slot: Slot,
    ledger: Ledger,
    attempts: u32,
    queue_wait: std::time::Duration,
) -> Response {
    strip_hop_by_hop(&mut head.headers);
    let framing = Framing::of(head.headers.get(http::header::CONTENT_TYPE));
    let headers = &mut head.headers;
    headers.insert("x-corral-backend", slot.target().header.clone());
    headers.insert("x-corral-attempts", HeaderValue::from(attempts));
    headers.insert(
        "x-corral-queue-ms",
        HeaderValue::from(queue_wait.as_millis() as u64),
    );
    let body = Relay::new(
        rest,
        first,
        slot,
        framing,
        app.upstream.read_timeout(),
        ledger,
    )
    .into_body();
    Response::from_parts(head, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_streaming_refuses_true_and_defaults_missing_to_false() {
        let b = || Bytes::from_static(br#"{"model":"m"}"#);
        assert!(matches!(
            apply_stream_rule(true, "/api/chat", Some(true), b()),
            Err(ProxyError::StreamingRefused)
        ));
        assert!(matches!(
            apply_stream_rule(true, "/v1/chat/completions", Some(true), b()),
            Err(ProxyError::StreamingRefused)
        ));
        let out = apply_stream_rule(true, "/api/generate", None, b()).unwrap();
        assert_eq!(&out[..], br#"{"stream":false,"model":"m"}"#);
        // /v1 does not stream by default; embeddings never stream.
        assert_eq!(
            apply_stream_rule(true, "/v1/completions", None, b()).unwrap(),
            b()
        );
        assert_eq!(
            apply_stream_rule(true, "/api/embed", Some(true), b()).unwrap(),
            b()
        );
        // Off: everything passes unchanged.
        assert_eq!(
            apply_stream_rule(false, "/api/chat", Some(true), b()).unwrap(),
            b()
        );
    }
}
