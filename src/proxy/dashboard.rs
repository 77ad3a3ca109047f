//! The dashboard: one self-contained HTML page at `GET /__proxy/` (embedded
//! in the binary, no build step, nothing fetched from elsewhere) and the JSON
//! it polls, `GET /__proxy/stats`: the fleet now, the running totals, and the
//! last five minutes as the proxy's sampler recorded them ([`super::history`]),
//! so a page opened now draws full charts and rates from its first poll.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Serialize;

use super::App;
use super::admin::{BackendView, backend_views};
use super::history::{BackendRates, Sample};
use crate::metrics::TotalsView;

/// The page, as written in `dashboard.html`.
const PAGE: &str = include_str!("dashboard.html");

/// `GET /__proxy/`.
pub async fn page() -> Response {
    ([(http::header::CACHE_CONTROL, "no-cache")], Html(PAGE)).into_response()
}

/// `GET /__proxy`: the page lives under the slash, so its relative links work.
pub async fn redirect() -> Response {
    Redirect::permanent("/__proxy/").into_response()
}

/// What `/__proxy/stats` answers.
#[derive(Serialize)]
pub struct Stats {
    /// Every backend of the table, sorted by port.
    pub backends: Vec<BackendView>,
    /// The wait queue now.
    pub queue: QueueView,
    /// The tenants with requests waiting or in flight, by name.
    pub tenants: Vec<crate::fleet::TenantView>,
    /// Running totals since start.
    pub totals: TotalsView,
    /// Seconds since the proxy started.
    pub uptime_seconds: f64,
    /// MAX_CONCURRENT_PER_BACKEND (0: no cap).
    pub max_concurrent_per_backend: u32,
    /// One sample a second over the last five minutes, oldest first.
    pub history: Vec<Sample>,
    /// Each backend's requests per second at the latest sample, by id.
    pub backend_requests_per_second: BackendRates,
}

/// The wait queue.
#[derive(Serialize)]
pub struct QueueView {
    /// Requests waiting.
    pub waiting: usize,
    /// Request bytes they hold.
    pub bytes: usize,
}

/// `GET /__proxy/stats`.
pub async fn stats(State(app): State<Arc<App>>) -> Response {
    let now = tokio::time::Instant::now();
    let (waiting, bytes, tenants) = app
        .fleet
        .read(|s| (s.queue_len(), s.queued_bytes(), s.tenants(now)));
    Json(Stats {
        backends: backend_views(&app),
        queue: QueueView { waiting, bytes },
        tenants,
        totals: app.metrics.totals.view(),
        uptime_seconds: app.started.elapsed().as_secs_f64(),
        max_concurrent_per_backend: app.args.max_concurrent_per_backend,
        history: app.history.samples(),
        backend_requests_per_second: app.history.backend_rates(),
    })
    .into_response()
}
