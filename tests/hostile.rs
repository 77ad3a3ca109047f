//! Hostile clients and surprising backends: malformed and oversized bodies,
//! slow-loris headers and bodies, thousands of idle connections, the queue
//! limits (MAX_QUEUE, MAX_QUEUE_BYTES), and a backend port reused by another
//! server.

mod common;

use std::time::Duration;

use common::{TestFleet, eventually, generate, hold_slot, start_proxy};
use corral::sim::{FaultSpec, ModelSpec, ServerSpec, expected_text};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads the whole answer (the proxy closes or answers).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn malformed_bodies_get_a_json_400_and_reach_no_backend() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let deep = format!("{{\"model\":\"llama3.2\",\"x\":{}}}", "[".repeat(200_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("/api/generate", b"{\"model\": \"llama3.2\", ".to_vec()),
        ("/api/generate", b"not json at all".to_vec()),
        ("/api/generate", br#"{"model": 7, "prompt": "hi"}"#.to_vec()),
        (
            "/api/chat",
            br#"{"model": "llama3.2", "stream": "yes"}"#.to_vec(),
        ),
        ("/api/generate", br#"["model", "llama3.2"]"#.to_vec()),
        ("/api/generate", b"{\"model\": \"llama\xff\xfe\"}".to_vec()),
        ("/api/generate", deep.into_bytes()),
        (
            "/v1/chat/completions",
            br#"{"model": null, "messages": 3"#.to_vec(),
        ),
    ];
    for (path, body) in cases {
        let r = proxy
            .client
            .post(proxy.at(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            400,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        let v: Value = r.json().await.unwrap();
        let message = if path.starts_with("/v1") {
            &v["error"]["message"]
        } else {
            &v["error"]
        };
        assert!(message.is_string(), "{v}");
    }
    assert!(
        !fleet.servers[0]
            .stats()
            .requests
            .contains_key("/api/generate")
    );
    // The proxy is still fine.
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_whether_or_not_its_length_is_declared() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| a.max_body_bytes = 64 << 10).await;
    let addr = proxy.handle.addr;
    // Declared 10 GB, body never sent: answered at once, without waiting.
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        raw(
            addr,
            b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000000\r\n\r\n{\"model\":",
        ),
    )
    .await
    .expect("413 without reading the body");
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    // Chunked, no length: refused once past the limit, while more keeps coming.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /api/generate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 16 << 10, "a".repeat(16 << 10));
    let mut answer = Vec::new();
    for _ in 0..64 {
        // Up to 1 MB offered; the proxy stops reading after 64 KB.
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.ends_with(b"}") {
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(
        !fleet.servers[0]
            .stats()
            .requests
            .contains_key("/api/generate")
    );
}

#[tokio::test]
async fn a_slow_loris_is_cut_off_by_the_header_and_body_timeouts_while_others_are_served() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| a.client_header_timeout = Duration::from_secs(1)).await;
    let addr = proxy.handle.addr;
    // Headers one byte at a time, every 300 ms (16 s for them all): cut off
    // by the 1 s header timeout before the last byte is sent.
    const HEADERS: &[u8] =
        b"POST /api/generate HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaa";
    let header_loris = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        for (sent, b) in HEADERS.iter().enumerate() {
            if s.write_all(&[*b]).await.is_err() {
                return sent;
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return sent + 1,
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    assert_eq!(status_of(&text), 408, "{text}");
                    return sent + 1;
                }
                Err(_) => {}
            }
        }
        HEADERS.len()
    });
    // A body one byte at a time (60 s for its 200 bytes): 408 once the same
    // timeout has passed, before the body is complete.
    let body_loris = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut sent = 0;
        while sent < 200 {
            if s.write_all(b" ").await.is_err() {
                break;
            }
            sent += 1;
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    answer.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(_) => {}
            }
        }
        (sent, String::from_utf8_lossy(&answer).to_string())
    });
    // Meanwhile, normal clients are served at once.
    for i in 0..5 {
        let prompt = format!("meanwhile {i}");
        let r = proxy
            .post("/api/generate", generate("llama3.2", &prompt, false))
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["response"], expected_text(0, "llama3.2", &prompt, 16));
    }
    let header_sent = header_loris.await.unwrap();
    assert!(
        header_sent < HEADERS.len(),
        "header loris sent all {header_sent} bytes: never cut off"
    );
    let (body_sent, answer) = body_loris.await.unwrap();
    assert!(
        body_sent < 200,
        "body loris sent its whole body: never cut off"
    );
    assert_eq!(status_of(&answer), 408, "{answer}");
}

