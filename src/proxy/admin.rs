//! The proxy's own endpoints: `/__proxy/health`, `/__proxy/backends` (the
//! ollama_proxy fields `port`, `healthy`, `in_flight` first, then more; the
//! queue and the active tenants beside them), drain and undrain,
//! self-registration (`POST /__proxy/backends`, `DELETE
//! /__proxy/backends/{id}`), and `/metrics`. The dashboard is in `dashboard.rs`.
//! Their refusals are in Ollama's shape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::App;
use super::auth::{admin_keys, bearer_matches};
use super::error::ProxyError;
use crate::fleet::registration::Retired;
use crate::fleet::registry::Registered;
use crate::fleet::{Backend, BackendId};

/// The longest lease a registration may ask for: a day.
const MAX_LEASE_SECONDS: f64 = 86_400.0;

/// `GET /__proxy/health`.
pub async fn health(State(app): State<Arc<App>>) -> Response {
    let healthy = app.fleet.read(|s| s.healthy_count());
    let mut body = json!({ "status": "ok", "healthy_backends": healthy });
    if let Some(shared) = app.fleet.shared_state() {
        body["shared_state"] = json!(shared.view());
    }
    Json(body).into_response()
}
/// One row of `/__proxy/backends`.
#[derive(Serialize)]
pub struct BackendView {
    /// The port (range backends) or null.
    pub port: Option<u16>,
    /// Healthy now.
    pub healthy: bool,
    /// Requests holding a slot now.
    pub in_flight: u32,
    /// The id to drain it by.
    pub id: BackendId,
    /// Its base URL.
    pub url: String,
    /// Drained: gets nothing new.
    pub draining: bool,
    /// Models of its last successful probe.
    pub models: Vec<String>,
    /// Loaded models of its last successful probe.
    pub loaded_models: Vec<String>,
    /// Ollama version, if it said.
    pub version: Option<String>,
    /// Why it was last marked unhealthy.
    pub last_error: Option<String>,
    /// Requests it answered.
    pub requests_served: u64,
    /// Attempts that failed on it.
    pub failures: u64,
    /// How long its last successful probe took, in milliseconds.
    pub probe_ms: Option<f64>,
    /// SHARED_STATE: slots held on it, by instance (empty without it).
    pub holders: std::collections::BTreeMap<String, u32>,
}

impl BackendView {
    fn of(b: &Backend) -> Self {
        Self {
            port: b.target.id.port(),
            healthy: b.healthy,
            in_flight: b.in_flight,
            id: b.target.id.clone(),
            url: b.target.base.clone(),
            draining: b.draining,
            models: b.report.models.clone(),
            loaded_models: b.report.loaded.clone(),
            version: b.report.version.clone(),
            last_error: b.last_error.clone(),
            requests_served: b.served,
            failures: b.failures,
            probe_ms: b.report.latency.map(|d| d.as_secs_f64() * 1000.0),
            holders: b.holders.clone(),
        }
    }
}

/// Every backend of the table, sorted by port (then URL).
pub fn backend_views(app: &App) -> Vec<BackendView> {
    app.fleet
        .read(|s| s.backends().values().map(BackendView::of).collect())
}

/// `GET /__proxy/backends`.
pub async fn backends(State(app): State<Arc<App>>) -> Response {
    let now = tokio::time::Instant::now();
    let (queue, tenants) = app
        .fleet
        .read(|s| ((s.queue_len(), s.queued_bytes()), s.tenants(now)));
    Json(json!({
        "backends": backend_views(&app),
        "queue": { "waiting": queue.0, "bytes": queue.1 },
        "tenants": tenants,
    }))
    .into_response()
}

/// `POST /__proxy/backends/{id}/drain` (`DRAINING`) and `.../undrain`.
pub async fn set_draining<const DRAINING: bool>(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ProxyError> {
    let backend = BackendId::parse(&id);
    // A job may drain its own registered backend with the registration key.
    if app.registry.contains(&backend) {
        check_registrar(&app, peer, &headers)?;
    } else {
        check_admin(&app, peer, &headers)?;
    }
    if !app.fleet.set_draining(&backend, DRAINING) {
        return Err(ProxyError::NotFound(format!(
            "no backend '{id}' (see GET /__proxy/backends)"
        )));
    }
    Ok(Json(json!({ "id": backend, "draining": DRAINING })).into_response())
}

/// PROXY_ADMIN_KEY set: its bearer token is required; unset: loopback clients only.
fn check_admin(app: &App, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
    check_keys(
        peer,
        headers,
        std::slice::from_ref(&app.args.admin_key),
        "admin actions are allowed only from loopback when PROXY_ADMIN_KEY is unset",
    )
}

/// PROXY_ADMIN_KEY or REGISTRATION_KEY set: the bearer of one of them is
/// required; neither set: loopback clients only.
fn check_registrar(app: &App, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
    check_keys(
        peer,
        headers,
        &admin_keys(app),
        "registration is allowed only from loopback when neither PROXY_ADMIN_KEY nor REGISTRATION_KEY is set",
    )
}

/// The bearer of one of `keys` is required; no (non-empty) key: loopback
/// clients only, others are refused with `unkeyed`.
fn check_keys(
    peer: SocketAddr,
    headers: &HeaderMap,
    keys: &[String],
    unkeyed: &'static str,
) -> Result<(), ProxyError> {
    if keys.iter().all(String::is_empty) {
        let local = peer.ip().is_loopback();
        return local.then_some(()).ok_or(ProxyError::Forbidden(unkeyed));
    }
    let matched = bearer_matches(headers, keys);
    matched.then_some(()).ok_or(ProxyError::Unauthorized)
}

/// The body of `POST /__proxy/backends`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    url: String,
    lease_seconds: Option<f64>,
}

