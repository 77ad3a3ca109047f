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
//! cloud models take no slot ([`super::course`]); a Responses request that
//! continues an earlier response goes to the backend that produced it
//! ([`responses`]).
//!
//! Each step takes the request's [`RequestContext`]: [`prepare`] reads the
//! body into an [`Outbound`], `claim` and `attempt` run the attempts, and
//! `respond` hands the context to the relay's [`Ledger`], which writes the
//! log line when the answer ends; `refuse` writes it for a request turned
//! away.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use http::request::Parts;
use tokio::time::Instant;

use super::App;
use super::context::{Failure, RequestContext};
use super::course::Claim;
use super::endpoint::{Endpoint, Framing};
use super::error::ProxyError;
use super::headers::{ATTEMPTS, BACKEND, QUEUE_MS};
use super::ledger::Ledger;
use super::outbound::{Outbound, prepare};
use super::relay::Relay;
use super::responses;
use super::upstream::{
    self, BackendBody, BackendError, Cut, FailureKind, next_chunk, strip_hop_by_hop,
};
use crate::fleet::{Rejection, Target};
use crate::model::ModelName;

/// Handles one routed request on `endpoint`.
pub async fn forward(
    State(app): State<Arc<App>>,
    endpoint: Endpoint,
    request: Request,
) -> Response {
    let (head, body) = request.into_parts();
    let mut ctx = RequestContext::new(endpoint, &head, Instant::now());
    match route(&app, &mut ctx, head, body).await {
        Ok((claim, answer)) => respond(&app, ctx, claim, answer),
        Err(error) => refuse(&app, &ctx, &error),
    }
}

/// A backend's answer: its head and the first chunk of its body, read.
struct Answer {
    head: http::response::Parts,
    rest: BackendBody,
    first: Option<Bytes>,
}

/// Claims backends and sends the request until one answers.
async fn route(
    app: &App,
    ctx: &mut RequestContext,
    head: Parts,
    body: Body,
) -> Result<(Claim, Answer), ProxyError> {
    let mut out = prepare(app, ctx, head, body).await?;
    let mut last: Option<BackendError> = None;
    loop {
        let claim = claim(app, ctx, &mut out, last.as_ref()).await?;
        let model = out.want.model.as_ref().filter(|_| out.listed);
        // Boxed: a request waiting for its slot need not carry the room of
        // the client's send future.
        match Box::pin(attempt(
            app,
            claim.target(),
            &out.head,
            out.bytes.clone(),
            model,
        ))
        .await
        {
            Ok(answer) => {
                ctx.placed = out.want.signature.as_deref().and_then(|s| {
                    let estimated = (s.bytes / 4) as u64;
                    s.placed().map(|p| (p, estimated))
                });
                return Ok((claim, answer));
            }
            Err(error) => {
                if !failed(app, ctx, &mut out, claim, &error) {
                    return Err(ProxyError::AllAttemptsFailed {
                        attempts: ctx.attempts,
                        last: error.to_string(),
                    });
                }
                last = Some(error);
            }
        }
    }
}

/// The next backend, held: counts the wait and the attempt.
async fn claim(
    app: &App,
    ctx: &mut RequestContext,
    out: &mut Outbound,
    last: Option<&BackendError>,
) -> Result<Claim, ProxyError> {
    let waited = Instant::now();
    let (want, ticket, bytes) = (&mut out.want, &mut out.ticket, out.bytes.len());
    let claimed = out
        .course
        .claim(app, want, bytes, ticket, ctx.attempts, last);
    let claim = claimed
        .await
        .map_err(|why| refusal(app, why, ctx, out, last))?;
    let wait = waited.elapsed();
    ctx.queue_wait += wait;
    app.metrics.queue_waited(wait);
    app.metrics.tenant_waited(&out.tenant_label, wait);
    ctx.attempts += 1;
    if ctx.attempts > 1 {
        app.metrics.retries.inc();
    }
    let backend = &claim.target().label;
    app.metrics.backend_attempted(backend);
    ctx.backend = Some(Arc::clone(backend));
    Ok(claim)
}

/// Counts a failed attempt and lets its backend go (marked failed, busy or
/// without the model); whether another attempt may be made: every failure
/// before the client has a byte may be retried, within MAX_RETRIES.
fn failed(
    app: &App,
    ctx: &mut RequestContext,
    out: &mut Outbound,
    claim: Claim,
    error: &BackendError,
) -> bool {
    let backend = Arc::clone(&claim.target().label);
    tracing::warn!(endpoint = ctx.endpoint.path(), %backend, attempt = ctx.attempts, error = %error, "attempt failed");
    app.metrics.backend_failed(&backend, error.kind());
    let id = claim.target().id.clone();
    match (error.kind(), &out.want.model) {
        // Its own queue is full: it stays healthy, and this attempt does
        // not count against MAX_RETRIES.
        (FailureKind::Busy, _) => out.course.busy.push(id.clone()),
        (FailureKind::ModelMissing, Some(model)) => app.fleet.forget_model(&id, model),
        _ if claim.owns_failures() => app.fleet.mark_failed(&id, error.to_string()),
        _ => {}
    }
    out.want.tried.push(id);
    drop(claim);
    ctx.backend = None;
    ctx.failures.push(Failure {
        backend,
        kind: error.kind(),
    });
    ctx.retries_spent() <= app.args.max_retries
}

