//! The proxy core against simulated backends: discovery and health,
//! selection order, forwarding, retries and the retry bound, the wait queue
//! (order, timeout, overflow, clients that leave), and the ollama_proxy
//! debug endpoints.

mod common;

use common::backend_of;

use std::time::Duration;

use common::{TestFleet, eventually, generate, hold_slot, start_proxy, unhung};
use corral::sim::{FaultSpec, ServerSpec, expected_text};
use serde_json::json;

fn spec() -> ServerSpec {
    ServerSpec::default()
}

#[tokio::test]
async fn health_and_backends_list_the_fleet_sorted_by_port() {
    let fleet = TestFleet::uniform(3, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    assert_eq!(
        proxy.get_json("/__proxy/health").await,
        json!({"status": "ok", "healthy_backends": 3})
    );
    let backends = proxy.get_json("/__proxy/backends").await;
    let rows = backends["backends"].as_array().unwrap();
    let ports: Vec<u64> = rows.iter().map(|b| b["port"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (fleet.port_start..=fleet.port_end).map(u64::from).collect();
    assert_eq!(ports, expected);
    for row in rows {
        assert_eq!(row["healthy"], true);
        assert_eq!(row["in_flight"], 0);
        assert_eq!(
            row["models"],
            json!(["llama3.2:latest", "all-minilm:latest"])
        );
    }
}

#[tokio::test]
async fn generate_is_answered_by_a_backend_and_names_it() {
    let fleet = TestFleet::uniform(2, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post(
            "/api/generate",
            generate("llama3.2", "why is the sky blue", false),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), fleet.port_start, "idle fleet: lowest port");
    assert!(r.headers().contains_key("x-request-id"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["response"],
        expected_text(0, "llama3.2", "why is the sky blue", 16)
    );
    assert_eq!(body["model"], "llama3.2", "model echoed verbatim");
    assert_eq!(body["done"], true);
}

/// The accept loop peeks at a connection's first bytes: HTTP/2's preface
/// (h2c with prior knowledge) goes to hyper-util's auto builder, everything
/// else straight to hyper's HTTP/1 server. Both are served.
#[tokio::test]
async fn h2c_and_http1_clients_are_both_served() {
    use http_body_util::BodyExt;

    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let tcp = tokio::net::TcpStream::connect(proxy.handle.addr)
        .await
        .unwrap();
    let (mut send, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(connection);
    let body = generate("llama3.2", "why is the sky blue", false).to_string();
    let request = http::Request::post(format!("{}/api/generate", proxy.url))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let r = send.send_request(request).await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["response"],
        expected_text(0, "llama3.2", "why is the sky blue", 16)
    );
    drop(send);
    driver.abort();

    let r = proxy
        .post(
            "/api/generate",
            generate("llama3.2", "why is the sky blue", false),
        )
        .await;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn least_in_flight_wins_and_ties_go_to_the_lowest_port() {
    // The model loaded everywhere, so that only load and port decide.
    let fleet = TestFleet::uniform(
        3,
        ServerSpec {
            loaded: vec!["llama3.2".into()],
            parallel: 2,
            ..common::slow(500, 10)
        },
    )
    .await;
    let proxy = start_proxy(&fleet, |a| a.max_concurrent_per_backend = 2).await;
    // Streams hold their slot while open: each new one goes to the least busy,
    // lowest port first.
    let mut held = Vec::new();
    let mut order = Vec::new();
    for i in 0..6 {
        let r = proxy
            .post(
                "/api/generate",
                generate("llama3.2", &format!("p{i}"), true),
            )
            .await;
        order.push(backend_of(&r) - fleet.port_start);
        held.push(r);
    }
    assert_eq!(order, [0, 1, 2, 0, 1, 2]);
}

#[tokio::test]
async fn unknown_model_is_404_at_once() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post("/api/generate", generate("ghost", "hi", false))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"error": "model 'ghost' not found"})
    );
    assert_eq!(
        fleet.servers[0].stats().requests.get("/api/generate"),
        None,
        "never reached a backend"
    );
}

#[tokio::test]
async fn a_backend_4xx_is_passed_through_without_retry_or_health_change() {
    let fleet = TestFleet::uniform(2, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    // all-minilm is embedding-only: the backend answers 400.
    let r = proxy
        .post("/api/generate", generate("all-minilm", "hi", false))
        .await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "\"all-minilm\" does not support generate");
    let total: u64 = fleet
        .servers
        .iter()
        .map(|s| {
            s.stats()
                .requests
                .get("/api/generate")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(total, 1, "no retry");
    assert_eq!(proxy.healthy().await, 2);
}

#[tokio::test]
async fn a_dead_backend_is_marked_unhealthy_at_once_and_the_request_served_elsewhere() {
    let fleet = TestFleet::uniform(2, spec()).await;
    // Scans far apart: only the failed request can mark the backend.
    let proxy = start_proxy(&fleet, |a| a.scan_interval = Duration::from_secs(600)).await;
    fleet.servers[0].kill().await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), fleet.port_start + 1);
    assert_eq!(r.headers()["x-corral-attempts"], "2");
    let rows = proxy.get_json("/__proxy/backends").await;
    assert_eq!(rows["backends"][0]["healthy"], false);
    assert!(
        rows["backends"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("connect")
    );
    // Back up, but not re-enabled until a probe says so: nothing goes to it.
    fleet.servers[0].restart(spec()).await.unwrap();
    for _ in 0..5 {
        let r = proxy
            .post("/api/generate", generate("llama3.2", "again", false))
            .await;
        assert_eq!(backend_of(&r), fleet.port_start + 1);
    }
    assert_eq!(fleet.servers[0].stats().requests.get("/api/generate"), None);
}

#[tokio::test]
async fn a_backend_comes_back_through_a_later_scan() {
    let fleet = TestFleet::uniform(2, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    fleet.servers[0].kill().await;
    proxy.wait_healthy(1).await;
    fleet.servers[0].restart(spec()).await.unwrap();
    proxy.wait_healthy(2).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(backend_of(&r), fleet.port_start);
}

#[tokio::test]
async fn retries_are_bounded_and_never_repeat_a_backend() {
    let failing = common::failing();
    let fleet = TestFleet::uniform(4, failing).await;
    let proxy = start_proxy(&fleet, |a| {
        a.max_retries = 2;
        a.scan_interval = Duration::from_secs(600);
    })
    .await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("all attempts failed"),
        "{body}"
    );
    let per_backend: Vec<u64> = fleet
        .servers
        .iter()
        .map(|s| {
            s.stats()
                .requests
                .get("/api/generate")
                .copied()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(
        per_backend,
        [1, 1, 1, 0],
        "three attempts, lowest ports, none twice"
    );
}

#[tokio::test]
async fn no_untried_backend_left_is_502_at_once() {
    let failing = common::failing();
    let fleet = TestFleet::uniform(1, failing).await;
    // Waiting in the queue for its timeout would outlast the hang guard.
    let proxy = start_proxy(&fleet, |a| {
        a.max_retries = 5;
        a.queue_timeout = Duration::from_secs(3600);
    })
    .await;
    let r = unhung(
        "answered without waiting for the queue timeout",
        proxy.post("/api/generate", generate("llama3.2", "hi", false)),
    )
    .await;
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn a_backend_dying_mid_request_is_retried_elsewhere() {
    let hangs = ServerSpec {
        faults: FaultSpec {
            hang_rate: 1.0,
            ..FaultSpec::default()
        },
        ..spec()
    };
    let fleet = TestFleet::start(vec![hangs, spec()], 0).await;
    let proxy = start_proxy(&fleet, |a| a.scan_interval = Duration::from_secs(600)).await;
    let victim = fleet.servers[0].clone();
    let request = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "hi", false),
        &[],
    );
    eventually(
        Duration::from_secs(5),
        "the request reached the victim",
        || async { victim.stats().in_flight == 1 },
    )
    .await;
    victim.kill().await;
    let r = request.response().await;
    let status = r.status();
    let backend = r.headers().get("x-corral-backend").cloned();
    assert_eq!(status, 200, "{:?}", r.text().await);
    assert_eq!(backend.unwrap(), &(fleet.port_start + 1).to_string());
}

#[tokio::test]
async fn the_queue_is_first_come_first_served() {
    let fleet = TestFleet::uniform(1, common::slow(20, 10)).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let finished = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (client, url, finished) = (
            proxy.client.clone(),
            proxy.at("/api/generate"),
            finished.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&generate("llama3.2", &format!("p{i}"), false))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            finished.lock().unwrap().push(i);
        }));
        // Each request is queued (or running) before the next one is sent.
        eventually(Duration::from_secs(5), "request admitted", || async {
            let v = proxy.get_json("/__proxy/backends").await;
            v["queue"]["waiting"].as_u64().unwrap()
                + v["backends"][0]["in_flight"].as_u64().unwrap()
                == i + 1
        })
        .await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*finished.lock().unwrap(), [0, 1, 2, 3, 4]);
    assert_eq!(fleet.servers[0].stats().concurrent_peak, 1);
}

