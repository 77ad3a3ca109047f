//! PRODUCT.md's endpoint table (the routed ones are [`Endpoint::ALL`], the
//! rest one route per line), and the middleware order: request id
//! (outermost, so even refusals carry one), then API keys.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodRouter, any, delete, get, post};
use http::{HeaderValue, StatusCode};

use super::endpoint::Endpoint;
use super::error::ProxyError;
use super::headers::REQUEST_ID;
use super::{App, admin, aggregate, auth, dashboard, forward, passthrough};

/// The whole router.
pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new()
        .route("/", get(aggregate::root))
        .route("/api/tags", get(aggregate::tags))
        .route("/api/ps", get(aggregate::ps))
        .route("/api/version", get(aggregate::version))
        .route("/v1/models", get(aggregate::v1_models))
        .route("/v1/models/{model}", get(aggregate::v1_model))
        .route("/api/pull", management("pulling models"))
        .route("/api/push", management("pushing models"))
        .route("/api/create", management("creating models"))
        .route("/api/copy", management("copying models"))
        .route("/api/delete", management("deleting models"))
        .route("/api/blobs/{digest}", management("uploading blobs"))
        .route("/api/status", get(passthrough::forward))
        .route("/api/experimental/{*rest}", any(passthrough::forward))
        .route("/api/me", account())
        .route("/api/signout", account())
        .route("/api/user/keys/{key}", account())
        .route("/__proxy", get(dashboard::redirect))
        .route("/__proxy/", get(dashboard::page))
        .route("/__proxy/stats", get(dashboard::stats))
        .route("/__proxy/health", get(admin::health))
        .route(
            "/__proxy/backends",
            get(admin::backends).post(admin::register),
        )
        .route("/__proxy/backends/{id}", delete(admin::deregister))
        .route(
            "/__proxy/backends/{id}/drain",
            post(admin::set_draining::<true>),
        )
        .route(
            "/__proxy/backends/{id}/undrain",
            post(admin::set_draining::<false>),
        )
        .route("/metrics", get(admin::metrics));
    for endpoint in Endpoint::ALL {
        router = router.route(
            endpoint.path(),
            post(move |state, request| forward::forward(state, endpoint, request)),
        );
    }
    router
        // Unknown paths and wrong methods, as Ollama answers them.
        .fallback(|| async { (StatusCode::NOT_FOUND, PLAIN, "404 page not found") })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                PLAIN,
                "405 method not allowed",
            )
        })
        .layer(middleware::from_fn_with_state(Arc::clone(&app), front))
        .with_state(app)
}

/// Model management (all Ollama's) answers 403 whatever the method.
fn management(what: &'static str) -> MethodRouter<Arc<App>> {
    any(move || async move { ProxyError::ModelManagement(what) })
}

/// Account endpoints answer 403: sign-in state belongs to each backend.
fn account() -> MethodRouter<Arc<App>> {
    any(|| async { ProxyError::Account })
}

/// The `Content-Type` of Ollama's plain-text refusals.
const PLAIN: [(http::HeaderName, &str); 1] = [(http::header::CONTENT_TYPE, "text/plain")];

/// The one middleware, in front of every route (one layer, not two: it runs
/// on every request). It takes the client's `X-Request-Id` or makes one,
/// passes it to the backend (it is a request header) and returns it, even on
/// a refusal; then it checks the API key.
async fn front(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&format!("{:016x}", rand::random::<u64>()))
                .expect("hex is a valid header value")
        });
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let mut response = match auth::refusal(&app, &request) {
        None => next.run(request).await,
        Some(refused) => refused,
    };
    response.headers_mut().insert(REQUEST_ID, id);
    response
}
