//! What a request leaves behind for an operator: the Prometheus series of
//! `GET /metrics` before and after traffic (requests, durations, queue,
//! rejections, per-backend gauges and counters, retries, tokens), the retiring
//! of a vanished backend's series, the `X-Corral-*` and `X-Request-Id`
//! headers, and the JSON request log of the binary.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestFleet, TestProxy, bind_block, eventually, generate, hold_slot, start_proxy};
use corral::sim::{FaultSpec, ServerSpec};
use serde_json::{Value, json};

const SECS: Duration = Duration::from_secs(10);

/// A backend that reports a generation speed (the sim's `eval_duration` is
/// zero when tokens come at once).
fn spec() -> ServerSpec {
    ServerSpec {
        token_interval: Duration::from_millis(1),
        tokens: 8,
        ..ServerSpec::default()
    }
}

/// The exposition text of `/metrics`.
async fn scrape(proxy: &TestProxy) -> String {
    let r = proxy.client.get(proxy.at("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The value of the sample `name{labels...}` (the labels given must match;
/// others may be present), or None.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse().ok()).flatten()
        })
}

/// `sample`, 0 when absent: a counter that has not moved yet.
fn count(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

/// Waits until the metric (scraped anew each time) satisfies `check`.
async fn until_metric(
    proxy: &TestProxy,
    what: &str,
    name: &str,
    labels: &[(&str, &str)],
    check: impl Fn(f64) -> bool,
) {
    eventually(SECS, what, || async {
        check(count(&scrape(proxy).await, name, labels))
    })
    .await;
}

fn port_label(port: u16) -> String {
    port.to_string()
}

#[tokio::test]
async fn a_native_generate_moves_requests_durations_queue_and_token_series() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let backend = port_label(fleet.port_start);
    let before = scrape(&proxy).await;
    let req = [
        ("endpoint", "/api/generate"),
        ("model", "llama3.2:latest"),
        ("status", "200"),
    ];
    let ep = [("endpoint", "/api/generate")];
    let tin = [("model", "llama3.2:latest"), ("direction", "in")];
    let tout = [("model", "llama3.2:latest"), ("direction", "out")];

    let r = proxy
        .post("/api/generate", generate("llama3.2", "count me", false))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let prompt = body["prompt_eval_count"].as_f64().unwrap();
    let out = body["eval_count"].as_f64().unwrap();
    assert!(prompt > 0.0 && out > 0.0, "{body}");

    let name = "corral_requests_total";
    let was = count(&before, name, &req);
    until_metric(&proxy, "the request is counted", name, &req, |v| {
        v == was + 1.0
    })
    .await;
    let after = scrape(&proxy).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        count(&after, name, labels) - count(&before, name, labels)
    };
    assert_eq!(moved("corral_request_duration_seconds_count", &ep), 1.0);
    assert!(moved("corral_request_duration_seconds_sum", &ep) > 0.0);
    assert_eq!(moved("corral_time_to_first_byte_seconds_count", &ep), 1.0);
    assert_eq!(moved("corral_queue_wait_seconds_count", &[]), 1.0);
    assert_eq!(
        moved("corral_backend_requests_total", &[("backend", &backend)]),
        1.0
    );
    assert_eq!(moved("corral_tokens_total", &tin), prompt);
    assert_eq!(moved("corral_tokens_total", &tout), out);
    assert_eq!(
        moved(
            "corral_tokens_per_second_count",
            &[("model", "llama3.2:latest")]
        ),
        1.0
    );
    assert_eq!(moved("corral_retries_total", &[]), 0.0);
    assert_eq!(sample(&after, "corral_queue_depth", &[]), Some(0.0));
}

