//! The header names the proxy reads and writes, made at compile time (a
//! `&str` name is parsed again on every insert or look-up).

use http::HeaderName;

/// A request's id, taken from the client or made, passed on and returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Anthropic's key header, read like a bearer token and never forwarded.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The header naming a tenant when no API keys are set.
pub const TENANT: HeaderName = HeaderName::from_static("x-corral-tenant");
/// The header asking for a priority.
pub const PRIORITY: HeaderName = HeaderName::from_static("x-corral-priority");
/// The answer's header naming the backend that answered.
pub const BACKEND: HeaderName = HeaderName::from_static("x-corral-backend");
/// The answer's header counting the attempts made.
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-corral-attempts");
/// The answer's header with the time the request waited for a slot.
pub const QUEUE_MS: HeaderName = HeaderName::from_static("x-corral-queue-ms");
