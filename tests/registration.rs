//! Self-registration over HTTP: a registered backend serves within one probe
//! and answers as the id the registration returned; an expired lease and a
//! `DELETE` drain the backend (its in-flight request finishes) and then
//! forget it; the keys that may register and those that may not.

mod common;

use std::time::Duration;

use common::{TestFleet, TestProxy, eventually, generate, slow, spawn_post, start_proxy};
use corral::sim::{ServerSpec, SimServer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A simulated backend outside any scanned range.
async fn outside(spec: ServerSpec) -> SimServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimServer::start(listener, spec).await.unwrap()
}

/// A proxy with an empty range and scans far apart, so that only the
/// probe a registration triggers can make a backend healthy in time.
async fn lonely_proxy(tweak: impl FnOnce(&mut corral::config::ServeArgs)) -> TestProxy {
    let empty = TestFleet::start(Vec::new(), 1).await;
    start_proxy(&empty, |a| {
        a.scan_interval = Duration::from_secs(60);
        tweak(a);
    })
    .await
}

async fn register(proxy: &TestProxy, body: Value, key: Option<&str>) -> reqwest::Response {
    let mut r = proxy.client.post(proxy.at("/__proxy/backends")).json(&body);
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn a_registered_backend_serves_within_one_probe_under_its_id() {
    let backend = outside(ServerSpec::default()).await;
    let proxy = lonely_proxy(|_| {}).await;
    let url = format!("http://127.0.0.1:{}", backend.port());
    let r = register(&proxy, json!({ "url": url, "lease_seconds": 30 }), None).await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let id = format!("127.0.0.1:{}", backend.port());
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["lease_seconds"], 30.0);
    // The next scan is a minute away: the registration's own probe does it.
    eventually(
        Duration::from_secs(3),
        "registered backend healthy",
        || async { proxy.healthy().await == 1 },
    )
    .await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], id.as_str());
    // A renewal answers 200 and the same id, and keeps the backend serving.
    let r = register(&proxy, json!({ "url": url, "lease_seconds": 30 }), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id.as_str());
    assert_eq!(proxy.healthy().await, 1);
}

#[tokio::test]
async fn bad_registrations_get_400_and_change_nothing() {
    let proxy = lonely_proxy(|_| {}).await;
    for body in [
        json!({ "url": "gpu7:11434" }),
        json!({ "url": "https://gpu7:11434" }),
        json!({ "url": "http://gpu7:11434", "lease_seconds": 0 }),
        json!({ "url": "http://gpu7:11434", "lease_seconds": -5 }),
        json!({ "url": "http://gpu7:11434", "lease": 5 }),
        json!({ "lease_seconds": 5 }),
    ] {
        let r = register(&proxy, body.clone(), None).await;
        assert_eq!(r.status(), 400, "{body}");
        let error: Value = r.json().await.unwrap();
        assert!(error["error"].as_str().is_some(), "{body}: {error}");
    }
    assert_eq!(
        proxy.get_json("/__proxy/backends").await["backends"],
        json!([])
    );
}

#[tokio::test]
async fn an_expired_lease_drains_the_backend_lets_its_request_finish_then_forgets_it() {
    // 20 tokens at 100 ms: a request takes 2 s, well past the lease.
    let backend = outside(slow(100, 20)).await;
    let proxy = lonely_proxy(|a| a.scan_interval = Duration::from_millis(100)).await;
    let url = format!("http://127.0.0.1:{}", backend.port());
    let id = format!("127.0.0.1:{}", backend.port());
    let r = register(&proxy, json!({ "url": url, "lease_seconds": 0.5 }), None).await;
    assert_eq!(r.status(), 201);
    proxy.wait_healthy(1).await;
    let request = spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "long", false),
        &[],
    );
    eventually(
        Duration::from_secs(5),
        "drained with the request in flight",
        || async {
            proxy
                .backend_row(&id)
                .await
                .is_some_and(|b| b["draining"] == true && b["in_flight"] == 1)
        },
    )
    .await;
    // Nothing new goes there: with it the only backend, a request waits.
    let r = request.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], id.as_str());
    assert!(!r.text().await.unwrap().is_empty());
    eventually(Duration::from_secs(5), "forgotten", || async {
        proxy.backend_row(&id).await.is_none()
    })
    .await;
    assert_eq!(backend.stats().completed, 1);
}