#[tokio::test]
async fn tokens_are_counted_from_native_streams_and_v1_usage() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let tout = [("model", "llama3.2:latest"), ("direction", "out")];
    let tin = [("model", "llama3.2:latest"), ("direction", "in")];

    // Each case: path, body, and how to read (prompt, generated) from the answer.
    let chat = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi there"}]});
    let cases: Vec<(&str, Value)> = vec![
        (
            "/api/chat",
            json!({"stream": true, "model": "llama3.2", "messages": chat["messages"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": chat["messages"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": chat["messages"], "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.2", "prompt": "once upon"}),
        ),
    ];
    for (path, body) in cases {
        let before = scrape(&proxy).await;
        let text = proxy.post(path, body.clone()).await.text().await.unwrap();
        // The last counts in the answer, whichever framing it has.
        let last = |key: &str| -> f64 {
            let at = text.rfind(key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len();
            text[at..]
                .trim_start_matches([':', ' '])
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        };
        let (prompt, out) = if path.starts_with("/v1") {
            (last("\"prompt_tokens\""), last("\"completion_tokens\""))
        } else {
            (last("\"prompt_eval_count\""), last("\"eval_count\""))
        };
        assert!(prompt > 0.0 && out > 0.0, "{path} {body}: {text}");
        let was_in = count(&before, "corral_tokens_total", &tin);
        let was_out = count(&before, "corral_tokens_total", &tout);
        until_metric(
            &proxy,
            &format!("{path} {body}: generated tokens counted"),
            "corral_tokens_total",
            &tout,
            |v| v == was_out + out,
        )
        .await;
        let after = scrape(&proxy).await;
        assert_eq!(
            count(&after, "corral_tokens_total", &tin),
            was_in + prompt,
            "{path} {body}: prompt tokens"
        );
    }
}

#[tokio::test]
async fn refusals_are_counted_by_reason_and_status() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |a| {
        a.max_queue = 1;
        a.queue_timeout = Duration::from_secs(1);
    })
    .await;
    let before = scrape(&proxy).await;
    let r = proxy
        .post("/api/generate", generate("ghost", "x", false))
        .await;
    assert_eq!(r.status(), 404);

    // One slot held: the next request waits and times out; with it waiting,
    // one more finds the queue full.
    let _held = hold_slot(&proxy).await;
    let waiter = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "wait", false),
        &[],
    );
    until_metric(
        &proxy,
        "one request waits",
        "corral_queue_depth",
        &[],
        |v| v == 1.0,
    )
    .await;
    let full = proxy
        .post("/api/generate", generate("llama3.2", "full", false))
        .await;
    assert_eq!(full.status(), 503);
    assert_eq!(waiter.response().await.status(), 503);

    let after = scrape(&proxy).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        count(&after, name, labels) - count(&before, name, labels)
    };
    for reason in ["unknown_model", "queue_full", "queue_timeout"] {
        assert_eq!(
            moved("corral_queue_rejections_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        moved(
            "corral_requests_total",
            &[
                ("endpoint", "/api/generate"),
                ("model", "unknown"),
                ("status", "404")
            ]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "corral_requests_total",
            &[
                ("endpoint", "/api/generate"),
                ("model", "llama3.2:latest"),
                ("status", "503")
            ]
        ),
        2.0
    );
    assert_eq!(sample(&after, "corral_queue_depth", &[]), Some(0.0));
}

#[tokio::test]
async fn queue_depth_and_wait_show_a_request_that_waited() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let before = scrape(&proxy).await;
    let held = hold_slot(&proxy).await;
    let waiter = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "wait", false),
        &[],
    );
    until_metric(
        &proxy,
        "one request waits",
        "corral_queue_depth",
        &[],
        |v| v == 1.0,
    )
    .await;
    // Also shown as in flight on the backend that is held.
    let now = scrape(&proxy).await;
    let backend = port_label(fleet.port_start);
    assert_eq!(
        sample(&now, "corral_backend_in_flight", &[("backend", &backend)]),
        Some(1.0)
    );
    drop(held);
    let r = waiter.response().await;
    assert_eq!(r.status(), 200);
    let queue_ms: u64 = r.headers()["x-corral-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let after = scrape(&proxy).await;
    assert_eq!(sample(&after, "corral_queue_depth", &[]), Some(0.0));
    let waited = count(&after, "corral_queue_wait_seconds_sum", &[])
        - count(&before, "corral_queue_wait_seconds_sum", &[]);
    assert!(
        waited * 1000.0 >= queue_ms as f64 - 1.0 && waited > 0.0,
        "waited {waited}s, header {queue_ms} ms"
    );
}

#[tokio::test]
async fn failures_and_retries_are_counted_per_backend_and_kind() {
    // Tokens 30 ms apart: the reset below comes well after the first byte
    // reached corral (a reset right behind it can discard it in the kernel).
    let paced = ServerSpec {
        token_interval: Duration::from_millis(30),
        ..spec()
    };
    let fleet = TestFleet::uniform(2, paced).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let (first, second) = (port_label(fleet.port_start), port_label(fleet.port_end));
    fleet.servers[0].set_faults(FaultSpec {
        error_rate: 1.0,
        ..FaultSpec::default()
    });
    let before = scrape(&proxy).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "retry me", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], second.as_str());
    assert_eq!(r.headers()["x-corral-attempts"], "2");
    let after = scrape(&proxy).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        count(&after, name, labels) - count(&before, name, labels)
    };
    assert_eq!(
        moved(
            "corral_backend_failures_total",
            &[("backend", &first), ("kind", "status_5xx")]
        ),
        1.0
    );
    assert_eq!(moved("corral_retries_total", &[]), 1.0);
    assert_eq!(
        moved("corral_backend_requests_total", &[("backend", &first)]),
        1.0
    );
    assert_eq!(
        moved("corral_backend_requests_total", &[("backend", &second)]),
        1.0
    );

    // A stream that breaks after its first byte counts as mid_stream.
    fleet.servers[0].set_faults(FaultSpec::default());
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .header("x-sim-fault", "reset")
        .json(&generate("llama3.2", "break", true))
        .send()
        .await
        .unwrap();
    let broke_on = r.headers()["x-corral-backend"].to_str().unwrap().to_owned();
    let _ = r.text().await;
    until_metric(
        &proxy,
        "the broken stream is counted",
        "corral_backend_failures_total",
        &[("backend", &broke_on), ("kind", "mid_stream")],
        |v| v == 1.0,
    )
    .await;
    let last = scrape(&proxy).await;
    assert_eq!(
        count(
            &last,
            "corral_stream_errors_total",
            &[("endpoint", "/api/generate")]
        ),
        1.0
    );
}

