//! The path of a routed request, from body to streamed answer:
//!
//! ```text
//! read body (MAX_BODY_BYTES) ─ peek model/stream ─ REJECT_STREAMING rule
//!   └─> tenant + priority ─ acquire a slot (404 unknown model · 503 queue
//!       full/timeout with an estimated Retry-After · wait, fair across tenants)
//!         └─> send to the slot's backend, wait for the head and first chunk
//!               ├─ ok ──> answer: head + first chunk + the rest as it comes;
//!               │         the slot rides with the body until it ends or the
//!               │         client leaves
//!               └─ connect error · timeout · reset · 5xx (nothing sent yet)
//!                     └─> mark backend unhealthy, exclude it, and acquire
//!                         again at its old queue place and under its one
//!                         queue deadline, up to MAX_RETRIES times; then 502
//! ```
//!
//! Variations: Ollama's 503 `server busy` leaves the backend healthy and
//! does not count as a retry (when every backend left is busy, they are
//! tried again after a short doubling pause, within QUEUE_TIMEOUT_SECONDS);
//! cloud models take no slot ([`cloud`]); a Responses request that continues
//! an earlier response goes to the backend that produced it ([`responses`]).

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
use super::claim::Claim;
use super::course::{Course, Refused, pinned_backend};
use super::error::{Api, ProxyError};
use super::routes::REQUEST_ID;
use super::stream::{Framing, Ledger, Relay, RequestInfo};
use super::upstream::{BackendError, FailureKind, strip_hop_by_hop};
use super::{cloud, inspect, responses};
use crate::fleet::placement::{Routing, Signature};
use crate::fleet::{AcquireError, Rejection, Target, Ticket, Want};
use crate::metrics::EndpointLabels;
use crate::model::ModelName;