/// The soft limit of open files, raised to the hard limit.
fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_stop_normal_requests() {
    let limit = raise_fd_limit();
    // Each idle connection costs two descriptors here (client and proxy end).
    let idle = 10_000usize.min((limit as usize).saturating_sub(1_000) / 2);
    println!("idle connections: {idle} (open-file limit {limit})");
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| {
        a.client_header_timeout = Duration::from_secs(60)
    })
    .await;
    let mut conns = Vec::with_capacity(idle);
    for _ in 0..idle {
        match TcpStream::connect(proxy.handle.addr).await {
            Ok(s) => conns.push(s),
            Err(e) => panic!("connection {} refused: {e}", conns.len()),
        }
    }
    for i in 0..20 {
        let prompt = format!("among the idle {i}");
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            proxy.post("/api/generate", generate("llama3.2", &prompt, false)),
        )
        .await
        .expect("answered in time");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["response"], expected_text(0, "llama3.2", &prompt, 16));
    }
    drop(conns);
}

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after_by_count_and_by_bytes() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| {
        a.max_queue = 3;
        a.max_queue_bytes = 1 << 20;
    })
    .await;
    let _holder = hold_slot(&proxy).await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        let (c, url) = (proxy.client.clone(), proxy.at("/api/generate"));
        waiting.push(tokio::spawn(async move {
            c.post(url)
                .json(&generate("llama3.2", &format!("w{i}"), false))
                .send()
                .await
        }));
    }
    let app = &proxy.handle.app;
    eventually(Duration::from_secs(5), "3 waiting", || async {
        app.fleet.read(|s| s.queue_len()) == 3
    })
    .await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "one too many", false))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("MAX_QUEUE"), "{v}");
    for w in waiting {
        w.abort();
    }

    // By bytes: a queue of 1 MB holds one 600 KB request, not two.
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| {
        a.max_queue = 100;
        a.max_queue_bytes = 1 << 20;
    })
    .await;
    let _holder = hold_slot(&proxy).await;
    let big = |i: u32| json!({"model": "llama3.2", "prompt": "x".repeat(600 << 10), "stream": false, "i": i});
    let (c, url) = (proxy.client.clone(), proxy.at("/api/generate"));
    let first_body = big(0);
    let first = tokio::spawn(async move { c.post(url).json(&first_body).send().await });
    let app = &proxy.handle.app;
    eventually(
        Duration::from_secs(5),
        "one big request waiting",
        || async { app.fleet.read(|s| s.queue_len()) == 1 },
    )
    .await;
    let r = proxy.post("/v1/completions", big(1)).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_QUEUE_BYTES"),
        "{v}"
    );
    // A small one still fits.
    let (c, url) = (proxy.client.clone(), proxy.at("/api/generate"));
    let small = tokio::spawn(async move {
        c.post(url)
            .json(&generate("llama3.2", "small", false))
            .send()
            .await
    });
    eventually(Duration::from_secs(5), "the small one queued", || async {
        app.fleet.read(|s| s.queue_len()) == 2
    })
    .await;
    first.abort();
    small.abort();
}

#[tokio::test]
async fn a_port_reused_by_another_server_gets_fresh_models_and_counters() {
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    let port = fleet.port_start;
    let row = |v: &Value| -> Value {
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["port"] == port)
            .cloned()
            .unwrap()
    };
    // Some history on the first backend: served requests and a failure.
    for i in 0..3 {
        let r = proxy
            .post(
                "/api/generate",
                generate("llama3.2", &format!("h{i}"), false),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    fleet.on(port).set_faults(FaultSpec {
        error_rate: 1.0,
        ..FaultSpec::default()
    });
    let r = proxy
        .post("/api/generate", generate("llama3.2", "fail", false))
        .await;
    assert_eq!(r.status(), 200, "retried on the other backend");
    r.bytes().await.unwrap();
    fleet.on(port).set_faults(FaultSpec::default());
    proxy.wait_healthy(2).await;
    let before = row(&proxy.get_json("/__proxy/backends").await);
    assert!(before["requests_served"].as_u64().unwrap() >= 1, "{before}");
    assert_eq!(before["failures"], 1, "{before}");
    assert!(before["last_error"].is_string(), "{before}");

    // Another server takes the port between two scans.
    let stranger = ServerSpec {
        models: vec![ModelSpec::named("mistral")],
        loaded: vec!["mistral".into()],
        version: "0.9.9".into(),
        ..ServerSpec::default()
    };
    fleet.on(port).restart(stranger).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the new server is recognised",
        || async {
            let b = row(&proxy.get_json("/__proxy/backends").await);
            b["version"] == "0.9.9"
        },
    )
    .await;
    let after = row(&proxy.get_json("/__proxy/backends").await);
    assert_eq!(after["models"], json!(["mistral:latest"]), "{after}");
    let loaded: Vec<String> = serde_json::from_value(after["loaded_models"].clone()).unwrap();
    assert!(loaded.iter().any(|m| m.starts_with("mistral")), "{after}");
    assert_eq!(after["requests_served"], 0, "{after}");
    assert_eq!(after["failures"], 0, "{after}");
    assert!(after["last_error"].is_null(), "{after}");
    assert_eq!(after["healthy"], true);
    // Requests follow the new model list.
    let r = proxy
        .post("/api/generate", generate("mistral", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], port.to_string().as_str());
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["x-corral-backend"], port.to_string().as_str());
}
