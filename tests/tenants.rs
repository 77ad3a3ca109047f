//! Tenants over HTTP: the `X-Corral-Tenant` header shares the queue fairly,
//! a key names its tenant (and a header cannot change it, nor does the key
//! show anywhere), MAX_QUEUE_PER_TENANT refuses one tenant with a
//! `Retry-After`, `X-Corral-Priority` is checked, and the `tenant` metric
//! label stays bounded.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    TestFleet, eventually, generate, hold_slot, slow, spawn_post, start_proxy, wait_waiting,
};
use corral::sim::{ModelSpec, ServerSpec};
use serde_json::Value;

/// The tenants of `/__proxy/backends`, by name.
async fn tenants(proxy: &common::TestProxy) -> Vec<Value> {
    proxy.get_json("/__proxy/backends").await["tenants"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_tenant_with_one_request_is_not_queued_behind_anothers_many() {
    // One slot, 100 ms a request.
    let fleet = TestFleet::uniform(1, slow(20, 5)).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let holder = hold_slot(&proxy).await;
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let send = |tenant: &'static str, i: usize| {
        let request = proxy
            .client
            .post(proxy.at("/api/generate"))
            .header("x-corral-tenant", tenant)
            .json(&generate("llama3.2", "hi", false));
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200);
            done.lock().unwrap().push((tenant, i));
        })
    };
    for i in 0..5 {
        tasks.push(send("bulk", i));
    }
    wait_waiting(&proxy, 5).await;
    tasks.push(send("chat", 0));
    wait_waiting(&proxy, 6).await;
    let view = tenants(&proxy).await;
    let waiting = |name: &str| {
        view.iter()
            .find(|t| t["name"] == name)
            .map(|t| t["waiting"].as_u64().unwrap())
    };
    assert_eq!(waiting("bulk"), Some(5), "{view:?}");
    assert_eq!(waiting("chat"), Some(1), "{view:?}");
    drop(holder);
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    let chat = order.iter().position(|(t, _)| *t == "chat").unwrap();
    assert!(chat <= 1, "chat finished {chat}th of {order:?}");
    let bulk: Vec<usize> = order
        .iter()
        .filter(|(t, _)| *t == "bulk")
        .map(|(_, i)| *i)
        .collect();
    assert_eq!(
        bulk,
        [0, 1, 2, 3, 4],
        "first come first served within a tenant"
    );
}