#[tokio::test]
async fn backend_gauges_follow_health_and_probes_are_timed() {
    let fleet = TestFleet::uniform(2, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let text = scrape(&proxy).await;
    for port in fleet.port_start..=fleet.port_end {
        let b = port_label(port);
        assert_eq!(
            sample(&text, "corral_backend_healthy", &[("backend", &b)]),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "corral_backend_in_flight", &[("backend", &b)]),
            Some(0.0)
        );
        let probe = sample(&text, "corral_backend_probe_seconds", &[("backend", &b)])
            .expect("probe latency exported");
        assert!(probe > 0.0 && probe < 1.0, "{probe}");
    }
    fleet.servers[1].kill().await;
    let b = port_label(fleet.port_end);
    until_metric(
        &proxy,
        "the killed backend shows unhealthy",
        "corral_backend_healthy",
        &[("backend", &b)],
        |v| v == 0.0,
    )
    .await;
}

#[tokio::test]
async fn a_vanished_backend_series_are_retired() {
    let fleet = TestFleet::uniform(2, spec()).await;
    let proxy = start_proxy(&fleet, |a| a.scan_interval = Duration::from_millis(50)).await;
    // The second backend gets traffic and a failure, so it has counters too.
    fleet.servers[0].set_faults(FaultSpec {
        error_rate: 1.0,
        ..FaultSpec::default()
    });
    let r = proxy
        .post("/api/generate", generate("llama3.2", "x", false))
        .await;
    assert_eq!(r.status(), 200);
    fleet.servers[0].set_faults(FaultSpec::default());
    let gone = format!("backend=\"{}\"", fleet.port_start);
    let kept = format!("backend=\"{}\"", fleet.port_end);
    let text = scrape(&proxy).await;
    assert!(text.contains(&gone) && text.contains(&kept), "{text}");

    fleet.servers[0].kill().await;
    eventually(SECS, "the forgotten backend's series are gone", || async {
        !scrape(&proxy).await.contains(&gone)
    })
    .await;
    let text = scrape(&proxy).await;
    assert!(text.contains(&kept), "{text}");
    let rows = proxy.get_json("/__proxy/backends").await;
    assert_eq!(rows["backends"].as_array().unwrap().len(), 1, "{rows}");
}

#[tokio::test]
async fn routed_responses_name_backend_attempts_and_queue_time() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-corral-backend"], fleet.port_start.to_string().as_str());
    assert_eq!(h["x-corral-attempts"], "1");
    let queue_ms: u64 = h["x-corral-queue-ms"].to_str().unwrap().parse().unwrap();
    assert!(queue_ms < 1000, "{queue_ms}");
    let id = h["x-request-id"].to_str().unwrap();
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );

    // A client's id comes back as it was; refusals carry one too.
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .header("x-request-id", "batch-7/item-42")
        .json(&generate("ghost", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "batch-7/item-42");
    assert!(!r.headers().contains_key("x-corral-backend"));

    // A plain (Content-Length) answer counts as served once its last byte went out.
    eventually(SECS, "the backend counts one request served", || async {
        proxy.get_json("/__proxy/backends").await["backends"][0]["requests_served"] == 1
    })
    .await;
}

