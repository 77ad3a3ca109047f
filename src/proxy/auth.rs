//! Client access control: with PROXY_API_KEYS set, every request but the
//! liveness checks (`GET /`, `HEAD /`, `GET /__proxy/health`) needs
//! `Authorization: Bearer <key>`. Keys are compared in constant time and
//! never logged; the key that matched names the request's tenant.

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, Method, header};
use subtle::ConstantTimeEq;

use super::App;
use super::error::{Api, ProxyError};

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })?;
    Some(token.trim().as_bytes())
}

/// Which of `keys` the request's bearer token is. Every key is compared,
/// each in constant time, so timing tells nothing about which one matched or
/// how much of one did.
pub fn matching_key<'k>(headers: &HeaderMap, keys: impl Iterator<Item = &'k str>) -> Option<usize> {
    let token = bearer(headers)?;
    let mut found: Option<usize> = None;
    for (i, key) in keys.enumerate() {
        let hit = token.ct_eq(key.as_bytes()).unwrap_u8() == 1;
        if hit && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Whether the request's bearer token is one of `keys`.
pub fn bearer_matches(headers: &HeaderMap, keys: &[String]) -> bool {
    matching_key(headers, keys.iter().map(String::as_str)).is_some()
}

/// Paths open without a key: what a load balancer or `ollama` CLI heartbeat checks.
fn is_open(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET | &Method::HEAD, "/") | (&Method::GET, "/__proxy/health")
    )
}

/// A `POST /__proxy/...` action carrying PROXY_ADMIN_KEY: the operator need
/// not also hold a client key (the admin handler checks the key itself).
fn is_admin_action_with_its_key(admin_key: &str, request: &Request) -> bool {
    !admin_key.is_empty()
        && request.method() == Method::POST
        && request.uri().path().starts_with("/__proxy/")
        && bearer_matches(
            request.headers(),
            std::slice::from_ref(&admin_key.to_string()),
        )
}

/// The 401 for a request without a valid key when keys are set; `None`
/// lets it through.
pub fn refusal(app: &App, request: &Request) -> Option<Response> {
    let keys = &app.tenancy.keys;
    if keys.is_empty()
        || is_open(request.method(), request.uri().path())
        || matching_key(request.headers(), keys.iter().map(|k| k.key.as_str())).is_some()
        || is_admin_action_with_its_key(&app.args.admin_key, request)
    {
        return None;
    }
    tracing::warn!(
        path = request.uri().path(),
        "request without a valid API key"
    );
    Some(ProxyError::Unauthorized.render(Api::of(request.uri().path())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn only_a_listed_bearer_key_matches() {
        let keys = vec!["alpha".to_string(), "beta".to_string()];
        assert!(bearer_matches(&headers("Bearer beta"), &keys));
        assert!(!bearer_matches(&headers("Bearer bet"), &keys));
        assert!(!bearer_matches(&headers("Bearer betaa"), &keys));
        assert!(!bearer_matches(&headers("Basic YWxwaGE="), &keys));
        assert!(!bearer_matches(&HeaderMap::new(), &keys));
        assert!(!bearer_matches(&headers("Bearer "), &keys));
    }

    #[test]
    fn liveness_checks_stay_open() {
        assert!(is_open(&Method::GET, "/"));
        assert!(is_open(&Method::HEAD, "/"));
        assert!(is_open(&Method::GET, "/__proxy/health"));
        assert!(!is_open(&Method::POST, "/api/chat"));
        assert!(!is_open(&Method::GET, "/__proxy/backends"));
    }
}
