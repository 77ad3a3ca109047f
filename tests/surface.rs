//! The whole Ollama surface through corral: every routed endpoint streaming
//! and not, the fleet-wide views, model-aware routing over a mixed fleet,
//! streams that break, and cancellation when the client goes away.

mod common;

use common::backend_of;

use std::time::Duration;

use common::{TestFleet, eventually, generate, in_flight, start_proxy};
use corral::sim::{FaultSpec, ModelSpec, ServerSpec, SimServer, expected_embedding, expected_text};
use futures_util::StreamExt;
use serde_json::{Value, json};

fn spec() -> ServerSpec {
    ServerSpec::default()
}

fn with_models(models: &[&str], loaded: &[&str]) -> ServerSpec {
    ServerSpec {
        models: models.iter().map(|m| ModelSpec::named(m)).collect(),
        loaded: loaded.iter().map(|m| m.to_string()).collect(),
        ..spec()
    }
}

/// A backend that sends a few tokens, then resets the connection.
fn resetting() -> ServerSpec {
    let faults = FaultSpec {
        reset_rate: 1.0,
        ..FaultSpec::default()
    };
    ServerSpec {
        token_interval: Duration::from_millis(20),
        faults,
        ..spec()
    }
}

fn chat(model: &str, content: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]})
}

/// Reads a streamed body whole.
async fn read_stream(r: reqwest::Response) -> String {
    read_stream_from(r, None).await.0
}

/// Reads a streamed body served by `backend`, noting whether the backend
/// was still generating when the first chunk arrived.
async fn read_stream_from(
    r: reqwest::Response,
    backend: Option<&SimServer>,
) -> (String, Option<bool>) {
    let mut generating_at_first = None;
    let mut text = String::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        if let Some(b) = backend {
            generating_at_first.get_or_insert_with(|| {
                let st = b.stats();
                st.in_flight == 1 && st.completed == 0
            });
        }
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    (text, generating_at_first)
}