/// Endpoints that stream when `stream` is absent.
const STREAM_BY_DEFAULT: [&str; 2] = ["/api/generate", "/api/chat"];
/// Endpoints that can stream at all.
const CAN_STREAM: [&str; 6] = [
    "/api/generate",
    "/api/chat",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/responses",
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
    let (mut parts, body) = request.into_parts();
    let (tenant, priority) = app.tenancy.of(&parts)?;
    let bytes = body::read(
        &parts.headers,
        body,
        app.args.max_body_bytes,
        app.args.client_header_timeout,
    )
    .await?;
    // What waits in the queue keeps no slice of the connection's buffers.
    body::detach(&mut parts);
    let (peek, plain) =
        inspect::peek(endpoint, &parts.headers, &bytes, app.args.max_body_bytes).await?;
    let bytes = apply_stream_rule(app.args.reject_streaming, endpoint, peek.stream, bytes)?;
    let model = peek.model.as_deref().map(ModelName::parse);
    *model_out = model.clone();
    let cloud = peek.model.as_deref().is_some_and(cloud::is_cloud);
    let previous = match endpoint {
        responses::ENDPOINT => responses::previous_id(plain.as_deref().unwrap_or(&bytes)),
        _ => None,
    };
    let pin = match &previous {
        Some(id) => pinned_backend(app, id)?,
        None => None,
    };
    let signature = (app.args.routing == Routing::CacheAware)
        .then(|| Signature::of(plain.as_deref().unwrap_or(&bytes), &parts.headers))
        .flatten()
        .map(Arc::new);
    let mut want = Want {
        model,
        tried: Vec::new(),
        signature,
    };
    let mut course = Course {
        cloud,
        pin,
        busy: Vec::new(),
        busy_rounds: 0,
        deadline: started + app.args.queue_timeout,
    };
    let mut attempts: u32 = 0;
    let mut failures: u32 = 0;
    let mut queue_wait = std::time::Duration::ZERO;
    let mut last_error: Option<BackendError> = None;
    // One ticket for every attempt: its arrival place and queue deadline.
    let mut ticket = Ticket::new(Arc::clone(&tenant), priority, started);
    let tenant_label = app.tenancy.label(&tenant);
    loop {
        let waited = Instant::now();
        let claim = course
            .claim(
                app,
                &mut want,
                bytes.len(),
                &mut ticket,
                attempts,
                last_error.as_ref(),
            )
            .await
            .map_err(|e| match e {
                Refused::Now(error) => error,
                Refused::Acquire(e) => {
                    let asked = Asked {
                        model: want.model.as_ref(),
                        name: peek.model.as_deref(),
                        tenant: &tenant,
                    };
                    refusal(app, e, asked, last_error.as_ref())
                }
            })?;
        let wait = waited.elapsed();
        queue_wait += wait;
        app.metrics.queue_waited(wait);
        app.metrics.tenant_waited(&tenant_label, wait);
        attempts += 1;
        if attempts > 1 {
            app.metrics.retries.inc();
        }
        let backend = Arc::clone(&claim.target().label);
        app.metrics.backend_attempted(&backend);
        // A 404 is the backend's own answer, not a stale model list, for
        // cloud models and for continued responses (known to corral or not).
        let listed = want.model.as_ref().filter(|_| !cloud && previous.is_none());
        // Boxed: a request waiting for its slot need not carry the room of
        // the client's send future.
        match Box::pin(attempt(app, claim.target(), &parts, bytes.clone(), listed)).await {
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
                if endpoint == responses::ENDPOINT && head.status.is_success() {
                    if let Some(id) = first.as_deref().and_then(responses::response_id) {
                        app.responses.remember(id, claim.target().id.clone());
                    }
                }
                return Ok(respond(
                    app, head, rest, first, claim, ledger, attempts, queue_wait,
                ));
            }
            Err(error) => {
                tracing::warn!(endpoint, %backend, attempt = attempts, error = %error, "attempt failed");
                app.metrics.backend_failed(&backend, error.kind().label());
                let id = claim.target().id.clone();
                match (error.kind(), &want.model) {
                    // Its own queue is full: it stays healthy, and this
                    // attempt does not count against MAX_RETRIES.
                    (FailureKind::Busy, _) => course.busy.push(id.clone()),
                    (FailureKind::ModelMissing, Some(model)) => {
                        app.fleet.forget_model(&id, model);
                    }
                    _ if claim.owns_failures() => app.fleet.mark_failed(&id, error.to_string()),
                    _ => {}
                }
                want.tried.push(id);
                drop(claim);
                if error.kind() != FailureKind::Busy {
                    failures += 1;
                }
                let retryable = error.is_retryable();
                last_error = Some(error);
                if !retryable || failures > app.args.max_retries {
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

/// What a refused request asked for, for its error and `Retry-After`.
struct Asked<'a> {
    model: Option<&'a ModelName>,
    /// The model as the client spelled it.
    name: Option<&'a str>,
    tenant: &'a str,
}

/// The client's answer when no slot was had.
fn refusal(
    app: &App,
    error: AcquireError,
    asked: Asked<'_>,
    last: Option<&BackendError>,
) -> ProxyError {
    let model = asked.name;
    let retry_after = || {
        let secs = app.fleet.retry_after(asked.model, asked.tenant).as_secs();
        u32::try_from(secs).unwrap_or(u32::MAX)
    };
    let (reason, error) = match error {
        AcquireError::QueueTimeout => (
            "queue_timeout",
            ProxyError::QueueTimeout(app.args.queue_timeout.as_secs(), retry_after()),
        ),
        AcquireError::Rejected(Rejection::UnknownModel) => (
            "unknown_model",
            ProxyError::UnknownModel(model.unwrap_or_default().to_string()),
        ),
        AcquireError::Rejected(Rejection::QueueFull) => (
            "queue_full",
            ProxyError::QueueFull("MAX_QUEUE", retry_after()),
        ),
        AcquireError::Rejected(Rejection::QueueBytesFull) => (
            "queue_bytes_full",
            ProxyError::QueueFull("MAX_QUEUE_BYTES", retry_after()),
        ),
        AcquireError::Rejected(Rejection::TenantQueueFull) => (
            "tenant_queue_full",
            ProxyError::QueueFull("MAX_QUEUE_PER_TENANT", retry_after()),
        ),
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
    target: &Target,
    parts: &Parts,
    body: Bytes,
    model: Option<&ModelName>,
) -> Result<(http::response::Parts, Incoming, Option<Bytes>), BackendError> {
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
    slot: Claim,
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
