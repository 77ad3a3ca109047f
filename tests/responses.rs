//! OpenAI Responses (`POST /v1/responses`): the simulator's framing and
//! per-server state (OLLAMA_API_ADDENDUM.md §5, §10), and through corral:
//! whole and streamed answers, continuations that follow the backend that
//! produced the response, the 404 when that backend is gone, zstd bodies,
//! OpenAI-shaped refusals, and a stream cut before `response.completed`.

mod common;

use std::time::Duration;

use common::{TestFleet, backend_of, eventually, sse_events, start_proxy, unhung};
use corral::sim::ServerSpec;
use serde_json::{Value, json};

fn ask(input: &str, stream: bool) -> Value {
    json!({"model": "llama3.2", "input": input, "stream": stream})
}

#[tokio::test]
async fn the_simulator_speaks_responses_and_keeps_them() {
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    let at = |i: u16| format!("http://127.0.0.1:{}/v1/responses", fleet.port_start + i);
    let client = reqwest::Client::new();
    let r = client
        .post(at(0))
        .json(&ask("hello", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with(r#"{"id":"resp_"#) && text.ends_with("}\n"),
        "{text}"
    );
    assert!(
        text.contains(r#""object":"response","created_at":"#),
        "struct order: {text}"
    );
    let whole: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(whole["status"], "completed");
    assert_eq!(whole["temperature"], 1);
    assert_eq!(whole["output"][0]["type"], "message");
    let answer = whole["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();

    let r = client
        .post(at(0))
        .json(&ask("hello", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = r.text().await.unwrap();
    assert!(!body.contains("[DONE]"));
    let evs = sse_events(&body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(&data["type"], name);
        assert_eq!(data["sequence_number"], i as u64);
    }
    // Go maps: the keys of every payload are sorted.
    let first_data = body.lines().nth(1).unwrap();
    assert!(
        first_data.starts_with(
            r#"data: {"response":{"background":false,"completed_at":null,"created_at":"#
        ),
        "{first_data}"
    );
    let streamed: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(streamed, answer);

    // Kept on the server that produced it, and only there.
    let id = whole["id"].as_str().unwrap();
    let next = json!({"model": "llama3.2", "input": "and then?", "previous_response_id": id});
    let r = client.post(at(0)).json(&next).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["previous_response_id"], id);
    let r = client.post(at(1)).json(&next).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "previous_response_not_found");
    assert_eq!(
        v["error"]["message"],
        "previous_response_id was not found or has expired; resend the full conversation"
    );
    let bg = json!({"model": "llama3.2", "input": "x", "background": true});
    let r = client.post(at(0)).json(&bg).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn continuations_follow_the_backend_that_answered() {
    // Slow answers at one slot per backend: three starts at once spread
    // over the three backends.
    let fleet = TestFleet::uniform(3, common::slow(5, 16)).await;
    let proxy = start_proxy(&fleet, |a| a.max_concurrent_per_backend = 1).await;
    let starts: Vec<_> = (0..3)
        .map(|i| {
            let stream = i % 2 == 0;
            let (client, url) = (proxy.client.clone(), proxy.at("/v1/responses"));
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .json(&ask(&format!("start {i}"), stream))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let first = backend_of(&r);
                let body = r.text().await.unwrap();
                let id = if stream {
                    let evs = sse_events(&body);
                    assert_eq!(evs.last().unwrap().0, "response.completed");
                    evs[0].1["response"]["id"].as_str().unwrap().to_string()
                } else {
                    serde_json::from_str::<Value>(&body).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                };
                (first, id)
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for start in starts {
        let (first, id) = start.await.unwrap();
        seen.insert(first);
        // Twice in a row: each continuation goes back to the same backend.
        let mut prev = id;
        for stream in [false, true] {
            let next = json!({"model": "llama3.2", "input": "go on", "previous_response_id": prev, "stream": stream});
            let r = proxy.post("/v1/responses", next).await;
            assert_eq!(r.status(), 200);
            assert_eq!(backend_of(&r), first);
            let body = r.text().await.unwrap();
            prev = if stream {
                sse_events(&body)[0].1["response"]["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            } else {
                serde_json::from_str::<Value>(&body).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            };
        }
    }
    assert_eq!(seen.len(), 3, "the starts were spread: {seen:?}");
}

#[tokio::test]
async fn a_continuation_whose_backend_is_gone_gets_the_404_at_once() {
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    // Waiting for the gone backend would outlast the test's hang guard.
    let proxy = start_proxy(&fleet, |a| a.queue_timeout = Duration::from_secs(3600)).await;
    let r = proxy.post("/v1/responses", ask("hi", false)).await;
    let port = backend_of(&r);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    fleet.on(port).kill().await;
    proxy.wait_healthy(1).await;
    let continuation = json!({"model": "llama3.2", "input": "x", "previous_response_id": id});
    let r = unhung(
        "a continuation of a gone backend's answer",
        proxy.post("/v1/responses", continuation),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "previous_response_not_found");
    assert_eq!(v["error"]["param"], "previous_response_id");
    // An id corral never relayed: the backend's own 404 comes back, and the
    // backend keeps its model list (a 404 here is not a stale listing).
    for _ in 0..3 {
        let r = proxy
            .post(
                "/v1/responses",
                json!({"model": "llama3.2", "input": "x", "previous_response_id": "resp_never"}),
            )
            .await;
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "previous_response_not_found");
    }
    assert_eq!(
        proxy
            .post("/v1/responses", ask("still there", false))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn zstd_bodies_are_routed_by_their_model_and_forwarded_as_sent() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let plain = serde_json::to_vec(&ask("compressed", false)).unwrap();
    let packed = zstd::encode_all(&plain[..], 3).unwrap();
    let send = |body: Vec<u8>, path: &'static str| {
        proxy
            .client
            .post(proxy.at(path))
            .header("content-type", "application/json")
            .header("content-encoding", "zstd")
            .body(body)
            .send()
    };
    let r = send(packed.clone(), "/v1/responses").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], "llama3.2");
    // The same answer as the plain body gets.
    let plain_answer = proxy
        .post_json("/v1/responses", ask("compressed", false))
        .await;
    assert_eq!(
        v["output"][0]["content"][0]["text"],
        plain_answer["output"][0]["content"][0]["text"]
    );
    // Unknown model inside a zstd body: corral's own 404.
    let other = serde_json::to_vec(&json!({"model": "never-listed", "input": "x"})).unwrap();
    let r = send(zstd::encode_all(&other[..], 3).unwrap(), "/v1/responses")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Not zstd at all: 400 in OpenAI's shape.
    let r = send(b"definitely not zstd".to_vec(), "/v1/responses")
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("failed to decompress request body")
    );
    // Other /v1 routes take zstd too.
    let chat = serde_json::to_vec(
        &json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    let r = send(
        zstd::encode_all(&chat[..], 3).unwrap(),
        "/v1/chat/completions",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn corral_refuses_responses_in_openai_shape() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| a.reject_streaming = true).await;
    for (body, status, kind) in [
        (
            json!({"model": "never-listed", "input": "x"}),
            404,
            "not_found_error",
        ),
        (ask("x", true), 400, "invalid_request_error"),
    ] {
        let r = proxy.post("/v1/responses", body).await;
        assert_eq!(r.status(), status);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
    }
}

#[tokio::test]
async fn a_responses_stream_cut_before_completed_is_counted_broken() {
    let fleet = TestFleet::uniform(1, common::breaking_midway()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy.post("/v1/responses", ask("cut", true)).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("response.output_text.delta"));
    assert!(
        !body.contains("response.completed"),
        "no invented terminal event: {body}"
    );
    eventually(
        Duration::from_secs(5),
        "the broken answer is counted",
        || async {
            let text = proxy.metrics().await;
            text.lines()
                .any(|l| l == r#"corral_stream_errors_total{endpoint="/v1/responses"} 1"#)
                && text.lines().any(|l| {
                    l.starts_with("corral_backend_failures_total")
                        && l.contains(r#"kind="broken_answer""#)
                })
        },
    )
    .await;
    assert_eq!(proxy.healthy().await, 1);
}