#[tokio::test]
async fn a_queue_timeout_is_503_with_retry_after() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |a| a.queue_timeout = Duration::from_millis(300)).await;
    let _holder = hold_slot(&proxy).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn a_full_queue_is_503_at_once() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |a| a.max_queue = 1).await;
    let _holder = hold_slot(&proxy).await;
    let waiter = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "w", false),
        &[],
    );
    common::wait_waiting(&proxy, 1).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.text().await.unwrap().contains("MAX_QUEUE"));
    drop(waiter);
}

#[tokio::test]
async fn a_waiter_whose_client_leaves_never_reaches_a_backend() {
    let fleet = TestFleet::uniform(1, common::slow(30, 10)).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let holder = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "first", false),
        &[],
    );
    eventually(Duration::from_secs(5), "holder running", || async {
        fleet.servers[0].stats().in_flight == 1
    })
    .await;
    let impatient = proxy
        .client
        .post(proxy.at("/api/generate"))
        .timeout(Duration::from_millis(100))
        .json(&generate("llama3.2", "impatient", false))
        .send()
        .await;
    assert!(impatient.is_err(), "the client gave up");
    common::wait_waiting(&proxy, 0).await;
    assert_eq!(holder.response().await.status(), 200);
    let r = proxy
        .post("/api/generate", generate("llama3.2", "after", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        fleet.servers[0].stats().requests["/api/generate"],
        2,
        "first and after, never impatient"
    );
}

