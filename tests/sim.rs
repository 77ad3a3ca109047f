//! Black-box tests of `corral sim`: servers on 127.0.0.1 port 0, driven over
//! HTTP (reqwest, or raw TCP where the socket itself matters).

use std::time::Duration;

use corral::sim::{self, FaultSpec, ServerSpec, SimServer, Stats};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

mod common;

use common::eventually;

// ===== helpers =====

/// How long a condition polled with [`eventually`] may take.
const SECS: Duration = Duration::from_secs(5);

async fn start(spec: ServerSpec) -> SimServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimServer::start(l, spec).await.unwrap()
}

fn url(s: &SimServer, path: &str) -> String {
    format!("http://{}{path}", s.addr())
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(s: &SimServer, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(url(s, path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post_json(s: &SimServer, path: &str, body: Value) -> (u16, Value) {
    let r = post(s, path, body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get_json(s: &SimServer, path: &str) -> Value {
    client()
        .get(url(s, path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn lines(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sends a raw HTTP/1.1 POST and returns the open socket.
async fn raw_post(s: &SimServer, path: &str, body: &str, extra: &str) -> TcpStream {
    let mut t = TcpStream::connect(s.addr()).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    t.write_all(req.as_bytes()).await.unwrap();
    t
}

fn slow(tokens: usize, interval_ms: u64) -> ServerSpec {
    ServerSpec {
        tokens,
        token_interval: Duration::from_millis(interval_ms),
        ..ServerSpec::default()
    }
}

fn stats(s: &SimServer) -> Stats {
    s.stats()
}

// ===== endpoints and shapes =====

#[tokio::test]
async fn root_version_tags_ps_and_show_have_ollama_shapes() {
    let s = start(ServerSpec::default()).await;
    let r = client().get(url(&s, "/")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "Ollama is running");
    let head = client().head(url(&s, "/api/tags")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        get_json(&s, "/api/version").await,
        json!({"version": "0.33.0-rc2"})
    );
    let tags = get_json(&s, "/api/tags").await;
    let m = &tags["models"][0];
    assert_eq!(m["name"], "llama3.2:latest");
    assert_eq!(m["model"], "llama3.2:latest");
    assert_eq!(m["digest"].as_str().unwrap().len(), 64);
    for k in ["modified_at", "size", "details"] {
        assert!(!m[k].is_null(), "{k}");
    }
    assert_eq!(get_json(&s, "/api/ps").await, json!({"models": []}));
    let (st, show) = post_json(&s, "/api/show", json!({"model": "Llama3.2"})).await;
    assert_eq!(st, 200);
    assert!(show["model_info"].is_object());
    let (st, e) = post_json(&s, "/api/show", json!({"name": "nope"})).await;
    assert_eq!(
        (st, e),
        (404, json!({"error": "model 'nope:latest' not found"}))
    );
}

#[tokio::test]
async fn unknown_path_is_404_text_and_wrong_method_is_405_text() {
    let s = start(ServerSpec::default()).await;
    let r = client().get(url(&s, "/api/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "404 page not found");
    let r = client().get(url(&s, "/api/chat")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.text().await.unwrap(), "405 method not allowed");
}

#[tokio::test]
async fn generate_streams_ndjson_by_default_with_a_final_done_chunk() {
    let s = start(ServerSpec::default()).await;
    let r = post(
        &s,
        "/api/generate",
        json!({"model": "llama3.2", "prompt": "why"}),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let body = r.text().await.unwrap();
    assert!(body.ends_with('\n') && !body.contains("\n\n"));
    let objs = lines(&body);
    let want = sim::expected_tokens(0, "llama3.2", "why", 16);
    assert_eq!(objs.len(), 17);
    for (o, t) in objs.iter().zip(&want) {
        assert_eq!(o["response"], t.as_str());
        assert_eq!(o["done"], false);
        assert_eq!(o["model"], "llama3.2");
        assert!(o["created_at"].as_str().unwrap().ends_with('Z'));
        assert!(o.get("eval_count").is_none());
    }
    let last = &objs[16];
    assert_eq!(
        (&last["done"], &last["done_reason"]),
        (&json!(true), &json!("stop"))
    );
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[k].as_u64().unwrap() > 0, "{k}");
    }
    assert!(last["context"].is_array());
    assert_eq!(stats(&s).completed, 1);
}

#[tokio::test]
async fn generate_with_stream_false_answers_one_object_with_the_expected_text() {
    let s = start(ServerSpec::default()).await;
    let r = post(
        &s,
        "/api/generate",
        json!({"model": "llama3.2:latest", "prompt": "hi", "stream": false, "options": {"num_predict": 5}}),
    )
    .await;
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["response"], sim::expected_text(0, "llama3.2", "hi", 5));
    assert_eq!(v["model"], "llama3.2:latest");
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["eval_count"], 5);
}

#[tokio::test]
async fn chat_has_role_on_every_object_and_echoes_the_model_verbatim() {
    let s = start(ServerSpec::default()).await;
    let msgs =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]);
    let body = post(
        &s,
        "/api/chat",
        json!({"model": "LLAMA3.2", "messages": msgs}),
    )
    .await
    .text()
    .await
    .unwrap();
    let objs = lines(&body);
    let text: String = objs
        .iter()
        .map(|o| {
            assert_eq!(o["message"]["role"], "assistant");
            assert_eq!(o["model"], "LLAMA3.2");
            assert!(o.get("context").is_none());
            o["message"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, sim::expected_text(0, "llama3.2", "hello", 16));
    assert_eq!(objs.last().unwrap()["done"], true);
}

#[tokio::test]
async fn error_strings_match_ollama_exactly() {
    let s = start(ServerSpec::default()).await;
    let cases = [
        (
            "/api/generate",
            json!({"model": "nope", "prompt": "x"}),
            404,
            "model 'nope' not found",
        ),
        (
            "/api/generate",
            json!({"prompt": "x"}),
            404,
            "model '' not found",
        ),
        (
            "/api/chat",
            json!({"messages": []}),
            400,
            "model is required",
        ),
        (
            "/api/chat",
            json!({"model": "nope", "messages": []}),
            404,
            "model 'nope' not found",
        ),
        (
            "/api/embed",
            json!({"model": "nope", "input": "x"}),
            404,
            "model \"nope\" not found, try pulling it first",
        ),
        (
            "/api/embeddings",
            json!({"model": "nope", "prompt": "x"}),
            404,
            "model \"nope\" not found, try pulling it first",
        ),
        (
            "/api/embeddings",
            json!({"prompt": "x"}),
            400,
            "model is required",
        ),
        (
            "/api/generate",
            json!({"model": "a b"}),
            400,
            "invalid model name",
        ),
        (
            "/api/generate",
            json!({"model": "all-minilm", "prompt": "x"}),
            400,
            "\"all-minilm\" does not support generate",
        ),
        (
            "/api/chat",
            json!({"model": "all-minilm", "messages": [{"role": "user", "content": "x"}]}),
            400,
            "\"all-minilm\" does not support chat",
        ),
        (
            "/api/generate",
            json!({"model": "llama3.2", "keep_alive": "300"}),
            400,
            "time: missing unit in duration \"300\"",
        ),
        (
            "/api/generate",
            json!({"model": "llama3.2", "stream": "yes"}),
            400,
            "",
        ),
    ];
    for (path, body, status, msg) in cases {
        let (st, v) = post_json(&s, path, body.clone()).await;
        assert_eq!(st, status, "{path} {body}");
        if !msg.is_empty() {
            assert_eq!(v, json!({"error": msg}), "{path} {body}");
        }
    }
    let raw = |b: &'static str| client().post(url(&s, "/api/generate")).body(b).send();
    let v: Value = raw("").await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"error": "missing request body"}));
    let v: Value = raw("xyz").await.unwrap().json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": "invalid character 'x' looking for beginning of value"})
    );
    let v: Value = raw("{\"model\":").await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"error": "unexpected EOF"}));
}

#[tokio::test]
async fn load_and_unload_shortcuts_answer_one_json_object() {
    let s = start(ServerSpec::default()).await;
    let r = post(&s, "/api/generate", json!({"model": "llama3.2"})).await;
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (&v["done"], &v["done_reason"], &v["response"]),
        (&json!(true), &json!("load"), &json!(""))
    );
    let ps = get_json(&s, "/api/ps").await;
    assert_eq!(ps["models"][0]["name"], "llama3.2:latest");
    for k in ["expires_at", "size_vram", "context_length"] {
        assert!(!ps["models"][0][k].is_null(), "{k}");
    }
    let (_, v) = post_json(
        &s,
        "/api/chat",
        json!({"model": "llama3.2", "keep_alive": 0}),
    )
    .await;
    assert_eq!(v["done_reason"], "unload");
    assert_eq!(v["message"], json!({"role": "assistant", "content": ""}));
    assert_eq!(get_json(&s, "/api/ps").await, json!({"models": []}));
    let (_, v) = post_json(&s, "/api/embed", json!({"model": "all-minilm"})).await;
    assert_eq!(v, json!({"model": "all-minilm", "embeddings": []}));
    assert_eq!(stats(&s).completed, 0);
}

#[tokio::test]
async fn embeddings_are_deterministic_and_normalised() {
    let s = start(ServerSpec::default()).await;
    let (_, v) = post_json(
        &s,
        "/api/embed",
        json!({"model": "all-minilm", "input": ["a", "b"]}),
    )
    .await;
    let got: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).unwrap();
    assert_eq!(got[0], sim::expected_embedding(0, "all-minilm", "a", 16));
    assert_eq!(got[1], sim::expected_embedding(0, "all-minilm", "b", 16));
    let (_, v) = post_json(
        &s,
        "/api/embeddings",
        json!({"model": "all-minilm", "prompt": "a"}),
    )
    .await;
    assert_eq!(v["embedding"].as_array().unwrap().len(), 16);
    let (_, v) = post_json(
        &s,
        "/v1/embeddings",
        json!({"model": "all-minilm", "input": "a", "encoding_format": "base64"}),
    )
    .await;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats, sim::expected_embedding(0, "all-minilm", "a", 16));
    assert_eq!(v["object"], "list");
    let (st, v) = post_json(
        &s,
        "/v1/embeddings",
        json!({"model": "all-minilm", "input": [], "encoding_format": "float"}),
    )
    .await;
    assert_eq!((st, &v["error"]["message"]), (400, &json!("invalid input")));
    let (st, _) = post_json(
        &s,
        "/api/embed",
        json!({"model": "all-minilm", "input": [1]}),
    )
    .await;
    assert_eq!(st, 400);
}