/// A one-model backend that answers `/api/generate` with the `X-Request-Id`
/// it received: the simulator does not echo headers.
async fn start_echo_backend() -> (u16, tokio::task::JoinHandle<()>) {
    use axum::routing::{get, post};
    let listener = bind_block(1).await.remove(0);
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route(
            "/api/tags",
            get(|| async {
                axum::Json(json!({"models": [{"name": "echo:latest", "model": "echo:latest"}]}))
            }),
        )
        .route(
            "/api/generate",
            post(|headers: http::HeaderMap| async move {
                let id = headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                axum::Json(json!({"model": "echo", "response": id, "done": true}))
            }),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

#[tokio::test]
async fn the_request_id_reaches_the_backend() {
    let (port, task) = start_echo_backend().await;
    let fleet = TestFleet {
        servers: Vec::new(),
        spare: Vec::new(),
        port_start: port,
        port_end: port,
    };
    let proxy = start_proxy(&fleet, |_| {}).await;
    proxy.wait_healthy(1).await;
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .header("x-request-id", "from-the-client")
        .json(&generate("echo", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["response"], "from-the-client");

    // Without one, the backend gets the id the client gets back.
    let r = proxy
        .post("/api/generate", generate("echo", "hi", false))
        .await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["response"], id.as_str());
    task.abort();
}

#[tokio::test]
async fn the_binary_logs_one_json_line_per_request() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let mut command = common::child::corral();
    command
        .env("BACKEND_PORT_START", fleet.port_start.to_string())
        .env("BACKEND_PORT_END", fleet.port_end.to_string())
        .env("SCAN_INTERVAL_SECONDS", "0.2");
    let mut served = common::child::spawn(command).await;
    let lines = Arc::clone(&served.lines);
    let client = reqwest::Client::new();
    let url = served.url.clone();
    common::wait_healthy_at(&url, 1).await;
    for (model, id) in [("llama3.2", "ok-1"), ("ghost", "refused-1")] {
        let r = client
            .post(format!("{url}/api/generate"))
            .header("x-request-id", id)
            .header("x-corral-tenant", "team-log")
            .json(&generate(model, "log me", false))
            .send()
            .await
            .unwrap();
        let _ = r.text().await;
    }
    // Anthropic and Responses answers: their usage gives the token counts,
    // and a Responses stream that ends without `response.completed` is
    // logged as broken.
    let messages = serde_json::json!({"model": "llama3.2", "max_tokens": 8,
        "messages": [{"role": "user", "content": "log me"}]});
    let cut = serde_json::json!({"model": "llama3.2", "input": "cut", "stream": true});
    for (path, id, body, fault) in [
        ("/v1/messages", "messages-1", messages, ""),
        ("/v1/responses", "cut-1", cut, "mid_stream_error"),
    ] {
        let mut request = client
            .post(format!("{url}{path}"))
            .header("x-request-id", id)
            .json(&body);
        if !fault.is_empty() {
            request = request.header("x-sim-fault", fault);
        }
        let _ = request.send().await.unwrap().text().await;
    }
    let find = |id: &str| -> Option<Value> {
        lines.lock().unwrap().iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["request_id"] == id).then_some(v)
        })
    };
    eventually(SECS, "both lines are logged", || async {
        ["ok-1", "refused-1", "messages-1", "cut-1"]
            .iter()
            .all(|id| find(id).is_some())
    })
    .await;
    served.kill();
    // Every line is JSON.
    for l in lines.lock().unwrap().iter() {
        assert!(serde_json::from_str::<Value>(l).is_ok(), "not JSON: {l}");
    }
    let done = find("ok-1").unwrap();
    assert_eq!(done["message"], "request done", "{done}");
    assert_eq!(done["level"], "INFO", "{done}");
    assert_eq!(done["method"], "POST");
    assert_eq!(done["path"], "/api/generate");
    assert_eq!(done["model"], "llama3.2:latest");
    assert_eq!(done["backend"], fleet.port_start.to_string().as_str());
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["tenant"], "team-log", "{done}");
    assert_eq!(done["failed"], "", "{done}");
    assert_eq!(done["status"], 200);
    assert_eq!(done["outcome"], "complete");
    assert!(done["tokens_out"].as_u64().unwrap() > 0, "{done}");
    assert!(done["tokens_in"].as_u64().unwrap() > 0, "{done}");
    assert!(
        done["duration_ms"].is_u64()
            && done["queue_wait_ms"].is_u64()
            && done["first_byte_ms"].is_u64()
            && done["first_byte_ms"].as_u64() <= done["duration_ms"].as_u64(),
        "{done}"
    );
    let refused = find("refused-1").unwrap();
    assert_eq!(refused["message"], "request refused", "{refused}");
    assert_eq!(refused["status"], 404);
    assert_eq!(refused["tenant"], "team-log", "{refused}");
    let messages = find("messages-1").unwrap();
    assert_eq!(messages["path"], "/v1/messages");
    // Without a tenant header, the tenant is the client's address.
    assert_eq!(messages["tenant"], "127.0.0.1", "{messages}");
    assert_eq!(messages["outcome"], "complete", "{messages}");
    assert_eq!(messages["tokens_out"], 8, "{messages}");
    assert!(messages["tokens_in"].as_u64().unwrap() > 0, "{messages}");
    let cut = find("cut-1").unwrap();
    assert_eq!(cut["path"], "/v1/responses");
    assert_eq!(cut["status"], 200);
    assert_eq!(cut["outcome"], "broken", "{cut}");
}
