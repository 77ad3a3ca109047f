//! Errors the proxy itself answers with, and their one rendering: the status,
//! `Retry-After` where waiting helps, and the body in the shape of the
//! request's [`Api`]: Ollama's (`{"error": "..."}`), OpenAI's (also for the
//! Responses API: `{"error": {"message", "type", "param", "code"}}`) or
//! Anthropic's (`{"type": "error", "error": {"type", "message"}, "request_id"}`).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use super::endpoint::Api;
use crate::fleet::Rejection;

/// What went wrong, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The body is not the JSON the endpoint takes.
    #[error("{0}")]
    BadRequest(String),
    /// `"stream": true` while REJECT_STREAMING is set.
    #[error("streaming is disabled on this proxy (REJECT_STREAMING=true); send \"stream\": false")]
    StreamingRefused,
    /// Missing or wrong `Authorization`.
    #[error("unauthorized: a valid 'Authorization: Bearer <key>' header is required")]
    Unauthorized,
    /// Model management through the proxy.
    #[error(
        "{0} is disabled on this proxy: corral routes inference and never changes the models of its backends"
    )]
    ModelManagement(&'static str),
    /// An admin action from where it is not allowed.
    #[error("{0}")]
    Forbidden(&'static str),
    /// No backend has listed the model since corral started.
    #[error("model '{0}' not found")]
    UnknownModel(String),
    /// No such thing (a backend id, an admin path).
    #[error("{0}")]
    NotFound(String),
    /// The body is over MAX_BODY_BYTES.
    #[error("request body too large: the limit is {0} bytes (MAX_BODY_BYTES)")]
    BodyTooLarge(usize),
    /// The client was too slow sending its body.
    #[error("request body not received in time")]
    BodyTimeout,
    /// Every attempt failed: how many, and the last one's error.
    #[error("all attempts failed: {attempts} attempt(s), last: {last}")]
    AllAttemptsFailed {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// No untried backend was left; the last failure, if there was one.
    #[error("all attempts failed: no untried backend left; last: {}", .0.as_deref().unwrap_or("no backend left to try"))]
    Exhausted(Option<String>),
    /// The wait queue is full: the rejection says which limit (count,
    /// bytes or the tenant's share); then the estimated wait in seconds for
    /// `Retry-After`.
    #[error("server busy: the queue is full ({}); please try again", .0.limit().unwrap_or_default())]
    QueueFull(Rejection, u32),
    /// No backend became free in QUEUE_TIMEOUT_SECONDS; then the estimated
    /// wait in seconds for `Retry-After`.
    #[error("no backend could take the request within {0} s (QUEUE_TIMEOUT_SECONDS)")]
    QueueTimeout(u64, u32),
    /// No healthy backend can answer a fleet-wide question.
    #[error("no healthy backend")]
    NoHealthyBackend,
    /// The proxy is shutting down.
    #[error("corral is shutting down")]
    ShuttingDown,
    /// Account endpoints (`/api/me`, `/api/signout`, user keys).
    #[error("account endpoints are disabled on this proxy: sign-in state belongs to each backend")]
    Account,
    /// A `previous_response_id` whose backend is gone.
    #[error("previous_response_id was not found or has expired; resend the full conversation")]
    PreviousResponseGone,
}

impl ProxyError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::StreamingRefused => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelManagement(_) | Self::Forbidden(_) | Self::Account => StatusCode::FORBIDDEN,
            Self::UnknownModel(_) | Self::NotFound(_) | Self::PreviousResponseGone => {
                StatusCode::NOT_FOUND
            }
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::AllAttemptsFailed { .. } | Self::Exhausted(_) => StatusCode::BAD_GATEWAY,
            Self::QueueFull(..)
            | Self::QueueTimeout(..)
            | Self::NoHealthyBackend
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Seconds a client should wait before trying again, where that helps.
    fn retry_after(&self) -> Option<u32> {
        match self {
            Self::QueueFull(_, secs) | Self::QueueTimeout(_, secs) => Some(*secs),
            Self::NoHealthyBackend | Self::ShuttingDown => Some(5),
            _ => None,
        }
    }

    /// The response in the shape of `api`.
    pub fn render(&self, api: Api) -> Response {
        let status = self.status();
        let message = self.to_string();
        if matches!(self, Self::PreviousResponseGone) {
            // Exactly the answer of the backend that no longer has it.
            let content_type = [(header::CONTENT_TYPE, "application/json")];
            let body = format!("{}\n", super::responses::NOT_FOUND_BODY);
            return (status, content_type, body).into_response();
        }
        let body = match api {
            Api::Ollama => json!({ "error": message }),
            Api::Anthropic => json!({
                "type": "error",
                "error": { "type": anthropic_type(status), "message": message },
                "request_id": format!("req_{:024x}", rand::random::<u128>() >> 32),
            }),
            Api::OpenAi | Api::Responses => json!({ "error": {
                "message": message,
                "type": openai_type(status),
                "param": null,
                "code": null,
            }}),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Outside the routed APIs (the proxy's own endpoints), Ollama's shape.
impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.render(Api::Ollama)
    }
}

/// OpenAI's error `type` for a status, as Ollama's compatibility layer sets it.
fn openai_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
            "invalid_request_error"
        }
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        _ => "api_error",
    }
}

/// Anthropic's error `type` for a status, as Ollama's Anthropic layer sets it.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 408 | 413 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(r: Response) -> serde_json::Value {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn ollama_paths_get_a_single_error_string() {
        let r = ProxyError::UnknownModel("ghost".into()).render(Api::of("/api/chat"));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            body_json(r).await,
            json!({"error": "model 'ghost' not found"})
        );
    }

    #[tokio::test]
    async fn v1_paths_get_the_openai_error_object() {
        let r = ProxyError::BodyTooLarge(10).render(Api::of("/v1/chat/completions"));
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let v = body_json(r).await;
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    }

    #[tokio::test]
    async fn messages_paths_get_the_anthropic_error_object() {
        let r = ProxyError::QueueFull(Rejection::QueueFull, 7).render(Api::of("/v1/messages"));
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let v = body_json(r).await;
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
        let id = v["request_id"].as_str().unwrap();
        assert!(id.starts_with("req_") && id.len() == 28, "{id}");
        let v = body_json(ProxyError::Unauthorized.render(Api::Anthropic)).await;
        assert_eq!(v["error"]["type"], "authentication_error");
    }

    #[tokio::test]
    async fn a_gone_previous_response_gets_ollamas_404() {
        let r = ProxyError::PreviousResponseGone.render(Api::of("/v1/responses"));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let v = body_json(r).await;
        assert_eq!(v["error"]["code"], "previous_response_not_found");
        assert_eq!(v["error"]["param"], "previous_response_id");
    }

    #[test]
    fn unavailable_answers_say_when_to_come_back() {
        for e in [
            ProxyError::QueueFull(Rejection::QueueFull, 1),
            ProxyError::QueueTimeout(3600, 5),
            ProxyError::NoHealthyBackend,
        ] {
            let r = e.render(Api::Ollama);
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(r.headers().contains_key(header::RETRY_AFTER), "{e}");
        }
        assert!(
            !ProxyError::AllAttemptsFailed {
                attempts: 1,
                last: "x".into()
            }
            .render(Api::Ollama)
            .headers()
            .contains_key(header::RETRY_AFTER)
        );
    }
}