#[tokio::test]
async fn every_routed_endpoint_answers_through_corral() {
    let fleet = TestFleet::uniform(2, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let text = |input: &str| expected_text(0, "llama3.2", input, 16);

    let v: Value = proxy
        .post_json("/api/generate", generate("llama3.2", "g", false))
        .await;
    assert_eq!(v["response"], text("g"));
    let v: Value = proxy
        .post_json("/api/chat", chat("llama3.2", "c", false))
        .await;
    assert_eq!(v["message"]["content"], text("c"));
    assert_eq!(v["message"]["role"], "assistant");
    let v: Value = proxy
        .post_json(
            "/api/embed",
            json!({"model": "all-minilm", "input": ["a", "b"]}),
        )
        .await;
    let got: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    let want: Vec<Vec<f32>> = ["a", "b"]
        .iter()
        .map(|i| expected_embedding(0, "all-minilm", i, 16))
        .collect();
    assert_eq!(got, want);
    let v: Value = proxy
        .post_json(
            "/api/embeddings",
            json!({"model": "all-minilm", "prompt": "a"}),
        )
        .await;
    assert_eq!(v["embedding"].as_array().unwrap().len(), 16);
    let v: Value = proxy
        .post_json("/api/show", json!({"model": "llama3.2"}))
        .await;
    assert!(v["model_info"].is_object());
    let v: Value = proxy
        .post_json("/api/show", json!({"name": "llama3.2"}))
        .await;
    assert!(v["model_info"].is_object(), "legacy name field routes too");
    let v: Value = proxy
        .post_json("/v1/chat/completions", chat("llama3.2", "o", false))
        .await;
    assert_eq!(v["choices"][0]["message"]["content"], text("o"));
    let v: Value = proxy
        .post_json(
            "/v1/completions",
            json!({"model": "llama3.2", "prompt": "p"}),
        )
        .await;
    assert_eq!(v["choices"][0]["text"], text("p"));
    let v: Value = proxy
        .post_json(
            "/v1/embeddings",
            json!({"model": "all-minilm", "input": "e"}),
        )
        .await;
    let got: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(got, expected_embedding(0, "all-minilm", "e", 16));
}

#[tokio::test]
async fn ndjson_streams_arrive_chunk_by_chunk_before_the_backend_finishes() {
    let slow = common::slow(100, 10);
    let fleet = TestFleet::uniform(1, slow).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post("/api/generate", json!({"model": "llama3.2", "prompt": "s"}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let (body, generating) = read_stream_from(r, Some(&fleet.servers[0])).await;
    assert_eq!(
        generating,
        Some(true),
        "the first chunk arrived while the backend was still generating"
    );
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 11, "ten tokens and the final chunk");
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    assert_eq!(text, expected_text(0, "llama3.2", "s", 10));
    assert_eq!(lines.last().unwrap()["done"], true);
    assert!(lines.last().unwrap()["eval_count"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn sse_streams_arrive_event_by_event_and_end_with_done() {
    let slow = common::slow(100, 10);
    let fleet = TestFleet::uniform(1, slow).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post("/v1/chat/completions", chat("llama3.2", "s", true))
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (body, generating) = read_stream_from(r, Some(&fleet.servers[0])).await;
    assert_eq!(
        generating,
        Some(true),
        "the first event arrived while the backend was still generating"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let text: String = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, expected_text(0, "llama3.2", "s", 10));
}

#[tokio::test]
async fn fleet_views_merge_the_healthy_backends() {
    let fleet = TestFleet::start(
        vec![
            with_models(&["llama3.2", "all-minilm"], &["llama3.2"]),
            with_models(&["mistral", "llama3.2"], &["mistral"]),
        ],
        0,
    )
    .await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let names = |v: &Value, key: &str| -> Vec<String> {
        let mut n: Vec<String> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["model"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let tags = proxy.get_json("/api/tags").await;
    assert_eq!(
        names(&tags, "models"),
        ["all-minilm:latest", "llama3.2:latest", "mistral:latest"]
    );
    let ps = proxy.get_json("/api/ps").await;
    assert_eq!(names(&ps, "models"), ["llama3.2:latest", "mistral:latest"]);
    let models = proxy.get_json("/v1/models").await;
    let mut ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["all-minilm:latest", "llama3.2:latest", "mistral:latest"]
    );
    assert_eq!(models["object"], "list");
    let one = proxy.get_json("/v1/models/mistral").await;
    assert_eq!(one["id"], "mistral");
    assert_eq!(one["object"], "model");
    let r = proxy
        .client
        .get(proxy.at("/v1/models/ghost"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        proxy.get_json("/api/version").await["version"],
        "0.33.0-rc2"
    );
    let root = proxy.client.get(proxy.at("/")).send().await.unwrap();
    assert_eq!(root.text().await.unwrap(), "Ollama is running");
    let head = proxy.client.head(proxy.at("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    // A dead backend's models leave the views.
    fleet.servers[1].kill().await;
    proxy.wait_healthy(1).await;
    let tags = proxy.get_json("/api/tags").await;
    assert_eq!(
        names(&tags, "models"),
        ["all-minilm:latest", "llama3.2:latest"]
    );
}

#[tokio::test]
async fn requests_go_only_to_backends_with_the_model_and_prefer_it_loaded() {
    let fleet = TestFleet::start(
        vec![
            with_models(&["llama3.2"], &[]),
            with_models(&["mistral"], &[]),
            with_models(&["llama3.2"], &["llama3.2"]),
        ],
        0,
    )
    .await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let (a, b, a_loaded) = (fleet.port_start, fleet.port_start + 1, fleet.port_start + 2);
    let r = proxy
        .post("/api/generate", generate("llama3.2", "x", false))
        .await;
    assert_eq!(backend_of(&r), a_loaded, "loaded beats lower port");
    let r = proxy
        .post("/api/generate", generate("mistral:latest", "x", false))
        .await;
    assert_eq!(backend_of(&r), b);
    // The loaded backend busy: the other llama3.2 backend takes the next one.
    let _held = common::hold_slot(&proxy).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "y", false))
        .await;
    assert_eq!(backend_of(&r), a);
    // Unknown on this fleet, in the OpenAI shape on /v1.
    let r = proxy
        .post("/v1/chat/completions", chat("ghost", "x", false))
        .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    assert_eq!(v["error"]["message"], "model 'ghost' not found");
}

#[tokio::test]
async fn a_queued_request_for_one_model_does_not_block_another_model() {
    let fleet = TestFleet::start(
        vec![
            with_models(&["llama3.2"], &[]),
            with_models(&["mistral"], &[]),
        ],
        0,
    )
    .await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let _held = common::hold_slot(&proxy).await;
    let _queued = common::spawn_post(
        &proxy,
        "/api/generate",
        generate("llama3.2", "queued", false),
        &[],
    );
    common::wait_waiting(&proxy, 1).await;
    let r = proxy
        .post("/api/generate", generate("mistral", "free", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), fleet.port_start + 1);
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_byte_is_retried() {
    let failing = common::failing();
    let fleet = TestFleet::start(vec![failing, spec()], 0).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post("/api/chat", chat("llama3.2", "retry me", true))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), fleet.port_start + 1);
    let body = read_stream(r).await;
    let text: String = body
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, expected_text(0, "llama3.2", "retry me", 16));
}

#[tokio::test]
async fn a_stream_broken_after_its_first_byte_ends_with_an_error_line() {
    let fleet = TestFleet::uniform(1, resetting()).await;
    let proxy = start_proxy(&fleet, |a| a.scan_interval = Duration::from_secs(600)).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "x", true))
        .await;
    assert_eq!(r.status(), 200);
    let body = read_stream(r).await;
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("failed mid-response"),
        "{body}"
    );
    assert!(
        body.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "every line is JSON"
    );
    assert_eq!(
        proxy.healthy().await,
        0,
        "the broken backend is marked unhealthy"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("corral_stream_errors_total{endpoint=\"/api/generate\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_sse_stream_broken_after_its_first_byte_ends_with_an_error_event() {
    let fleet = TestFleet::uniform(1, resetting()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .post("/v1/chat/completions", chat("llama3.2", "x", true))
        .await;
    let body = read_stream(r).await;
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    let event: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert!(
        event["error"]["message"]
            .as_str()
            .unwrap()
            .contains("failed mid-response"),
        "{body}"
    );
}

#[tokio::test]
async fn a_backend_error_line_mid_stream_passes_through() {
    let fleet = TestFleet::uniform(1, spec()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .header("x-sim-fault", "mid-stream-error")
        .json(&generate("llama3.2", "x", true))
        .send()
        .await
        .unwrap();
    let body = read_stream(r).await;
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .starts_with("an error was encountered while running the model")
    );
}

/// Waits until the backend counted a cancel and corral freed the slot.
async fn assert_cancelled(fleet: &TestFleet, proxy: &common::TestProxy, before: u64) {
    eventually(
        Duration::from_secs(5),
        "the backend counted the cancel",
        || async { fleet.servers[0].stats().cancelled > before },
    )
    .await;
    eventually(Duration::from_secs(5), "corral freed the slot", || async {
        in_flight(proxy).await == 0
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_a_non_streaming_wait_cancels_the_backend_request() {
    let slow = common::slow(200, 50);
    let fleet = TestFleet::uniform(1, slow).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .timeout(Duration::from_millis(500))
        .json(&generate("llama3.2", "x", false))
        .send()
        .await;
    assert!(r.is_err());
    assert_cancelled(&fleet, &proxy, 0).await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_the_backend_request() {
    let slow = common::slow(100, 50);
    let fleet = TestFleet::uniform(1, slow).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy.post("/api/chat", chat("llama3.2", "x", true)).await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    assert_cancelled(&fleet, &proxy, 0).await;
    assert_eq!(fleet.servers[0].stats().completed, 0);
}

#[tokio::test]
async fn a_client_leaving_the_queue_never_costs_gpu_time() {
    let slow = common::slow(100, 10);
    let fleet = TestFleet::uniform(1, slow).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let _held = common::hold_slot(&proxy).await;
    let r = proxy
        .client
        .post(proxy.at("/api/generate"))
        .timeout(Duration::from_millis(300))
        .json(&generate("llama3.2", "queued", false))
        .send()
        .await;
    assert!(r.is_err());
    common::wait_waiting(&proxy, 0).await;
    assert_eq!(
        fleet.servers[0].stats().requests["/api/generate"],
        1,
        "only the holder reached the backend"
    );
}
