//! The proxy's admin actions and shutdown: drain lets a backend finish what
//! it has and gives it nothing new, undrain brings it back, unknown ids are
//! 404, PROXY_ADMIN_KEY guards the actions; on shutdown, queued requests get
//! 503 while in-flight ones complete.

mod common;

use common::backend_of;

use std::time::Duration;

use common::{TestFleet, eventually, generate, start_proxy};
use corral::sim::ServerSpec;
use serde_json::{Value, json};

/// A backend that takes `tokens` × 50 ms per answer.
fn slow(tokens: usize) -> ServerSpec {
    ServerSpec {
        token_interval: Duration::from_millis(50),
        tokens,
        ..ServerSpec::default()
    }
}

async fn row(proxy: &common::TestProxy, port: u16) -> Value {
    let v = proxy.get_json("/__proxy/backends").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["port"] == port)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn a_drained_backend_finishes_its_request_and_gets_nothing_new_until_undrained() {
    let fleet = TestFleet::uniform(2, slow(10)).await;
    let proxy = start_proxy(&fleet, |a| a.max_concurrent_per_backend = 2).await;
    let (first, second) = (fleet.port_start, fleet.port_end);

    // A stream in flight on the first backend.
    let streaming = proxy
        .post("/api/generate", generate("llama3.2", "long", true))
        .await;
    assert_eq!(backend_of(&streaming), first);

    let r = proxy
        .client
        .post(proxy.at(&format!("/__proxy/backends/{first}/drain")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": first, "draining": true})
    );
    let drained = row(&proxy, first).await;
    assert_eq!(drained["draining"], true);
    assert_eq!(drained["in_flight"], 1);

    // New requests all go elsewhere, though the drained one has a free slot.
    for i in 0..3 {
        let r = proxy
            .post(
                "/api/generate",
                generate("llama3.2", &format!("n{i}"), false),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(backend_of(&r), second);
    }
    // The stream it had runs to its end.
    let text = streaming.text().await.unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true, "{text}");
    eventually(
        Duration::from_secs(5),
        "the drained backend is idle",
        || async { row(&proxy, first).await["in_flight"] == 0 },
    )
    .await;

    let r = proxy
        .client
        .post(proxy.at(&format!("/__proxy/backends/{first}/undrain")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(row(&proxy, first).await["draining"], false);
    let r = proxy
        .post("/api/generate", generate("llama3.2", "back", false))
        .await;
    assert_eq!(backend_of(&r), first, "idle fleet: lowest port again");
}

#[tokio::test]
async fn draining_an_unknown_backend_is_404() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    for action in ["drain", "undrain"] {
        let r = proxy
            .client
            .post(proxy.at(&format!("/__proxy/backends/1/{action}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{action}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("no backend '1'"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn with_an_admin_key_only_its_bearer_may_drain() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| a.admin_key = "s3cret".into()).await;
    let url = proxy.at(&format!("/__proxy/backends/{}/drain", fleet.port_start));
    let r = proxy.client.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "no key, even from loopback");
    let r = proxy
        .client
        .post(&url)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "wrong key");
    assert_eq!(row(&proxy, fleet.port_start).await["draining"], false);
    let r = proxy
        .client
        .post(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(row(&proxy, fleet.port_start).await["draining"], true);
}

#[tokio::test]
async fn shutdown_turns_queued_requests_away_and_lets_in_flight_ones_finish() {
    let fleet = TestFleet::uniform(1, slow(20)).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let send = |prompt: &'static str| {
        let (c, u) = (proxy.client.clone(), proxy.at("/api/generate"));
        tokio::spawn(async move {
            let r = c
                .post(u)
                .json(&generate("llama3.2", prompt, false))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        })
    };
    let in_flight = send("first");
    eventually(
        Duration::from_secs(5),
        "the first request holds the slot",
        || async { common::in_flight(&proxy).await == 1 },
    )
    .await;
    let queued = send("second");
    eventually(
        Duration::from_secs(5),
        "the second request waits",
        || async { proxy.get_json("/__proxy/backends").await["queue"]["waiting"] == 1 },
    )
    .await;

    let common::TestProxy { handle, .. } = proxy;
    let stopping = tokio::spawn(handle.shutdown());
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 503, "{body}");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["done"], true);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown completes once the in-flight request ended")
        .unwrap();
    assert_eq!(fleet.completed(), 1);
}