/// `POST /__proxy/backends` `{"url": ..., "lease_seconds": N}`: registers a
/// backend (201) or renews its lease (200); either way it answers its id.
pub async fn register(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ProxyError> {
    check_registrar(&app, peer, &headers)?;
    let registration: Registration = serde_json::from_slice(&body).map_err(|e| {
        ProxyError::BadRequest(format!(
            "expected {{\"url\": \"http://host:port\", \"lease_seconds\": N}}: {e}"
        ))
    })?;
    let url =
        crate::config::parse_backend_url(&registration.url).map_err(ProxyError::BadRequest)?;
    let lease = match registration.lease_seconds {
        None => None,
        Some(s) if s > 0.0 && s <= MAX_LEASE_SECONDS => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(ProxyError::BadRequest(format!(
                "lease_seconds must be more than 0 and at most {MAX_LEASE_SECONDS}, not {s}"
            )));
        }
    };
    let (target, what) = app.fleet.register_backend(&app.registry, &url, lease).await;
    let status = match what {
        Registered::New => StatusCode::CREATED,
        Registered::Revived | Registered::Renewed => StatusCode::OK,
    };
    let lease_seconds = lease.map(|l| l.as_secs_f64());
    let body = json!({ "id": target.id, "url": target.base, "lease_seconds": lease_seconds });
    Ok((status, Json(body)).into_response())
}

/// `DELETE /__proxy/backends/{id}`: drains a registered backend and removes
/// it: at once when nothing is in flight there (200), else once its requests
/// finish (202).
pub async fn deregister(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ProxyError> {
    check_registrar(&app, peer, &headers)?;
    let backend = BackendId::parse(&id);
    let Some(Retired { removed, in_flight }) =
        app.fleet.deregister_backend(&app.registry, &backend).await
    else {
        return Err(ProxyError::NotFound(format!(
            "no registered backend '{id}' (range and BACKENDS backends are drained, not deleted)"
        )));
    };
    let status = if removed {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let body = json!({ "id": backend, "removed": removed, "in_flight": in_flight });
    Ok((status, Json(body)).into_response())
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let now = tokio::time::Instant::now();
    let (rows, depth, tenants) = app.fleet.read(|s| {
        let rows: Vec<_> = s
            .backends()
            .values()
            .map(|b| {
                let label = Arc::clone(&b.target.label);
                (label, b.healthy, b.in_flight, b.report.latency)
            })
            .collect();
        (rows, s.queue_len(), s.tenants(now))
    });
    app.metrics.set_tenants(tenants.into_iter().map(|t| {
        let label = app.tenancy.label(&Arc::from(t.name));
        (label, t.waiting, t.in_flight)
    }));
    app.metrics.queue_depth.set(depth as i64);
    app.metrics.set_backends(rows.into_iter());
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    let headers = [(http::header::CONTENT_TYPE, content_type)];
    (headers, app.metrics.encode()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeArgs;

    fn app(admin_key: &str) -> App {
        let mut args = ServeArgs::defaults();
        args.admin_key = admin_key.into();
        App::new(args)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn without_an_admin_key_only_loopback_clients_may_act() {
        let app = app("");
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert!(check_admin(&app, local, &HeaderMap::new()).is_ok());
        assert!(matches!(
            check_admin(&app, remote, &HeaderMap::new()),
            Err(ProxyError::Forbidden(_))
        ));
    }

    #[tokio::test]
    async fn with_an_admin_key_its_bearer_is_needed_from_anywhere() {
        let app = app("k");
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let local: SocketAddr = "[::1]:5000".parse().unwrap();
        assert!(check_admin(&app, remote, &bearer("k")).is_ok());
        assert!(matches!(
            check_admin(&app, remote, &bearer("x")),
            Err(ProxyError::Unauthorized)
        ));
        assert!(matches!(
            check_admin(&app, local, &HeaderMap::new()),
            Err(ProxyError::Unauthorized)
        ));
    }

    #[tokio::test]
    async fn registration_takes_either_key_and_without_keys_only_loopback() {
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let open = app("");
        assert!(check_registrar(&open, local, &HeaderMap::new()).is_ok());
        assert!(matches!(
            check_registrar(&open, remote, &HeaderMap::new()),
            Err(ProxyError::Forbidden(_))
        ));
        let mut args = ServeArgs::defaults();
        args.registration_key = "reg".into();
        args.admin_key = "adm".into();
        let keyed = App::new(args);
        assert!(check_registrar(&keyed, remote, &bearer("reg")).is_ok());
        assert!(check_registrar(&keyed, remote, &bearer("adm")).is_ok());
        assert!(matches!(
            check_registrar(&keyed, local, &HeaderMap::new()),
            Err(ProxyError::Unauthorized)
        ));
        // The registration key is not an admin key.
        assert!(check_admin(&keyed, remote, &bearer("reg")).is_err());
    }
}