#[tokio::test]
async fn a_model_on_no_healthy_backend_waits_for_one_to_come() {
    let mut fleet = TestFleet::start(vec![spec()], 1).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let mistral = ServerSpec {
        models: vec![corral::sim::ModelSpec::named("mistral")],
        ..spec()
    };
    // mistral is listed once, then its backend dies: requests for it wait.
    let server = fleet.start_spare(mistral.clone()).await;
    proxy.wait_healthy(2).await;
    server.kill().await;
    proxy.wait_healthy(1).await;
    let waiting = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("mistral", "hi", false),
        &[],
    );
    common::wait_waiting(&proxy, 1).await;
    server.restart(mistral).await.unwrap();
    let r = waiting.response().await;
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), server.port());
}

#[tokio::test]
async fn reject_streaming_refuses_streams_and_defaults_stream_to_false() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |a| a.reject_streaming = true).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", true))
        .await;
    assert_eq!(r.status(), 400);
    let r = proxy
        .post(
            "/api/generate",
            json!({"model": "llama3.2", "prompt": "hi"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["response"], expected_text(0, "llama3.2", "hi", 16));
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |a| a.max_body_bytes = 1000).await;
    let send = |path: &'static str, body: Vec<u8>| {
        let req = proxy
            .client
            .post(proxy.at(path))
            .header("content-type", "application/json")
            .body(body);
        async move { req.send().await.unwrap() }
    };
    let r = send("/api/generate", b"{\"model\": ".to_vec()).await;
    assert_eq!(r.status(), 400);
    assert!(
        r.json::<serde_json::Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );
    let r = send("/api/generate", br#"{"model": 7}"#.to_vec()).await;
    assert_eq!(r.status(), 400);
    let r = send("/api/generate", vec![b' '; 2000]).await;
    assert_eq!(r.status(), 413);
    let r = send("/v1/chat/completions", vec![b' '; 2000]).await;
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    for path in [
        "/api/pull",
        "/api/delete",
        "/api/create",
        "/api/copy",
        "/api/push",
        "/api/blobs/sha256:00",
    ] {
        let r = send(path, br#"{"model":"llama3.2"}"#.to_vec()).await;
        assert_eq!(r.status(), 403, "{path}");
    }
    assert_eq!(fleet.servers[0].stats().requests.get("/api/generate"), None);
}
