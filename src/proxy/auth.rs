//! Client access control: with PROXY_API_KEYS set, every request but the
//! liveness checks (`GET /`, `HEAD /`, `GET /__proxy/health`) needs
//! `Authorization: Bearer <key>`, or `x-api-key: <key>` as Anthropic clients
//! send it. Keys are compared in constant time and never logged; neither
//! header reaches a backend. The key that matched names the request's tenant.

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, Method, header};
use subtle::ConstantTimeEq;

use super::App;
use super::endpoint::Api;
use super::error::ProxyError;
use super::headers::X_API_KEY;

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

/// The client's key: its bearer token, else Anthropic's `x-api-key`.
fn client_token(headers: &HeaderMap) -> Option<&[u8]> {
    bearer(headers).or_else(|| {
        headers
            .get(X_API_KEY)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().as_bytes())
    })
}

/// Which of `keys` `token` is. Every key is compared, each in constant time,
/// so timing tells nothing about which one matched or how much of one did.
fn position<'k>(token: &[u8], keys: impl Iterator<Item = &'k str>) -> Option<usize> {
    keys.enumerate().fold(None, |found, (i, key)| {
        let hit = token.ct_eq(key.as_bytes()).unwrap_u8() == 1;
        found.or(hit.then_some(i))
    })
}

/// Which of `keys` the request's client key (bearer or `x-api-key`) is.
pub fn matching_key<'k>(headers: &HeaderMap, keys: impl Iterator<Item = &'k str>) -> Option<usize> {
    position(client_token(headers)?, keys)
}

/// Whether the request's bearer token is one of `keys`.
pub fn bearer_matches(headers: &HeaderMap, keys: &[String]) -> bool {
    bearer(headers).is_some_and(|token| position(token, keys.iter().map(String::as_str)).is_some())
}

/// Paths open without a key: what a load balancer or `ollama` CLI heartbeat checks.
fn is_open(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET | &Method::HEAD, "/") | (&Method::GET, "/__proxy/health")
    )
}

/// A `POST` or `DELETE /__proxy/...` action carrying PROXY_ADMIN_KEY or
/// REGISTRATION_KEY: the operator or the job need not also hold a client key
/// (the admin handler checks which key may do what).
fn is_admin_action_with_its_key(keys: &[String], request: &Request) -> bool {
    matches!(*request.method(), Method::POST | Method::DELETE)
        && request.uri().path().starts_with("/__proxy/")
        && bearer_matches(request.headers(), keys)
}

/// The set keys of the admin side: PROXY_ADMIN_KEY and REGISTRATION_KEY.
pub fn admin_keys(app: &App) -> Vec<String> {
    [&app.args.admin_key, &app.args.registration_key]
        .into_iter()
        .filter(|k| !k.is_empty())
        .cloned()
        .collect()
}

/// The 401 for a request without a valid key when keys are set; `None`
/// lets it through.
pub fn refusal(app: &App, request: &Request) -> Option<Response> {
    let keys = &app.tenancy.keys;
    if keys.is_empty()
        || is_open(request.method(), request.uri().path())
        || matching_key(request.headers(), keys.iter().map(|k| k.key.as_str())).is_some()
        || is_admin_action_with_its_key(&admin_keys(app), request)
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
    fn an_anthropic_x_api_key_counts_as_a_key() {
        let keys = ["beta", "alpha"];
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "alpha".parse().unwrap());
        assert_eq!(matching_key(&h, keys.into_iter()), Some(1));
        h.insert("x-api-key", "alph".parse().unwrap());
        assert_eq!(matching_key(&h, keys.into_iter()), None);
        assert_eq!(
            matching_key(&headers("Bearer alpha"), keys.into_iter()),
            Some(1)
        );
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
