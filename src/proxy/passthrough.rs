//! Endpoints that use no GPU (`GET /api/status`, `/api/experimental/*`):
//! sent to a healthy backend on an unslotted grant, the answer relayed as it
//! comes; a backend that cannot be reached is passed over for another.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

use super::App;
use super::body;
use super::error::ProxyError;
use super::headers::BACKEND;
use super::upstream::{self, strip_hop_by_hop};
use crate::fleet::Want;

/// Forwards the request to a healthy backend.
pub async fn forward(
    State(app): State<Arc<App>>,
    request: Request,
) -> Result<Response, ProxyError> {
    let (parts, body) = request.into_parts();
    let bytes = body::read(
        &parts.headers,
        body,
        app.args.max_body_bytes,
        app.args.client_header_timeout,
    )
    .await?;
    let mut want = Want::default();
    let mut last = None;
    while want.tried.len() <= app.args.max_retries as usize {
        let Some(target) = app.fleet.grant_unslotted(&want) else {
            break;
        };
        match upstream::send(&app.args, &target, &parts, bytes.clone()).await {
            Ok(response) => {
                let (mut head, rest) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                head.headers.insert(BACKEND, target.header.clone());
                return Ok(Response::from_parts(head, Body::new(rest)));
            }
            Err(e) => {
                tracing::warn!(path = parts.uri.path(), error = %e, "pass-through attempt failed");
                want.tried.push(target.id.clone());
                last = Some(e);
            }
        }
    }
    Err(match last {
        None => ProxyError::NoHealthyBackend,
        Some(e) => ProxyError::AllAttemptsFailed {
            attempts: want.tried.len() as u32,
            last: e.to_string(),
        },
    })
}
