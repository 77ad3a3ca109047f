//! What a routed request sends and where it may go, decided once its body
//! is read: the tenant and priority, the REJECT_STREAMING rule (a refused
//! `"stream": true`, a missing `stream` made `false`), the model, the
//! backend a continued Responses request is pinned to, and the prompt's
//! signature for cache-aware placement. Each of these is also noted in the
//! request's context.

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::request::Parts;

use super::App;
use super::body;
use super::context::RequestContext;
use super::course::{Course, is_cloud, pinned_backend};
use super::endpoint::{Endpoint, Format, Streaming};
use super::error::ProxyError;
use super::{inspect, responses};
use crate::fleet::placement::{Routing, Signature};
use crate::fleet::{Ticket, Want};
use crate::model::ModelName;

/// What a request sends and where it may still go, once its body is read.
pub struct Outbound {
    /// The request head (method, path, headers).
    pub head: Parts,
    /// The body as it is sent.
    pub bytes: Bytes,
    /// What the fleet is asked for.
    pub want: Want,
    /// Where it may still go.
    pub course: Course,
    /// One ticket for every attempt: its arrival place and queue deadline.
    pub ticket: Ticket,
    /// The tenant's metric label.
    pub tenant_label: Arc<str>,
    /// The model as the client spelled it, for a 404's message.
    pub asked: Option<String>,
    /// Whether a backend's 404 means its model list is stale: not for
    /// cloud models or continued responses, where it is the backend's own
    /// answer (known to corral or not).
    pub listed: bool,
}

/// Reads the body and decides what the request wants: tenant and priority,
/// the REJECT_STREAMING rule, its model, the backend a continued response
/// is pinned to, and its prompt's signature for cache-aware placement.
pub async fn prepare(
    app: &App,
    ctx: &mut RequestContext,
    mut head: Parts,
    body: Body,
) -> Result<Outbound, ProxyError> {
    let (tenant, priority) = app.tenancy.of(&head)?;
    ctx.tenant = Some(Arc::clone(&tenant));
    ctx.priority = priority;
    let args = &app.args;
    let bytes = body::read(
        &head.headers,
        body,
        args.max_body_bytes,
        args.client_header_timeout,
    )
    .await?;
    // What waits in the queue keeps no slice of the connection's buffers.
    body::detach(&mut head);
    let (peek, plain) =
        inspect::peek(ctx.endpoint, &head.headers, &bytes, args.max_body_bytes).await?;
    ctx.stream = peek.stream;
    let bytes = apply_stream_rule(args.reject_streaming, ctx.endpoint, peek.stream, bytes)?;
    let model = peek.model.as_deref().map(ModelName::parse);
    ctx.model = model.clone();
    let text = plain.as_deref().unwrap_or(&bytes);
    let cloud = peek.model.as_deref().is_some_and(is_cloud);
    let previous = ctx
        .endpoint
        .keeps_answers()
        .then(|| responses::previous_id(text))
        .flatten();
    let pin = previous
        .as_deref()
        .map(|id| pinned_backend(app, id))
        .transpose()?
        .flatten();
    let prompted = ctx.endpoint.format() != Format::Form;
    let signature = (args.routing == Routing::CacheAware && prompted)
        .then(|| Signature::of(text, &head.headers))
        .flatten()
        .map(Arc::new);
    let course = Course {
        cloud,
        busy: Vec::new(),
        busy_rounds: 0,
        deadline: ctx.arrived + args.queue_timeout,
    };
    Ok(Outbound {
        want: Want {
            model,
            tried: Vec::new(),
            pin,
            signature,
        },
        course,
        ticket: Ticket::new(Arc::clone(&tenant), priority, ctx.arrived),
        tenant_label: app.tenancy.label(&tenant),
        asked: peek.model,
        listed: !cloud && previous.is_none(),
        head,
        bytes,
    })
}

/// REJECT_STREAMING=true: `"stream": true` is refused, and a missing `stream`
/// on an endpoint that would stream becomes `false`.
fn apply_stream_rule(
    reject: bool,
    endpoint: Endpoint,
    stream: Option<bool>,
    bytes: Bytes,
) -> Result<Bytes, ProxyError> {
    if !reject {
        return Ok(bytes);
    }
    match (endpoint.streaming(), stream) {
        (Streaming::Never, _) | (_, Some(false)) => Ok(bytes),
        (_, Some(true)) => Err(ProxyError::StreamingRefused),
        (Streaming::ByDefault(_), None) => Ok(body::with_stream_false(&bytes)),
        (Streaming::Asked(_), None) => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_streaming_refuses_true_and_defaults_missing_to_false() {
        let b = || Bytes::from_static(br#"{"model":"m"}"#);
        assert!(matches!(
            apply_stream_rule(true, Endpoint::Chat, Some(true), b()),
            Err(ProxyError::StreamingRefused)
        ));
        assert!(matches!(
            apply_stream_rule(true, Endpoint::ChatCompletions, Some(true), b()),
            Err(ProxyError::StreamingRefused)
        ));
        let out = apply_stream_rule(true, Endpoint::Generate, None, b()).unwrap();
        assert_eq!(&out[..], br#"{"stream":false,"model":"m"}"#);
        // /v1 does not stream by default; embeddings never stream.
        assert_eq!(
            apply_stream_rule(true, Endpoint::Completions, None, b()).unwrap(),
            b()
        );
        assert_eq!(
            apply_stream_rule(true, Endpoint::Embed, Some(true), b()).unwrap(),
            b()
        );
        // Off: everything passes unchanged.
        assert_eq!(
            apply_stream_rule(false, Endpoint::Chat, Some(true), b()).unwrap(),
            b()
        );
    }
}