#[tokio::test]
async fn a_key_names_the_tenant_and_a_header_cannot_change_it() {
    let fleet = TestFleet::uniform(1, slow(20, 5)).await;
    let proxy = start_proxy(&fleet, |a| {
        a.api_keys = vec!["alice:alice-secret-1".into(), "bare-secret-2".into()];
    })
    .await;
    let holder = {
        let r = proxy
            .client
            .post(proxy.at("/api/generate"))
            .bearer_auth("alice-secret-1")
            .header("x-sim-fault", "hang")
            .json(&generate("llama3.2", "hold", false));
        tokio::spawn(r.send())
    };
    let view = || async {
        let text = keyed_get(&proxy, "/__proxy/backends").await;
        let v: Value = serde_json::from_str(&text).unwrap();
        v["tenants"].as_array().unwrap().clone()
    };
    eventually(Duration::from_secs(5), "alice holds the slot", || async {
        view()
            .await
            .iter()
            .any(|t| t["name"] == "alice" && t["in_flight"] == 1)
    })
    .await;
    let waiter = {
        let r = proxy
            .client
            .post(proxy.at("/api/generate"))
            .bearer_auth("bare-secret-2")
            .header("x-corral-tenant", "alice")
            .json(&generate("llama3.2", "hi", false));
        tokio::spawn(r.send())
    };
    eventually(
        Duration::from_secs(5),
        "the bare key's request waits",
        || async {
            let view = view().await;
            view.iter()
                .any(|t| t["name"] == "key-2" && t["waiting"] == 1)
                && view
                    .iter()
                    .any(|t| t["name"] == "alice" && t["in_flight"] == 1 && t["waiting"] == 0)
        },
    )
    .await;
    let backends = keyed_get(&proxy, "/__proxy/backends").await;
    let metrics = keyed_get(&proxy, "/metrics").await;
    for text in [&backends, &metrics] {
        assert!(!text.contains("secret"), "a key leaked: {text}");
    }
    assert!(
        metrics.contains(r#"corral_tenant_queue_depth{tenant="key-2"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"corral_tenant_in_flight{tenant="alice"} 1"#),
        "{metrics}"
    );
    holder.abort();
    let r = waiter.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
}

/// GETs `path` with alice's key, as text.
async fn keyed_get(proxy: &common::TestProxy, path: &str) -> String {
    proxy
        .client
        .get(proxy.at(path))
        .bearer_auth("alice-secret-1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_tenant_cap_refuses_that_tenant_only_with_a_retry_after() {
    let fleet = TestFleet::uniform(1, slow(20, 5)).await;
    let proxy = start_proxy(&fleet, |a| a.max_queue_per_tenant = Some(1)).await;
    let _holder = hold_slot(&proxy).await;
    let body = generate("llama3.2", "hi", false);
    let _first = spawn_post(
        &proxy,
        "/api/generate",
        body.clone(),
        &[("x-corral-tenant", "a")],
    );
    wait_waiting(&proxy, 1).await;
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .header("x-corral-tenant", "a")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("MAX_QUEUE_PER_TENANT"),
        "{v}"
    );
    let _other = spawn_post(&proxy, "/api/generate", body, &[("x-corral-tenant", "b")]);
    wait_waiting(&proxy, 2).await;
}

#[tokio::test]
async fn bad_tenant_and_priority_headers_get_400() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let body = generate("llama3.2", "hi", false);
    for (name, value) in [
        ("x-corral-priority", "urgent"),
        ("x-corral-tenant", "has space"),
        ("x-corral-tenant", ""),
    ] {
        let r = proxy
            .client
            .post(proxy.at("/api/generate"))
            .header(name, value)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{name}: {value}");
    }
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .header("x-corral-priority", "Batch")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_tenant_label_is_bounded_to_configured_names() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| {
        a.tenant_weights = corral::config::tenancy::parse_weights("team-a=2").unwrap();
    })
    .await;
    for tenant in ["team-a", "random-1", "random-2"] {
        let r = proxy
            .client
            .post(proxy.at("/api/generate"))
            .header("x-corral-tenant", tenant)
            .json(&generate("llama3.2", "hi", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let metrics = proxy.metrics().await;
    let labels: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("corral_tenant_queue_wait_seconds_count"))
        .collect();
    assert_eq!(labels.len(), 2, "{labels:?}");
    assert!(
        labels
            .iter()
            .any(|l| l.contains(r#"tenant="team-a""#) && l.ends_with(" 1"))
    );
    assert!(
        labels
            .iter()
            .any(|l| l.contains(r#"tenant="other""#) && l.ends_with(" 2"))
    );
}

#[tokio::test]
async fn a_retried_request_waits_at_its_first_place_not_at_the_back() {
    // G has llama3.2 and qwen (20 ms a token), held for 3 s by a long
    // answer; F, started later, has only llama3.2 and fails every request.
    // Only the first request (llama3.2) can go to F: it fails there and
    // must wait for G again, while three later requests (qwen) wait too.
    let mut good = slow(20, 5);
    good.models = vec![ModelSpec::named("llama3.2"), ModelSpec::named("qwen")];
    let mut fleet = TestFleet::start(vec![good], 1).await;
    let proxy = start_proxy(&fleet, |a| a.max_retries = 3).await;
    let long = serde_json::json!({"model": "qwen", "prompt": "hold", "stream": false,
        "options": {"num_predict": 150}});
    let holder = spawn_post(&proxy, "/api/generate", long, &[("x-corral-tenant", "h")]);
    eventually(
        Duration::from_secs(5),
        "the holder has the slot",
        || async { common::in_flight(&proxy).await == 1 },
    )
    .await;
    let done = Arc::new(Mutex::new(Vec::new()));
    let send = |name: &'static str, model: &str| {
        let request = proxy
            .client
            .post(proxy.at("/api/generate"))
            .header("x-corral-tenant", "t")
            .json(&generate(model, name, false));
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200, "{name}");
            let attempts = r.headers()["x-corral-attempts"]
                .to_str()
                .unwrap()
                .to_string();
            done.lock().unwrap().push((name, attempts));
        })
    };
    let mut tasks = vec![send("first", "llama3.2")];
    wait_waiting(&proxy, 1).await;
    // Each one waiting before the next is sent: they queue in this order.
    for (waiting, name) in (2..).zip(["second", "third", "fourth"]) {
        tasks.push(send(name, "qwen"));
        wait_waiting(&proxy, waiting).await;
    }
    let mut failing = common::failing();
    failing.models = vec![ModelSpec::named("llama3.2")];
    fleet.start_spare(failing).await;
    eventually(
        Duration::from_secs(10),
        "the first request was retried",
        || async {
            let text = proxy.metrics().await;
            text.lines()
                .any(|l| l.starts_with("corral_retries_total ") && !l.ends_with(" 0"))
        },
    )
    .await;
    assert_eq!(holder.response().await.status(), 200);
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    assert_eq!(
        order[0],
        ("first", "2".to_string()),
        "the retry kept its place: {order:?}"
    );
    let rest: Vec<&str> = order[1..].iter().map(|(n, _)| *n).collect();
    assert_eq!(rest, ["second", "third", "fourth"]);
}