#[tokio::test]
async fn delete_drains_and_removes_when_idle_and_a_renewal_brings_it_back() {
    let busy = outside(slow(100, 10)).await;
    let idle = outside(ServerSpec::default()).await;
    let proxy = lonely_proxy(|a| a.scan_interval = Duration::from_millis(100)).await;
    for b in [&busy, &idle] {
        let url = format!("http://127.0.0.1:{}", b.port());
        let r = register(&proxy, json!({ "url": url, "lease_seconds": 60 }), None).await;
        assert_eq!(r.status(), 201);
    }
    proxy.wait_healthy(2).await;
    let busy_id = format!("127.0.0.1:{}", busy.port());
    let idle_id = format!("127.0.0.1:{}", idle.port());

    // Idle: removed at once.
    let r = proxy
        .client
        .delete(proxy.at(&format!("/__proxy/backends/{idle_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["removed"], true);
    assert!(proxy.backend_row(&idle_id).await.is_none());

    // Busy: drained, its request finishes, then removed.
    let request = spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "long", false),
        &[],
    );
    eventually(Duration::from_secs(5), "request in flight", || async {
        busy.stats().in_flight == 1
    })
    .await;
    let r = proxy
        .client
        .delete(proxy.at(&format!("/__proxy/backends/{busy_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(proxy.backend_row(&busy_id).await.unwrap()["draining"], true);
    let r = request.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], busy_id.as_str());
    eventually(Duration::from_secs(5), "removed once idle", || async {
        proxy.backend_row(&busy_id).await.is_none()
    })
    .await;

    // Unknown, or not registered: 404.
    let r = proxy
        .client
        .delete(proxy.at("/__proxy/backends/nowhere:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Registering again after removal: a new backend, serving again.
    let url = format!("http://127.0.0.1:{}", idle.port());
    let r = register(&proxy, json!({ "url": url, "lease_seconds": 60 }), None).await;
    assert_eq!(r.status(), 201);
    proxy.wait_healthy(1).await;
}

#[tokio::test]
async fn registration_needs_the_registration_or_admin_key_never_a_client_key() {
    let backend = outside(ServerSpec::default()).await;
    let proxy = lonely_proxy(|a| {
        a.api_keys = vec!["client".into()];
        a.registration_key = "reg".into();
        a.admin_key = "admin".into();
    })
    .await;
    let body = json!({ "url": format!("http://127.0.0.1:{}", backend.port()) });
    for (key, status) in [(None, 401), (Some("client"), 401), (Some("wrong"), 401)] {
        let r = register(&proxy, body.clone(), key).await;
        assert_eq!(r.status(), status, "{key:?}");
    }
    assert_eq!(
        register(&proxy, body.clone(), Some("reg")).await.status(),
        201
    );
    assert_eq!(
        register(&proxy, body.clone(), Some("admin")).await.status(),
        200
    );
    // The registration key drains its own backend, but no other.
    let id = format!("127.0.0.1:{}", backend.port());
    let drain = |id: String, key: &'static str| {
        proxy
            .client
            .post(proxy.at(&format!("/__proxy/backends/{id}/drain")))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(drain(id.clone(), "reg").await.unwrap().status(), 200);
    assert_eq!(drain("24001".into(), "reg").await.unwrap().status(), 401);
    let r = proxy
        .client
        .delete(proxy.at(&format!("/__proxy/backends/{id}")))
        .bearer_auth("client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = proxy
        .client
        .delete(proxy.at(&format!("/__proxy/backends/{id}")))
        .bearer_auth("reg")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn without_keys_registration_is_for_loopback_clients_only() {
    // The loopback half is every test above; the other half is a unit test of
    // the check (a test client cannot come from elsewhere). Here: with only
    // REGISTRATION_KEY set, loopback no longer suffices.
    let proxy = lonely_proxy(|a| a.registration_key = "reg".into()).await;
    let body = json!({ "url": "http://127.0.0.1:9" });
    assert_eq!(register(&proxy, body, None).await.status(), 401);
}