// ===== /v1 =====

#[tokio::test]
async fn v1_chat_non_stream_has_openai_shape_with_usage() {
    let s = start(ServerSpec::default()).await;
    let r = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["system_fingerprint"], "fp_ollama");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(
        v["choices"][0]["message"]["content"],
        sim::expected_text(0, "llama3.2", "hey", 4)
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn v1_chat_stream_uses_sse_framing_with_usage_and_done() {
    let s = start(ServerSpec::default()).await;
    let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hey"}],
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = post(&s, "/v1/chat/completions", body).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")));
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let objs: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e[6..]).unwrap())
        .collect();
    assert_eq!(objs.len(), 16 + 2);
    assert_eq!(objs[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(objs[1]["choices"][0]["delta"].get("role").is_none());
    let content: String = objs[..16]
        .iter()
        .map(|o| {
            o["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(content, sim::expected_text(0, "llama3.2", "hey", 16));
    assert_eq!(objs[16]["choices"][0]["delta"], json!({}));
    assert_eq!(objs[16]["choices"][0]["finish_reason"], "stop");
    assert_eq!(objs[17]["choices"], json!([]));
    assert_eq!(objs[17]["usage"]["completion_tokens"], 16);
    assert!(objs.iter().all(|o| o["created"] == objs[0]["created"]));
}

#[tokio::test]
async fn v1_completions_stream_ends_with_done_and_errors_use_the_openai_object() {
    let s = start(ServerSpec::default()).await;
    let text = post(
        &s,
        "/v1/completions",
        json!({"model": "llama3.2", "prompt": "p", "stream": true, "max_tokens": 3}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(text.contains("\"finish_reason\":\"length\""));
    let (st, v) = post_json(
        &s,
        "/v1/chat/completions",
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(
        v,
        json!({"error": {"message": "model 'nope' not found", "type": "not_found_error", "param": null, "code": null}})
    );
    let (st, v) = post_json(
        &s,
        "/v1/chat/completions",
        json!({"model": "llama3.2", "messages": []}),
    )
    .await;
    assert_eq!(
        (st, &v["error"]["type"]),
        (400, &json!("invalid_request_error"))
    );
    assert_eq!(v["error"]["message"], "[] is too short - 'messages'");
}

#[tokio::test]
async fn v1_models_lists_and_retrieves_and_is_null_when_empty() {
    let s = start(ServerSpec::default()).await;
    let v = get_json(&s, "/v1/models").await;
    assert_eq!(v["data"][0]["id"], "llama3.2:latest");
    assert_eq!(v["data"][0]["owned_by"], "library");
    let one = get_json(&s, "/v1/models/llama3.2").await;
    assert_eq!(one["id"], "llama3.2");
    let empty = start(ServerSpec {
        models: vec![],
        ..ServerSpec::default()
    })
    .await;
    assert_eq!(get_json(&empty, "/v1/models").await["data"], Value::Null);
    assert_eq!(get_json(&empty, "/api/tags").await, json!({"models": []}));
}

// ===== faults =====

fn gen_body(stream: bool) -> Value {
    json!({"model": "llama3.2", "prompt": "p", "stream": stream})
}

#[tokio::test]
async fn error_fault_answers_500_before_any_byte() {
    let s = start(ServerSpec::default()).await;
    let r = client()
        .post(url(&s, "/api/generate"))
        .header("x-sim-fault", "error")
        .json(&gen_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().len() > 5);
    assert_eq!(stats(&s).faults["error"], 1);
}

#[tokio::test]
async fn busy_fault_answers_503_with_the_exact_text() {
    let s = start(ServerSpec::default()).await;
    let r = client()
        .post(url(&s, "/api/chat"))
        .header("x-sim-fault", "busy")
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": "server busy, please try again.  maximum pending requests exceeded"})
    );
}

#[tokio::test]
async fn reset_fault_cuts_the_stream_without_a_final_chunk() {
    let s = start(slow(16, 5)).await;
    let mut t = raw_post(
        &s,
        "/api/generate",
        &gen_body(true).to_string(),
        "x-sim-fault: reset\r\n",
    )
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = t.read(&mut buf).await {
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"));
    assert!(text.contains("\"done\":false"));
    assert!(!text.contains("\"done\":true"));
    assert!(!text.ends_with("0\r\n\r\n"), "no clean chunked end: {text}");
    // And for a non-streaming request, reqwest sees a broken body.
    let r = client()
        .post(url(&s, "/api/generate"))
        .header("x-sim-fault", "reset")
        .json(&gen_body(false))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(r.bytes().await.is_err());
    }
    assert_eq!(stats(&s).faults["reset"], 2);
    assert_eq!(stats(&s).completed, 0);
}

#[tokio::test]
async fn hang_fault_never_answers_and_counts_a_cancel_when_the_client_leaves() {
    let s = start(ServerSpec::default()).await;
    let t = raw_post(
        &s,
        "/api/generate",
        &gen_body(false).to_string(),
        "x-sim-fault: hang\r\n",
    )
    .await;
    eventually(SECS, "request in flight", || async {
        stats(&s).in_flight == 1
    })
    .await;
    let mut t = t;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(200), t.read(&mut buf)).await;
    assert!(read.is_err(), "no byte while hanging");
    drop(t);
    eventually(SECS, "hang cancelled", || async {
        stats(&s).cancelled == 1 && stats(&s).in_flight == 0
    })
    .await;
}

#[tokio::test]
async fn garbage_fault_answers_200_with_a_body_that_is_not_json() {
    let s = start(ServerSpec::default()).await;
    let r = client()
        .post(url(&s, "/api/generate"))
        .header("x-sim-fault", "garbage")
        .json(&gen_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&body).is_err());
}

#[tokio::test]
async fn mid_stream_error_fault_sends_an_error_line_then_ends_cleanly() {
    let s = start(ServerSpec::default()).await;
    let r = client()
        .post(url(&s, "/api/generate"))
        .header("x-sim-fault", "mid-stream-error")
        .json(&gen_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let objs = lines(&r.text().await.unwrap());
    let last = objs.last().unwrap();
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .starts_with("an error was encountered while running the model: ")
    );
    assert_eq!(objs.len(), 9);
    assert!(objs.iter().all(|o| o.get("done") != Some(&json!(true))));
    let (st, v) = post_json(&s, "/api/generate", gen_body(false)).await;
    assert_eq!((st, v["done"].clone()), (200, json!(true)));
}

#[tokio::test]
async fn fault_rates_hit_requests_evenly_and_can_change_at_run_time() {
    let s = start(ServerSpec {
        faults: FaultSpec {
            error_rate: 0.5,
            ..FaultSpec::default()
        },
        ..ServerSpec::default()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            post(&s, "/api/generate", gen_body(false))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 500, 200, 500, 200, 500]);
    s.set_faults(FaultSpec {
        busy_rate: 1.0,
        ..FaultSpec::default()
    });
    assert_eq!(
        post(&s, "/api/generate", gen_body(false)).await.status(),
        503
    );
    assert_eq!(stats(&s).faults["error"], 3);
}

// On the paused clock: the delay is time logic, and the clock moves only
// when every task waits, so the elapsed time is the simulator's own wait.
#[tokio::test(start_paused = true)]
async fn delay_header_holds_the_first_byte() {
    let s = start(ServerSpec::default()).await;
    let t0 = Instant::now();
    let r = client()
        .post(url(&s, "/api/generate"))
        .header("x-sim-delay-ms", "150")
        .json(&gen_body(false))
        .send()
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn start_delay_refuses_connections_first_and_lifetime_kills_the_server() {
    let spec = ServerSpec {
        faults: FaultSpec {
            start_delay: Some(Duration::from_millis(300)),
            lifetime: Some(Duration::from_millis(600)),
            ..FaultSpec::default()
        },
        ..ServerSpec::default()
    };
    let s = start(spec).await;
    assert!(!s.is_running());
    assert!(
        TcpStream::connect(s.addr()).await.is_err(),
        "refused while starting"
    );
    eventually(SECS, "server up", || async { s.is_running() }).await;
    assert_eq!(get_json(&s, "/api/version").await["version"], "0.33.0-rc2");
    eventually(SECS, "server dead", || async { !s.is_running() }).await;
    eventually(SECS, "the port refuses connections", || async {
        TcpStream::connect(s.addr()).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn kill_drops_open_streams_and_restart_serves_again_with_fresh_stats() {
    let s = start(slow(1000, 10)).await;
    let r = post(&s, "/api/generate", gen_body(true)).await;
    assert_eq!(r.status(), 200);
    s.kill().await;
    assert!(!s.is_running());
    assert!(r.text().await.is_err(), "stream cut by kill");
    assert!(TcpStream::connect(s.addr()).await.is_err());
    s.restart(ServerSpec {
        version: "9.9.9".into(),
        ..ServerSpec::default()
    })
    .await
    .unwrap();
    assert!(s.is_running());
    assert_eq!(get_json(&s, "/api/version").await["version"], "9.9.9");
    assert_eq!(stats(&s).total, 1);
    s.shutdown().await;
}

// ===== slots, queue, keep-alive =====

#[tokio::test]
async fn parallel_slots_make_extra_requests_wait_fifo_and_count_oversubscription() {
    let s = start(ServerSpec {
        parallel: 2,
        ..slow(5, 20)
    })
    .await;
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (s2, order) = (s.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let (st, _) = post_json(
                &s2,
                "/api/generate",
                json!({"model": "llama3.2", "prompt": format!("{i}"), "stream": false}),
            )
            .await;
            order.lock().unwrap().push(i);
            st
        }));
        eventually(SECS, "request arrived", || async {
            stats(&s).in_flight == i + 1
        })
        .await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        &order[2..],
        &[2, 3],
        "waiters served first come, first served"
    );
    let st = stats(&s);
    assert_eq!((st.oversubscribed, st.completed, st.in_flight), (2, 4, 0));
}

#[tokio::test]
async fn full_load_queue_answers_503_with_the_exact_text() {
    let s = start(ServerSpec {
        max_queue: 1,
        load_time: Duration::from_secs(30),
        ..ServerSpec::default()
    })
    .await;
    let t = raw_post(&s, "/api/generate", &gen_body(false).to_string(), "").await;
    eventually(SECS, "first request loading", || async {
        stats(&s).in_flight == 1
    })
    .await;
    let (st, v) = post_json(&s, "/api/generate", gen_body(false)).await;
    assert_eq!(st, 503);
    assert_eq!(
        v["error"],
        "server busy, please try again.  maximum pending requests exceeded"
    );
    drop(t);
    eventually(SECS, "loading request cancelled", || async {
        stats(&s).cancelled == 1
    })
    .await;
}

#[tokio::test]
async fn keep_alive_expiry_is_visible_in_ps() {
    let s = start(ServerSpec::default()).await;
    let (_, v) = post_json(
        &s,
        "/api/generate",
        json!({"model": "llama3.2", "prompt": "x", "stream": false, "keep_alive": 0.3}),
    )
    .await;
    assert_eq!(v["done"], true);
    assert_eq!(
        get_json(&s, "/api/ps").await["models"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    eventually(SECS, "the model unloaded", || async {
        get_json(&s, "/api/ps").await["models"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let loaded = start(ServerSpec {
        loaded: vec!["llama3.2".into()],
        keep_alive: None,
        ..ServerSpec::default()
    })
    .await;
    let ps = get_json(&loaded, "/api/ps").await;
    assert!(
        ps["models"][0]["expires_at"]
            .as_str()
            .unwrap()
            .starts_with("23")
    );
}

#[tokio::test]
async fn non_local_host_header_gets_403_with_an_empty_body() {
    let s = start(ServerSpec::default()).await;
    for (host, want) in [
        ("example.com", 403),
        ("localhost:11434", 200),
        ("gpu.internal", 200),
        ("10.1.2.3:80", 200),
        ("8.8.8.8", 403),
    ] {
        let r = client()
            .get(url(&s, "/api/tags"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{host}");
        if want == 403 {
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
    let open = start(ServerSpec {
        check_host: false,
        ..ServerSpec::default()
    })
    .await;
    let r = client()
        .get(url(&open, "/api/tags"))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// ===== cancellation =====

#[tokio::test]
async fn streaming_client_disconnect_is_counted_as_cancelled() {
    let s = start(slow(1000, 5)).await;
    let mut t = raw_post(&s, "/api/generate", &gen_body(true).to_string(), "").await;
    let mut buf = [0u8; 64];
    let n = t.read(&mut buf).await.unwrap();
    assert!(n > 0);
    drop(t);
    eventually(SECS, "stream cancelled", || async {
        stats(&s).cancelled == 1 && stats(&s).in_flight == 0
    })
    .await;
    // The slot is free again: a new request is not oversubscribed.
    let (st, _) = post_json(
        &s,
        "/api/generate",
        json!({"model": "llama3.2", "prompt": "x", "stream": false, "options": {"num_predict": 1}}),
    )
    .await;
    assert_eq!((st, stats(&s).oversubscribed), (200, 0));
}

#[tokio::test]
async fn non_streaming_client_disconnect_is_counted_as_cancelled_promptly() {
    let s = start(slow(100_000, 10)).await;
    let t = raw_post(&s, "/api/generate", &gen_body(false).to_string(), "").await;
    // Its prompt evaluated: it waits for its first token (100 s away).
    eventually(SECS, "generating", || async {
        stats(&s).in_flight == 1 && stats(&s).prompt_tokens_evaluated > 0
    })
    .await;
    drop(t);
    // Promptly: counted while the answer had ten tokens of 100 s to go, so
    // never at the end of the answer (nothing completed).
    eventually(SECS, "non-stream cancelled", || async {
        stats(&s).cancelled == 1 && stats(&s).in_flight == 0
    })
    .await;
    assert_eq!(stats(&s).completed, 0);
}

#[tokio::test]
async fn waiting_client_disconnect_gives_up_its_place() {
    let s = start(slow(100_000, 10)).await;
    let first = raw_post(&s, "/api/generate", &gen_body(false).to_string(), "").await;
    eventually(SECS, "first generating", || async {
        stats(&s).in_flight == 1
    })
    .await;
    let second = raw_post(&s, "/api/generate", &gen_body(false).to_string(), "").await;
    eventually(SECS, "second waiting", || async {
        stats(&s).oversubscribed == 1
    })
    .await;
    drop(second);
    eventually(SECS, "waiter cancelled", || async {
        stats(&s).cancelled == 1
    })
    .await;
    drop(first);
    eventually(SECS, "both cancelled", || async {
        stats(&s).cancelled == 2 && stats(&s).in_flight == 0
    })
    .await;
}

// ===== determinism, fleet, stats endpoint =====

#[tokio::test]
async fn same_seed_gives_the_same_text_on_every_server_and_another_seed_differs() {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let specs = vec![
        ServerSpec::default(),
        ServerSpec::default(),
        ServerSpec {
            seed: 7,
            ..ServerSpec::default()
        },
    ];
    let fleet = sim::start_fleet(listeners, specs).await.unwrap();
    let mut texts = Vec::new();
    for s in &fleet {
        let (_, v) = post_json(
            s,
            "/api/generate",
            json!({"model": "llama3.2", "prompt": "same", "stream": false}),
        )
        .await;
        texts.push(v["response"].as_str().unwrap().to_owned());
    }
    assert_eq!(texts[0], texts[1]);
    assert_ne!(texts[0], texts[2]);
    assert_eq!(texts[2], sim::expected_text(7, "llama3.2", "same", 16));
    let st: Stats = client()
        .get(url(&fleet[0], "/__sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st.requests["/api/generate"], 1);
    assert_eq!(st.completed, 1);
    assert!(!st.requests.contains_key("/__sim/stats"));
}
