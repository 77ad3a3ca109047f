//! Access control over HTTP: PROXY_API_KEYS (401 in the Ollama or OpenAI
//! shape, liveness checks open, keys never forwarded nor logged),
//! PROXY_ADMIN_KEY for the `POST /__proxy/...` actions, and model management
//! refused even with a valid key.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Json;
use axum::routing::{get, post};
use common::{TestFleet, bind_block, start_proxy, test_args};
use corral::proxy;
use corral::sim::ServerSpec;
use serde_json::{Value, json};

const KEY: &str = "sk-corral-test-0123456789";
const OTHER_KEY: &str = "second-key";
const ADMIN_KEY: &str = "admin-secret-key-42";

/// Every log line of this test binary, at every level of corral.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let writer = || LogWriter;
        let _ = tracing_subscriber::fmt()
            .with_env_filter("corral=trace")
            .with_writer(writer)
            .with_ansi(false)
            .try_init();
        Mutex::new(Vec::new())
    })
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn keyed_proxy(fleet: &TestFleet, admin: &str) -> common::TestProxy {
    let admin = admin.to_string();
    start_proxy(fleet, |a| {
        a.api_keys = vec![KEY.into(), OTHER_KEY.into()];
        a.admin_key = admin;
    })
    .await
}

#[tokio::test]
async fn requests_without_a_valid_key_get_401_in_the_shape_of_their_api() {
    logs();
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = keyed_proxy(&fleet, "").await;
    let c = &proxy.client;
    let body = json!({"model": "llama3.2", "prompt": "hi", "stream": false});
    for auth in [None, Some("Bearer wrong"), Some("Basic c2stY29ycmFs")] {
        let mut r = c.post(proxy.at("/api/generate")).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("unauthorized"), "{v}");
    }
    let r = c
        .post(proxy.at("/v1/chat/completions"))
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "OpenAI shape: {v}");
    assert!(v["error"]["type"].is_string(), "OpenAI shape: {v}");
    for path in [
        "/api/tags",
        "/api/ps",
        "/api/version",
        "/v1/models",
        "/__proxy/backends",
        "/metrics",
    ] {
        let r = c.get(proxy.at(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    // Both keys work, on native and /v1 paths.
    for key in [KEY, OTHER_KEY] {
        let r = c
            .post(proxy.at("/api/generate"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = c
            .get(proxy.at("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn liveness_checks_stay_open_without_a_key() {
    logs();
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = keyed_proxy(&fleet, ADMIN_KEY).await;
    let c = &proxy.client;
    let r = c.get(proxy.at("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Ollama is running");
    assert_eq!(c.head(proxy.at("/")).send().await.unwrap().status(), 200);
    let r = c.get(proxy.at("/__proxy/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Only those: POST / and the other proxy pages need a key.
    assert_eq!(c.post(proxy.at("/")).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn admin_actions_need_the_admin_key() {
    logs();
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let port = fleet.port_start;
    let proxy = keyed_proxy(&fleet, ADMIN_KEY).await;
    let c = &proxy.client;
    let drain = proxy.at(&format!("/__proxy/backends/{port}/drain"));
    let undrain = proxy.at(&format!("/__proxy/backends/{port}/undrain"));
    // No key, or a client key: refused, nothing changes.
    for key in [None, Some(KEY), Some("wrong")] {
        let mut r = c.post(&drain);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{key:?}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{v}");
    }
    let rows = c
        .get(proxy.at("/__proxy/backends"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(rows["backends"][0]["draining"], false, "{rows}");
    // The admin key works even though it is not a client key.
    let r = c.post(&drain).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(&undrain)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The admin key does not open the inference paths.
    let r = c
        .post(proxy.at("/api/generate"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"model": "llama3.2", "prompt": "hi", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn admin_actions_without_an_admin_key_are_allowed_from_loopback() {
    logs();
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .client
        .post(proxy.at(&format!("/__proxy/backends/{}/drain", fleet.port_start)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn model_management_is_403_even_with_a_valid_key() {
    logs();
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = keyed_proxy(&fleet, ADMIN_KEY).await;
    let c = &proxy.client;
    for path in [
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/blobs/sha256:abc",
    ] {
        for key in [KEY, ADMIN_KEY] {
            let r = c
                .post(proxy.at(path))
                .bearer_auth(key)
                .json(&json!({"model": "llama3.2"}))
                .send()
                .await
                .unwrap();
            // The admin key is no client key: 401 before the 403.
            let expected = if key == KEY { 403 } else { 401 };
            assert_eq!(r.status(), expected, "{path} with {key}");
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].is_string(), "{path}: {v}");
        }
    }
    let r = c
        .delete(proxy.at("/api/delete"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        !fleet.servers[0]
            .stats()
            .requests
            .contains_key("/api/delete")
    );
}

/// A minimal backend that records the headers of every generate request.
async fn recording_backend() -> (u16, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = bind_block(1).await.remove(0);
    let port = listener.local_addr().unwrap().port();
    let record = Arc::clone(&seen);
    let app = axum::Router::new()
        .route(
            "/api/tags",
            get(|| async {
                Json(json!({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]}))
            }),
        )
        .route("/api/ps", get(|| async { Json(json!({"models": []})) }))
        .route(
            "/api/version",
            get(|| async { Json(json!({"version": "0.0.1"})) }),
        )
        .route(
            "/api/generate",
            post(move |headers: http::HeaderMap| async move {
                record.lock().unwrap().push(headers);
                Json(json!({"model": "llama3.2", "response": "ok", "done": true}))
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

#[tokio::test]
async fn keys_are_neither_forwarded_to_backends_nor_logged() {
    logs();
    let (port, seen) = recording_backend().await;
    let fleet = TestFleet {
        servers: Vec::new(),
        spare: Vec::new(),
        port_start: port,
        port_end: port,
    };
    let mut args = test_args(&fleet);
    args.api_keys = vec![KEY.into()];
    args.admin_key = ADMIN_KEY.into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = proxy::start(listener, args).unwrap();
    let url = format!("http://{}", handle.addr);
    let c = reqwest::Client::new();
    common::wait_healthy_at(&url, 1).await;
    let body = json!({"model": "llama3.2", "prompt": "hi", "stream": false});
    let r = c
        .post(format!("{url}/api/generate"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Refused attempts, with wrong and admin keys, get logged as refusals.
    for key in [ADMIN_KEY, "sk-corral-test-guess"] {
        let r = c
            .post(format!("{url}/api/generate"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = c
        .post(format!("{url}/__proxy/backends/{port}/drain"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].get("authorization").is_none(), "{:?}", seen[0]);
    for (name, value) in &seen[0] {
        let value = value.to_str().unwrap_or_default();
        assert!(!value.contains(KEY), "key forwarded in {name}");
    }
    handle.shutdown().await;
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(
        logs.contains("request without a valid API key"),
        "logging was captured"
    );
    for secret in [KEY, OTHER_KEY, ADMIN_KEY, "sk-corral-test-guess"] {
        assert!(!logs.contains(secret), "'{secret}' appears in the logs");
    }
}
