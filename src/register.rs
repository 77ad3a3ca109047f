//! `corral register`: the job-side helper. It registers the job's Ollama with
//! a corral (`POST /__proxy/backends`), renews the lease while that Ollama
//! answers `/api/tags`, and on SIGTERM (a batch scheduler's warning before
//! the time limit) drains the backend, waits up to a grace period for its
//! in-flight requests to finish, deregisters it and exits 0.
//!
//! ```text
//! corral register --proxy http://proxyhost:11434 --url http://$(hostname):11500 --lease 30
//! ```

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::RegisterArgs;

/// Longest wait for one HTTP exchange with the proxy or the local Ollama.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the local Ollama is asked until it first answers.
const STARTUP_POLL: Duration = Duration::from_millis(100);

/// How often the drained backend's in-flight count is asked for.
const DRAIN_POLL: Duration = Duration::from_millis(200);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The helper's client and settings.
struct Registrar {
    client: HttpClient,
    args: RegisterArgs,
    proxy: String,
}

/// One HTTP answer: status and JSON body (`null` when not JSON).
type Answer = (StatusCode, Value);

impl Registrar {
    fn new(args: RegisterArgs) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let proxy = args.proxy.to_string().trim_end_matches('/').to_owned();
        Self {
            client,
            args,
            proxy,
        }
    }

    async fn call(&self, method: Method, url: &str, body: Option<Value>) -> Result<Answer, String> {
        let mut request = http::Request::builder().method(method).uri(url);
        if !self.args.key.is_empty() {
            request = request.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.args.key),
            );
        }
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let body = Full::new(body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string())));
        let request = request
            .body(body)
            .map_err(|e| format!("bad URL {url}: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{url}: {}", crate::pool::chain(&e)))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{url}: reading the answer: {e}"))?
                .to_bytes();
            let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok((status, json))
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("{url}: no answer within {CALL_TIMEOUT:?}")))
    }

    /// Whether the local Ollama answers its model list.
    async fn ollama_answers(&self) -> bool {
        let url = format!("{}/api/tags", self.args.check_url().trim_end_matches('/'));
        matches!(self.call(Method::GET, &url, None).await, Ok((s, _)) if s.is_success())
    }

    /// Registers or renews; `Ok(Some(id))` on success, `Ok(None)` when the
    /// proxy could not be reached (tried again later), `Err` when it refused.
    async fn register(&self) -> Result<Option<String>, String> {
        let body = json!({
            "url": self.args.url.to_string().trim_end_matches('/'),
            "lease_seconds": self.args.lease.as_secs_f64(),
        });
        let url = format!("{}/__proxy/backends", self.proxy);
        match self.call(Method::POST, &url, Some(body)).await {
            Ok((status, body)) if status.is_success() => {
                Ok(Some(body["id"].as_str().unwrap_or_default().to_owned()))
            }
            Ok((status, body)) if status.is_client_error() => Err(format!(
                "the proxy refused the registration: {status}: {}",
                error_text(&body)
            )),
            Ok((status, body)) => {
                tracing::warn!(%status, error = %error_text(&body), "registration failed; trying again");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy unreachable; trying again");
                Ok(None)
            }
        }
    }

    /// Drains the backend, waits for its requests (up to the grace), deregisters.
    async fn leave(&self, id: &str) -> Result<(), String> {
        let base = format!("{}/__proxy/backends", self.proxy);
        let drain = format!("{base}/{id}/drain");
        let (status, body) = self.call(Method::POST, &drain, None).await?;
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(format!("draining failed: {status}: {}", error_text(&body)));
        }
        tracing::info!(backend = id, "drained; waiting for in-flight requests");
        let deadline = Instant::now() + self.args.grace;
        loop {
            let in_flight = match self.call(Method::GET, &base, None).await {
                Ok((_, rows)) => rows["backends"]
                    .as_array()
                    .and_then(|rows| rows.iter().find(|r| r["id"] == id))
                    .map_or(0, |r| r["in_flight"].as_u64().unwrap_or(0)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the backend's in-flight count");
                    0
                }
            };
            if in_flight == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(in_flight, "grace period over; deregistering anyway");
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let this = format!("{base}/{id}");
        let (status, body) = self.call(Method::DELETE, &this, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            tracing::info!(backend = id, "deregistered");
            Ok(())
        } else {
            Err(format!(
                "deregistering failed: {status}: {}",
                error_text(&body)
            ))
        }
    }
}

/// The `error` of a corral error body, or the body itself.
fn error_text(body: &Value) -> String {
    match &body["error"] {
        Value::String(s) => s.clone(),
        Value::Null => body.to_string(),
        other => other.to_string(),
    }
}

/// Runs the helper until `shutdown` completes, then leaves the fleet cleanly.
///
/// A job starts `ollama serve` and this helper together, so the first
/// checks usually find no Ollama yet: until it first answers, it is asked
/// every [`STARTUP_POLL`], and the job registers within that of Ollama being
/// up. After that (and after a proxy that could not be reached) it renews
/// three times a lease, so that one lost renewal does not lapse it.
pub async fn run(args: RegisterArgs, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    if args.lease.is_zero() {
        return Err("--lease must be more than 0 seconds".into());
    }
    let registrar = Registrar::new(args);
    let renew_every = registrar.args.lease / 3;
    let mut next_check = Instant::now();
    let mut id: Option<String> = None;
    let mut ollama_was_up = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(next_check) => {}
        }
        let checked_at = Instant::now();
        let up = registrar.ollama_answers().await;
        if ollama_was_up != Some(up) {
            let url = registrar.args.check_url();
            match (up, &id) {
                (true, _) => tracing::info!(%url, "local Ollama answers"),
                // Nothing registered yet: the job is still starting.
                (false, None) => tracing::info!(%url, "waiting for the local Ollama to answer"),
                (false, Some(_)) => {
                    tracing::warn!(%url, "local Ollama does not answer; not renewing")
                }
            }
            ollama_was_up = Some(up);
        }
        let starting = !up && id.is_none();
        next_check = checked_at + if starting { STARTUP_POLL } else { renew_every };
        if !up {
            continue;
        }
        if let Some(registered) = registrar.register().await? {
            if id.as_deref() != Some(registered.as_str()) {
                tracing::info!(backend = %registered, proxy = %registrar.proxy, "registered");
            }
            id = Some(registered);
        }
    }
    match id {
        Some(id) => registrar.leave(&id).await,
        None => Ok(()),
    }
}
