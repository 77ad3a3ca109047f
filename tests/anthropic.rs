//! Anthropic Messages (`POST /v1/messages`): the simulator's byte framing
//! (OLLAMA_API_ADDENDUM.md §4) and the same through corral: whole and
//! streamed answers, tool use, `x-api-key`, `?beta=true`, and corral's own
//! refusals in Anthropic's error shape.

mod common;

use std::time::Duration;

use common::{TestFleet, start_proxy};
use corral::sim::{FaultSpec, ServerSpec};
use serde_json::{Value, json};

fn ask(stream: bool) -> Value {
    json!({"model": "llama3.2", "max_tokens": 64, "stream": stream,
           "system": "be brief",
           "messages": [{"role": "user", "content": "why is the sky blue"}]})
}

/// The `(event, data)` pairs of an SSE body, checking each frame is exactly
/// `event: <name>\ndata: <json>\n\n`.
fn events(body: &str) -> Vec<(String, Value)> {
    assert!(body.ends_with("\n\n"), "{body}");
    common::sse_events(body)
}

#[tokio::test]
async fn the_simulator_speaks_messages_byte_for_byte() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let url = format!("http://127.0.0.1:{}/v1/messages", fleet.port_start);
    let client = reqwest::Client::new();
    let r = client.post(&url).json(&ask(false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    assert!(text.ends_with("}\n"), "{text}");
    assert!(
        text.starts_with(r#"{"id":"msg_"#) && text.contains(r#""type":"message","role":"assistant","model":"llama3.2","content":[{"type":"text","text":"#),
        "struct order: {text}"
    );
    let whole: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(whole["id"].as_str().unwrap().len(), 4 + 24);
    assert_eq!(whole["stop_reason"], "max_tokens");
    assert!(whole.get("stop_sequence").is_none());

    let r = client.post(&url).json(&ask(true)).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let evs = events(&r.text().await.unwrap());
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..3],
        [
            "message_start",
            "content_block_start",
            "content_block_delta"
        ]
    );
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(!names.contains(&"ping"));
    for (name, data) in &evs {
        assert_eq!(&data["type"], name);
    }
    let streamed: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(streamed, whole["content"][0]["text"].as_str().unwrap());
    assert_eq!(evs[0].1["message"]["usage"]["output_tokens"], 0);

    // Validation texts, Anthropic-shaped.
    for (body, message) in [
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
            "model is required",
        ),
        (
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens is required and must be positive",
        ),
        (
            json!({"model": "llama3.2", "max_tokens": 5, "messages": []}),
            "messages is required",
        ),
    ] {
        let r = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(
            v["error"],
            json!({"type": "invalid_request_error", "message": message})
        );
        assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
    }
    let mut nope = ask(false);
    nope["model"] = json!("nope");
    let r = client.post(&url).json(&nope).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"],
        json!({"type": "not_found_error", "message": "model 'nope' not found"})
    );
}

#[tokio::test]
async fn messages_stream_and_call_tools_through_corral() {
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let whole = proxy.post("/v1/messages?beta=true", ask(false)).await;
    assert_eq!(whole.status(), 200);
    assert!(whole.headers().contains_key("x-corral-backend"));
    let whole: Value = whole.json().await.unwrap();
    let r = proxy.post("/v1/messages", ask(true)).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let evs = events(&r.text().await.unwrap());
    let streamed: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(streamed, whole["content"][0]["text"].as_str().unwrap());
    assert_eq!(evs.last().unwrap().0, "message_stop");

    let tools = json!([{"name": "get_weather", "description": "weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let mut body = ask(false);
    body["tools"] = tools.clone();
    let v = proxy.post_json("/v1/messages", body).await;
    assert_eq!(v["stop_reason"], "tool_use");
    let call = &v["content"][0];
    assert_eq!(call["type"], "tool_use");
    assert_eq!(call["name"], "get_weather");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert!(call["input"]["city"].is_string());
    // The tool's result answers with text.
    let mut body = ask(true);
    body["tools"] = tools;
    body["messages"] = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [call.clone()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]},
    ]);
    let r = proxy.post("/v1/messages", body).await;
    let evs = events(&r.text().await.unwrap());
    assert_eq!(evs[1].1["content_block"]["type"], "text");
    assert_eq!(evs.last().unwrap().0, "message_stop");
}

#[tokio::test]
async fn corral_refuses_in_anthropic_shape_and_takes_x_api_key() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| {
        a.api_keys = vec!["sekret".into()];
        a.max_body_bytes = 4096;
    })
    .await;
    let post = |key: Option<&'static str>, body: Value| {
        let mut r = proxy.client.post(proxy.at("/v1/messages")).json(&body);
        if let Some(k) = key {
            r = r
                .header("x-api-key", k)
                .header("anthropic-version", "2023-06-01");
        }
        r.send()
    };
    let anthropic = |v: &Value, kind: &str| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].is_string());
        let id = v["request_id"].as_str().unwrap();
        assert!(id.starts_with("req_") && id.len() == 28, "{id}");
    };
    let r = post(None, ask(false)).await.unwrap();
    assert_eq!(r.status(), 401);
    anthropic(&r.json().await.unwrap(), "authentication_error");
    let r = post(Some("wrong"), ask(false)).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = post(Some("sekret"), ask(false)).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut unknown = ask(false);
    unknown["model"] = json!("never-listed");
    let r = post(Some("sekret"), unknown).await.unwrap();
    assert_eq!(r.status(), 404);
    anthropic(&r.json().await.unwrap(), "not_found_error");
    let mut big = ask(false);
    big["system"] = json!("x".repeat(8192));
    let r = post(Some("sekret"), big).await.unwrap();
    assert_eq!(r.status(), 413);
    anthropic(&r.json().await.unwrap(), "invalid_request_error");
    let r = proxy
        .client
        .post(proxy.at("/v1/messages"))
        .header("x-api-key", "sekret")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    anthropic(&r.json().await.unwrap(), "invalid_request_error");
}

#[tokio::test]
async fn a_messages_stream_without_message_stop_is_counted_broken() {
    let fleet = TestFleet::uniform(1, common::breaking_midway()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy.post("/v1/messages", ask(true)).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    // Relayed as the backend ended it: no invented terminal event.
    assert!(!body.contains("message_stop"), "{body}");
    assert!(body.contains("event: content_block_delta"));
    common::eventually(
        Duration::from_secs(5),
        "the broken answer is counted",
        || async {
            let text = proxy.metrics().await;
            text.lines()
                .any(|l| l == r#"corral_stream_errors_total{endpoint="/v1/messages"} 1"#)
        },
    )
    .await;
    // The backend ended its body cleanly: it stays healthy.
    assert_eq!(proxy.healthy().await, 1);
}

#[tokio::test]
async fn a_messages_stream_that_breaks_ends_with_an_anthropic_error_event() {
    let faults = FaultSpec {
        reset_rate: 1.0,
        ..FaultSpec::default()
    };
    let spec = ServerSpec {
        faults,
        token_interval: Duration::from_millis(2),
        ..ServerSpec::default()
    };
    let fleet = TestFleet::uniform(1, spec).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let r = proxy.post("/v1/messages", ask(true)).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let evs = events(&body);
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error", "{body}");
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!body.contains("message_stop"));
}
