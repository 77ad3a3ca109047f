//! The `corral` binary as a user runs it: bad settings exit 2 with one clear
//! line; `corral demo` serves and says what to try, and moves (traffic, jobs
//! coming and going) unless `--quiet`; SIGTERM lets an in-flight request
//! finish and exits 0.

mod common;

use common::child::{self, corral};

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{TestFleet, eventually, generate};
use corral::sim::expected_text;

#[test]
fn a_reversed_port_range_exits_2_with_a_clear_message() {
    let out = corral()
        .env("BACKEND_PORT_START", "24100")
        .env("BACKEND_PORT_END", "24000")
        .env("PROXY_PORT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BACKEND_PORT_START (24100) is greater than BACKEND_PORT_END (24000)"),
        "{err}"
    );
}

#[test]
fn unparsable_settings_exit_2_never_panic() {
    for (var, value) in [
        ("PROBE_TIMEOUT_SECONDS", "-1"),
        ("SCAN_INTERVAL_SECONDS", "soon"),
        ("BACKENDS", "ftp://gpu7"),
        ("MAX_RETRIES", "-3"),
        ("PROXY_PORT", "70000"),
    ] {
        let out = corral().env(var, value).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{var}={value}: {err}");
    }
}

#[tokio::test]
async fn demo_serves_a_fleet_and_stops_on_sigterm() {
    let (mut child, banner, url) = start_demo(&["--quiet"]).await;
    assert!(
        banner.starts_with("corral demo: 4 simulated Ollama backends"),
        "{banner}"
    );
    let client = reqwest::Client::new();
    common::wait_healthy_at(&url, 4).await;
    let r = client
        .post(format!("{url}/api/chat"))
        .json(&serde_json::json!({
            "model": "mistral", "stream": false, "messages": [{"role": "user", "content": "hi"}]
        }));
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["message"]["role"], "assistant");
    assert!(!body["message"]["content"].as_str().unwrap().is_empty());
    child::signal(&child, "TERM");
    let status = child::wait_exit(&mut child, Duration::from_secs(10), "corral exits").await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let spec = common::slow(100, 10);
    let fleet = TestFleet::uniform(1, spec).await;
    let mut command = corral();
    command
        .env("BACKEND_PORT_START", fleet.port_start.to_string())
        .env("BACKEND_PORT_END", fleet.port_end.to_string())
        .env("SCAN_INTERVAL_SECONDS", "0.2");
    let mut served = common::child::spawn(command).await;
    let url = served.url.clone();
    let client = reqwest::Client::new();
    common::wait_healthy_at(&url, 1).await;
    let request = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(format!("{url}/api/generate"))
                .json(&generate("llama3.2", "slow", false))
                .send()
                .await
        }
    });
    eventually(Duration::from_secs(5), "request in flight", || async {
        fleet.servers[0].stats().in_flight == 1
    })
    .await;
    served.terminate();
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["response"], expected_text(0, "llama3.2", "slow", 10));
    let status = child::wait_exit(&mut served.child, Duration::from_secs(10), "corral exits").await;
    assert!(status.success(), "{status}");
}

/// Starts `corral demo` with `extra` flags; returns the child, its first
/// line (the banner) and the proxy's URL. Every later line is read, so the
/// demo's stdout stays open while it runs.
async fn start_demo(extra: &[&str]) -> (Child, String, String) {
    let mut child = corral()
        .args(["demo", "--port", "0", "--backend-port-start", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().unwrap().unwrap());
        for _ in lines {}
    });
    let banner = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap()
        .unwrap();
    let url = banner
        .rsplit("proxy on ")
        .next()
        .unwrap()
        .trim()
        .to_string();
    (child, banner, url)
}

#[tokio::test]
async fn the_demo_moves_traffic_runs_and_jobs_come_and_go() {
    let (child, _, url) = start_demo(&[]).await;
    let client = reqwest::Client::new();
    let stats = |client: reqwest::Client, url: String| async move {
        client
            .get(format!("{url}/__proxy/stats"))
            .send()
            .await
            .ok()?
            .json::<serde_json::Value>()
            .await
            .ok()
    };
    // Registered jobs have host:port ids; the fixed fleet has ports. Polled
    // until traffic was counted and a job that joined has left. The first
    // job leaves on the third tick (12 s), and leaving may take the helper's
    // 10 s grace and a scan more: 90 s is that with room for a loaded machine.
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    eventually(
        Duration::from_secs(90),
        "traffic, a job that joined and one that left (jobs seen: above)",
        || async {
            let Some(s) = stats(client.clone(), url.clone()).await else {
                return false;
            };
            let now: std::collections::BTreeSet<String> = s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|b| b["id"].as_str().map(str::to_owned))
                .collect();
            let mut seen = seen.borrow_mut();
            let left = seen.iter().any(|j| !now.contains(j));
            if !now.is_subset(&seen) {
                seen.extend(now);
                eprintln!("jobs seen: {seen:?}");
            }
            left && s["totals"]["requests"].as_u64().unwrap_or(0) > 0
        },
    )
    .await;
    child::signal(&child, "TERM");
    let mut child = child;
    let status = child::wait_exit(&mut child, Duration::from_secs(20), "corral exits").await;
    assert!(status.success(), "{status}");
}
