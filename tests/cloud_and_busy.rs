//! Ollama's back-pressure and the endpoints that use no local GPU: a burst
//! of busy 503s leaves every backend healthy and every request answered;
//! cloud models take no slot and their 401/403/429 reach the client as
//! they are; `/api/status` and `/api/experimental/*` go to a backend
//! without a slot; account endpoints are refused; audio transcription and
//! speech are routed by their model.

mod common;

use std::time::Duration;

use common::{TestFleet, backend_of, hold_slot, in_flight, start_proxy};
use corral::sim::{CloudAccess, ServerSpec};
use serde_json::{Value, json};

fn chat(model: &str) -> Value {
    json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn a_burst_of_busy_503s_leaves_every_backend_healthy() {
    // Two backends whose load queue holds one request: while a model loads,
    // every other request is refused with Ollama's busy 503.
    let spec = ServerSpec {
        max_queue: 1,
        load_time: Duration::from_millis(300),
        ..ServerSpec::default()
    };
    let fleet = TestFleet::uniform(2, spec).await;
    let proxy = start_proxy(&fleet, |a| a.max_concurrent_per_backend = 0).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (client, url) = (proxy.client.clone(), proxy.at("/api/generate"));
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&common::generate("llama3.2", &format!("burst {i}"), false))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let backends = proxy.get_json("/__proxy/backends").await;
    for b in backends["backends"].as_array().unwrap() {
        assert_eq!(b["healthy"], true, "{b}");
    }
    let metrics = proxy.metrics().await;
    let busy: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("corral_backend_failures_total") && l.contains(r#"kind="busy""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(busy >= 1.0, "the burst did meet busy backends:\n{metrics}");
    eprintln!(
        "burst of 24: {busy} busy 503s met, every request answered 200, both backends healthy"
    );
}

#[tokio::test]
async fn a_cloud_model_is_served_at_once_with_every_local_slot_busy() {
    let spec = ServerSpec {
        cloud_models: vec!["gpt-oss:120b-cloud".into()],
        ..ServerSpec::default()
    };
    let fleet = TestFleet::uniform(2, spec).await;
    let proxy = start_proxy(&fleet, |a| a.max_concurrent_per_backend = 1).await;
    let _a = hold_slot(&proxy).await;
    let _b = hold_slot(&proxy).await;
    assert_eq!(in_flight(&proxy).await, 2);
    for model in ["gpt-oss:120b-cloud", "gpt-oss:120b:cloud"] {
        let r = tokio::time::timeout(Duration::from_secs(5), proxy.post("/api/chat", chat(model)))
            .await
            .expect("served without waiting for a slot");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["done"], true);
        assert_eq!(v["model"], model);
    }
    let r = proxy
        .post("/v1/messages", json!({"model": "qwen3:cloud", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 200);
    for stream in [false, true] {
        let body = json!({"model": "gpt-oss:120b-cloud", "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]});
        let r = proxy.post("/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(!stream || text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    // No slot was taken, none is counted.
    assert_eq!(in_flight(&proxy).await, 2);
    // The fleet views list the stub once, with its remote_host.
    let tags = proxy.get_json("/api/tags").await;
    let stubs: Vec<&Value> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "gpt-oss:120b-cloud")
        .collect();
    assert_eq!(stubs.len(), 1);
    assert_eq!(stubs[0]["remote_host"], "https://ollama.com:443");
    assert_eq!(stubs[0]["remote_model"], "gpt-oss:120b");
}

#[tokio::test]
async fn cloud_refusals_pass_through_and_never_mark_a_backend_unhealthy() {
    for (access, status) in [
        (CloudAccess::SignedOut, 401),
        (CloudAccess::Disabled, 403),
        (CloudAccess::RateLimited, 429),
    ] {
        let spec = ServerSpec {
            cloud: access,
            ..ServerSpec::default()
        };
        let fleet = TestFleet::uniform(1, spec).await;
        let proxy = start_proxy(&fleet, |_| {}).await;
        for _ in 0..3 {
            let r = proxy.post("/api/chat", chat("gpt-oss:120b:cloud")).await;
            assert_eq!(r.status(), status);
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].is_string(), "{v}");
            if status == 401 {
                assert!(
                    v["signin_url"]
                        .as_str()
                        .unwrap()
                        .starts_with("https://ollama.com/connect?")
                );
            }
        }
        assert_eq!(proxy.healthy().await, 1);
        let status_doc = proxy.get_json("/api/status").await;
        assert_eq!(
            status_doc["cloud"]["disabled"],
            access == CloudAccess::Disabled
        );
    }
}

#[tokio::test]
async fn status_and_experimental_take_no_slot_and_account_endpoints_are_refused() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| a.max_concurrent_per_backend = 1).await;
    let _held = hold_slot(&proxy).await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        proxy.client.get(proxy.at("/api/status")).send(),
    )
    .await
    .expect("no slot needed")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), fleet.port_start);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"cloud": {"disabled": false, "source": "none"}}));
    // The simulator serves no experimental endpoint: its own 404 comes back.
    let r = proxy
        .post("/api/experimental/web_search", json!({"query": "x"}))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(backend_of(&r), fleet.port_start);
    for (method, path) in [
        (reqwest::Method::POST, "/api/me"),
        (reqwest::Method::POST, "/api/signout"),
        (reqwest::Method::DELETE, "/api/user/keys/abc"),
    ] {
        let r = proxy
            .client
            .request(method, proxy.at(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("account endpoints"),
            "{v}"
        );
    }
}

fn form(model: Option<&str>, audio: &[u8]) -> (String, Vec<u8>) {
    let boundary = "corraltestboundary";
    let mut body = Vec::new();
    if let Some(m) = model {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(audio);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn audio_is_routed_by_its_model() {
    let fleet = TestFleet::start(
        vec![
            ServerSpec::default(),
            ServerSpec {
                models: vec![corral::sim::ModelSpec::named("whisper")],
                ..ServerSpec::default()
            },
        ],
        0,
    )
    .await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let post_form = |model: Option<&str>| {
        let (ct, body) = form(model, b"RIFF....WAVEfmt fake audio");
        proxy
            .client
            .post(proxy.at("/v1/audio/transcriptions"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    for _ in 0..3 {
        let r = post_form(Some("whisper")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(backend_of(&r), fleet.port_start + 1);
        let v: Value = r.json().await.unwrap();
        assert!(!v["text"].as_str().unwrap().is_empty());
    }
    let r = post_form(Some("never-listed")).await.unwrap();
    assert_eq!(r.status(), 404);
    let r = post_form(None).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["message"], "model is required");

    let r = proxy
        .post(
            "/v1/audio/speech",
            json!({"model": "whisper", "input": "hello there", "voice": "Harper"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(backend_of(&r), fleet.port_start + 1);
    assert_eq!(r.headers()["content-type"], "audio/wav");
    let audio = r.bytes().await.unwrap();
    assert_eq!(&audio[..4], b"RIFF");
    let declared = u32::from_le_bytes(audio[40..44].try_into().unwrap()) as usize;
    assert_eq!(
        audio.len(),
        44 + declared,
        "the whole binary body, untouched"
    );
}