/// The client's answer to a request turned away, its log line and count. A
/// model no backend ever listed is labelled `unknown`, so that made-up
/// names cannot grow the series without bound.
fn refuse(app: &App, ctx: &RequestContext, error: &ProxyError) -> Response {
    let model = match &ctx.model {
        None => "none",
        Some(m) if app.fleet.read(|s| s.is_known(m)) => m.display(),
        Some(_) => "unknown",
    };
    let response = error.render(ctx.endpoint.api());
    let status = response.status().as_u16();
    let duration = ctx.arrived.elapsed();
    ctx.log_refused(model, status, duration, error);
    app.metrics
        .series(ctx.endpoint.path(), model)
        .request_done(&app.metrics, status, duration);
    response
}

/// The client's answer when no backend was had, and its count.
fn refusal(
    app: &App,
    why: Rejection,
    ctx: &RequestContext,
    out: &Outbound,
    last: Option<&BackendError>,
) -> ProxyError {
    // No untried backend has the model: the backends that had it were
    // replaced by servers without it.
    let why = match why {
        Rejection::Exhausted if last.is_some_and(|e| e.kind() == FailureKind::ModelMissing) => {
            Rejection::UnknownModel
        }
        why => why,
    };
    app.metrics.rejected(why);
    let retry_after = || {
        let secs = app
            .fleet
            .retry_after(out.want.model.as_ref(), ctx.tenant_name())
            .as_secs();
        u32::try_from(secs).unwrap_or(u32::MAX)
    };
    match why {
        Rejection::QueueTimeout => {
            ProxyError::QueueTimeout(app.args.queue_timeout.as_secs(), retry_after())
        }
        Rejection::UnknownModel => {
            ProxyError::UnknownModel(out.asked.as_deref().unwrap_or_default().to_string())
        }
        Rejection::QueueFull | Rejection::QueueBytesFull | Rejection::TenantQueueFull => {
            ProxyError::QueueFull(why, retry_after())
        }
        Rejection::ShuttingDown => ProxyError::ShuttingDown,
        Rejection::PreviousResponseGone => ProxyError::PreviousResponseGone,
        Rejection::NoHealthyBackend => ProxyError::NoHealthyBackend,
        Rejection::Exhausted => ProxyError::Exhausted(last.map(ToString::to_string)),
    }
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
) -> Result<Answer, BackendError> {
    let response = upstream::send(&app.args, target, parts, body).await?;
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
    let read_timeout = app.args.backend_read_timeout;
    match next_chunk(&mut rest, read_timeout).await {
        Ok(first) => Ok(Answer { head, rest, first }),
        Err(Cut::Broke(e)) => Err(BackendError::new(
            FailureKind::Reset,
            target,
            format!("connection broke before the first byte: {e}"),
        )),
        Err(Cut::Silent) => Err(BackendError::new(
            FailureKind::Timeout,
            target,
            format!("no body within {read_timeout:.0?}"),
        )),
    }
}

/// The client's response: the backend's status and end-to-end headers,
/// ours, and the relayed body, which takes the claim and the context along.
fn respond(app: &App, mut ctx: RequestContext, claim: Claim, answer: Answer) -> Response {
    let Answer {
        mut head,
        rest,
        first,
    } = answer;
    let status = head.status.as_u16();
    // A backend that listed the model took it: it is known.
    let model = ctx.model.as_ref().map_or("none", ModelName::display);
    let series = app.metrics.series(ctx.endpoint.path(), model);
    let first_byte = ctx.arrived.elapsed();
    ctx.first_byte = Some(first_byte);
    series.first_byte(&app.metrics, first_byte);
    tracing::debug!(endpoint = ctx.endpoint.path(), backend = %claim.target().label, attempts = ctx.attempts, queue_wait_ms = ctx.queue_wait.as_millis() as u64, status, "answering");
    if ctx.endpoint.keeps_answers() && head.status.is_success() {
        if let Some(id) = first.as_deref().and_then(responses::response_id) {
            app.responses.remember(id, claim.target().id.clone());
        }
    }
    strip_hop_by_hop(&mut head.headers);
    let framing = Framing::of(head.headers.get(http::header::CONTENT_TYPE));
    let headers = &mut head.headers;
    // Names made at compile time: a `&str` name is parsed on every insert.
    headers.insert(BACKEND, claim.target().header.clone());
    headers.insert(ATTEMPTS, HeaderValue::from(ctx.attempts));
    headers.insert(
        QUEUE_MS,
        HeaderValue::from(ctx.queue_wait.as_millis() as u64),
    );
    let read_timeout = app.args.backend_read_timeout;
    let ledger = Ledger::new(Arc::clone(&app.metrics), series, ctx, status);
    let body = Relay::new(rest, first, claim, framing, read_timeout, ledger).into_body();
    Response::from_parts(head, body)
}
