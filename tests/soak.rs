//! Chaos soak: 20,000 requests (`CORRAL_SOAK_REQUESTS` changes the count)
//! from 300 concurrent clients through corral to 30 one-slot simulated
//! backends, mixing streaming and non-streaming generate, chat and /v1 chat,
//! while a seeded controller kills a third of the backends at random moments
//! (mid-request and mid-stream), restarts them on the same port (sometimes as
//! another server with other models first), starts new ones on spare ports,
//! and makes others hang, answer 500 or answer garbage for a while.
//!
//! Enough capacity always stays up, so every request must end with its
//! correct answer, except:
//! - a stream whose backend died after its first byte, which cannot be
//!   retried: it must end with an error line or event, never silently;
//! - a backend's garbage 200, which corral passes through unchanged (it never
//!   buffers a body to judge it): counted, and checked against the number of
//!   garbage answers the simulators sent.
//!
//! It also checks that no backend ever held more than its one slot, that
//! clients who gave up (in the queue or mid-request) left nothing running on
//! a backend, and that the process's memory is back near its start.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestFleet, eventually, start_proxy};
use corral::sim::{FaultSpec, ModelSpec, ServerSpec, Stats, expected_text};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::time::Instant;

const DEFAULT_REQUESTS: u64 = 20_000;
const CLIENTS: usize = 300;
/// General backends; the first third churn (killed, restarted, replaced).
const BACKENDS: usize = 30;
const KILLABLE: std::ops::Range<usize> = 0..10;
/// Backends that hang, answer 500 or answer garbage for a while (never killed,
/// so that every garbage answer they count reached a client).
const FAULTY: std::ops::Range<usize> = 10..16;
/// Two more backends serve only `slowpoke`, for the clients that give up.
const SLOW_BACKENDS: usize = 2;
const GIVE_UP_CLIENTS: usize = 20;
const GIVE_UPS_PER_CLIENT: usize = 10;
const SPARE_PORTS: usize = 6;
const TOKENS: usize = 8;
const SEED: u64 = 20_261_108;

fn general_spec() -> ServerSpec {
    ServerSpec {
        token_interval: Duration::from_millis(1),
        tokens: TOKENS,
        parallel: 1,
        ..ServerSpec::default()
    }
}

/// Another server on a reused port: other models, another version.
fn stranger_spec() -> ServerSpec {
    ServerSpec {
        models: vec![ModelSpec::named("mistral")],
        version: "0.1.0-stranger".into(),
        ..general_spec()
    }
}

/// 10 tokens at 50 ms: 500 ms per answer, longer than any give-up deadline.
fn slow_spec() -> ServerSpec {
    ServerSpec {
        models: vec![ModelSpec::named("slowpoke")],
        token_interval: Duration::from_millis(50),
        tokens: 10,
        parallel: 1,
        ..ServerSpec::default()
    }
}

fn rss_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// The correct answer.
    Correct,
    /// A stream that broke after its first byte and said so.
    StreamErrorLine,
    /// The backend's garbage 200, passed through.
    Garbage,
    /// Anything else: a failure of the test.
    Wrong(String),
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Generate,
    Chat,
    V1Chat,
}

/// One request of the mix, its expected text, and how it ended.
async fn one_request(client: &reqwest::Client, base: &str, i: u64, rng: &mut StdRng) -> Ending {
    let kind = match rng.random_range(0..10) {
        0..=4 => Kind::Generate,
        5..=7 => Kind::Chat,
        _ => Kind::V1Chat,
    };
    let stream = rng.random_bool(0.4);
    let prompt = format!("soak request {i}");
    let expected = expected_text(0, "llama3.2", &prompt, TOKENS);
    let (path, body) = match kind {
        Kind::Generate => (
            "/api/generate",
            json!({"model": "llama3.2", "prompt": prompt, "stream": stream}),
        ),
        Kind::Chat => (
            "/api/chat",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": prompt}], "stream": stream}),
        ),
        Kind::V1Chat => (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": prompt}], "stream": stream}),
        ),
    };
    let response = match client
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Ending::Wrong(format!("{path}: send failed: {e}")),
    };
    let status = response.status();
    let started = status == 200;
    let mut bytes = Vec::new();
    let mut chunks = response.bytes_stream();
    let mut read_error = None;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(c) => bytes.extend_from_slice(&c),
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("this is not json") {
        return Ending::Garbage;
    }
    if !started {
        return Ending::Wrong(format!("{path} stream={stream}: {status} {text}"));
    }
    if let Some(e) = read_error {
        return Ending::Wrong(format!(
            "{path} stream={stream}: body broke without an error line: {e}: {text}"
        ));
    }
    let (content, error_line, finished) = if !stream {
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        let content = match kind {
            Kind::Generate => v["response"].as_str().map(str::to_owned),
            Kind::Chat => v["message"]["content"].as_str().map(str::to_owned),
            Kind::V1Chat => v["choices"][0]["message"]["content"]
                .as_str()
                .map(str::to_owned),
        };
        (content.unwrap_or_default(), false, true)
    } else {
        read_stream(kind, &text)
    };
    if error_line && expected.starts_with(&content) {
        return Ending::StreamErrorLine;
    }
    if finished && !error_line && content == expected {
        return Ending::Correct;
    }
    Ending::Wrong(format!(
        "{path} stream={stream}: content {content:?}, error line {error_line}, finished {finished}: {text}"
    ))
}

/// Content, whether an error line or event came, and whether the stream
/// reached its proper end (`done: true`, `[DONE]`).
fn read_stream(kind: Kind, text: &str) -> (String, bool, bool) {
    let mut content = String::new();
    let (mut error, mut finished) = (false, false);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let payload = match kind {
            Kind::V1Chat => match line.strip_prefix("data: ") {
                Some("[DONE]") => {
                    finished = true;
                    continue;
                }
                Some(p) => p,
                None => continue,
            },
            _ => line,
        };
        let v: Value = serde_json::from_str(payload).unwrap_or_default();
        if !v["error"].is_null() {
            error = true;
            continue;
        }
        let piece = match kind {
            Kind::Generate => v["response"].as_str(),
            Kind::Chat => v["message"]["content"].as_str(),
            Kind::V1Chat => v["choices"][0]["delta"]["content"].as_str(),
        };
        content.push_str(piece.unwrap_or_default());
        if v["done"] == true {
            finished = true;
        }
    }
    (content, error, finished)
}

/// What the chaos controller did and saw.
#[derive(Default)]
struct Chaos {
    kills: u64,
    kills_of_a_busy_backend: u64,
    strangers: u64,
    new_ports: u64,
    faults_set: u64,
    /// Stats of every finished server life (taken just before its kill).
    lives: Vec<Stats>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_ends_correctly_or_with_a_clear_error_through_chaos() {
    let requests: u64 = std::env::var("CORRAL_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_REQUESTS);
    let mut specs = vec![general_spec(); BACKENDS];
    specs.extend(std::iter::repeat_n(slow_spec(), SLOW_BACKENDS));
    let fleet = TestFleet::start(specs, SPARE_PORTS).await;
    let proxy = start_proxy(&fleet, |a| {
        a.max_retries = 10;
        a.max_concurrent_per_backend = 1;
        a.backend_read_timeout = Duration::from_secs(2);
        a.backend_connect_timeout = Duration::from_millis(500);
    })
    .await;
    let slow: Vec<_> = fleet.servers[BACKENDS..].to_vec();
    let base = proxy.url.clone();
    let rss_start = rss_kb("VmRSS:");
    let started = Instant::now();

    let done = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let chaos = tokio::spawn(run_chaos(fleet, Arc::clone(&done), requests, stop.clone()));

    let next = Arc::new(AtomicU64::new(0));
    let endings = Arc::new(Mutex::new(BTreeMap::<Ending, u64>::new()));
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = reqwest::Client::new();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, next, done) = (
            client.clone(),
            base.clone(),
            Arc::clone(&next),
            Arc::clone(&done),
        );
        let (endings, wrong) = (Arc::clone(&endings), Arc::clone(&wrong));
        clients.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(SEED ^ c as u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                let ending = one_request(&client, &base, i, &mut rng).await;
                let key = match &ending {
                    Ending::Wrong(detail) => {
                        wrong.lock().unwrap().push(detail.clone());
                        Ending::Wrong(String::new())
                    }
                    other => other.clone(),
                };
                *endings.lock().unwrap().entry(key).or_default() += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Clients that give up: after 20 to 200 ms, in the queue or mid-request,
    // always before a 500 ms answer can come.
    let gave_up = Arc::new(AtomicU64::new(0));
    let mut quitters = Vec::new();
    for c in 0..GIVE_UP_CLIENTS {
        let (client, base, gave_up) = (client.clone(), base.clone(), Arc::clone(&gave_up));
        quitters.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(SEED ^ 0xdead ^ c as u64);
            for i in 0..GIVE_UPS_PER_CLIENT {
                let patience = Duration::from_millis(rng.random_range(20..200));
                let body = json!({"model": "slowpoke", "prompt": format!("impatient {c} {i}"), "stream": rng.random_bool(0.5)});
                let attempt = async {
                    let r = client
                        .post(format!("{base}/api/generate"))
                        .json(&body)
                        .send()
                        .await?;
                    r.bytes().await
                };
                let outcome = tokio::time::timeout(patience, attempt).await;
                assert!(outcome.is_err(), "a slowpoke answer came before 500 ms");
                gave_up.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let all = async {
        for c in clients.into_iter().chain(quitters) {
            c.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .expect("the soak finished in time");
    let elapsed = started.elapsed();
    stop.cancel();
    let (fleet, chaos) = chaos.await.unwrap();

    // ===== answers =====
    let endings = endings.lock().unwrap().clone();
    let wrong = wrong.lock().unwrap().clone();
    let count = |e: Ending| endings.get(&e).copied().unwrap_or(0);
    let (correct, broken, garbage) = (
        count(Ending::Correct),
        count(Ending::StreamErrorLine),
        count(Ending::Garbage),
    );
    println!(
        "soak: {requests} requests, {CLIENTS} clients, {BACKENDS}+{SLOW_BACKENDS} backends, {:.1}s",
        elapsed.as_secs_f64()
    );
    println!(
        "soak: {correct} correct, {broken} streams broken mid-way with an error line, \
         {garbage} backend garbage answers passed through, {} failures",
        wrong.len()
    );
    println!(
        "soak: {} kills ({} of a backend in the middle of a request), {} port reuses by another server, \
         {} servers on new ports, {} fault phases",
        chaos.kills,
        chaos.kills_of_a_busy_backend,
        chaos.strangers,
        chaos.new_ports,
        chaos.faults_set
    );
    assert!(
        wrong.is_empty(),
        "{} of {requests} requests failed; first: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(correct + broken + garbage, requests);
    assert!(
        chaos.kills >= 10,
        "the chaos happened ({} kills)",
        chaos.kills
    );

    // ===== every backend life: the cap, and the garbage it sent =====
    let mut lives = chaos.lives;
    lives.extend(fleet.servers.iter().map(|s| s.stats()));
    for life in &lives {
        assert!(
            life.concurrent_peak <= 1,
            "a backend held {} requests at once: {life:?}",
            life.concurrent_peak
        );
        assert_eq!(life.oversubscribed, 0, "a request found its slot taken");
    }
    let garbage_sent: u64 = lives
        .iter()
        .map(|l| l.faults.get("garbage").copied().unwrap_or(0))
        .sum();
    assert_eq!(
        garbage, garbage_sent,
        "every garbage answer a client saw came from a backend, and every one was passed on"
    );

    // ===== clients that gave up left nothing running =====
    let gave_up = gave_up.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(5),
        "the slowpoke backends are idle",
        || async { slow.iter().all(|s| s.stats().in_flight == 0) },
    )
    .await;
    let slow_stats: Vec<Stats> = slow.iter().map(|s| s.stats()).collect();
    let reached: u64 = slow_stats
        .iter()
        .map(|s| s.requests.get("/api/generate").copied().unwrap_or(0))
        .sum();
    let cancelled: u64 = slow_stats.iter().map(|s| s.cancelled).sum();
    let completed: u64 = slow_stats.iter().map(|s| s.completed).sum();
    println!(
        "soak: {gave_up} clients gave up; {reached} of their requests reached a backend, \
         {cancelled} cancelled there, {completed} completed for nobody"
    );
    assert_eq!(gave_up, (GIVE_UP_CLIENTS * GIVE_UPS_PER_CLIENT) as u64);
    assert_eq!(
        completed, 0,
        "a backend finished an answer nobody waited for"
    );
    assert_eq!(
        reached, cancelled,
        "every request that reached a backend was cancelled when its client left"
    );
    assert!(
        reached < gave_up,
        "requests whose client left while queued never reached a backend"
    );

    // ===== the proxy is idle and memory came back =====
    eventually(Duration::from_secs(5), "the queue is empty", || async {
        proxy.handle.app.fleet.read(|s| {
            s.queue_len() == 0
                && s.queued_bytes() == 0
                && s.backends().values().all(|b| b.in_flight == 0)
        })
    })
    .await;
    drop(client);
    let rss_end = rss_kb("VmRSS:");
    let rss_peak = rss_kb("VmHWM:");
    println!(
        "soak: RSS {} MB at start, {} MB peak, {} MB at end",
        rss_start / 1024,
        rss_peak / 1024,
        rss_end / 1024
    );
    assert!(
        rss_end < rss_start + 50 * 1024,
        "memory grew by {} MB",
        (rss_end.saturating_sub(rss_start)) / 1024
    );
    proxy.handle.shutdown().await;
}

/// The seeded chaos controller. Bounded: at most 400 actions, and only while
/// requests are still running. Returns the fleet with every server running
/// again, and what it did.
async fn run_chaos(
    mut fleet: TestFleet,
    done: Arc<AtomicU64>,
    requests: u64,
    stop: tokio_util::sync::CancellationToken,
) -> (TestFleet, Chaos) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut chaos = Chaos::default();
    // (when, (server index, spec to restart with))
    let mut restarts: Vec<(Instant, (usize, ServerSpec))> = Vec::new();
    // (when, server index): faults to clear
    let mut clears: Vec<(Instant, usize)> = Vec::new();
    for _ in 0..400 {
        if stop.is_cancelled() || done.load(Ordering::Relaxed) >= requests * 95 / 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..120))).await;
        let now = Instant::now();
        for (_, (idx, spec)) in extract_due(&mut restarts, now) {
            let server = &fleet.servers[idx];
            // A stranger's life ends here too: keep its stats.
            if server.is_running() {
                chaos.lives.push(server.stats());
            }
            server
                .restart(spec)
                .await
                .expect("restart on the same port");
        }
        for (_, idx) in extract_due(&mut clears, now) {
            fleet.servers[idx].set_faults(FaultSpec::default());
        }
        match rng.random_range(0..10) {
            // Kill a churning backend; it comes back on its port later,
            // sometimes first as another server with other models.
            0..=5 => {
                let idx = rng.random_range(KILLABLE);
                let server = fleet.servers[idx].clone();
                if !server.is_running() || restarts.iter().any(|r| r.1.0 == idx) {
                    continue;
                }
                let stats = server.stats();
                if stats.in_flight > 0 {
                    chaos.kills_of_a_busy_backend += 1;
                }
                chaos.lives.push(stats);
                server.kill().await;
                chaos.kills += 1;
                let back = now + Duration::from_millis(rng.random_range(50..600));
                if rng.random_bool(0.25) {
                    chaos.strangers += 1;
                    restarts.push((back, (idx, stranger_spec())));
                    restarts.push((back + Duration::from_millis(800), (idx, general_spec())));
                } else {
                    restarts.push((back, (idx, general_spec())));
                }
            }
            // Hang, 500 or garbage for a while on one of the faulty backends.
            6..=8 => {
                let idx = rng.random_range(FAULTY);
                if clears.len() >= 2 || clears.iter().any(|c| c.1 == idx) {
                    continue;
                }
                let faults = match rng.random_range(0..3) {
                    0 => FaultSpec {
                        hang_rate: 1.0,
                        ..FaultSpec::default()
                    },
                    1 => FaultSpec {
                        error_rate: 1.0,
                        ..FaultSpec::default()
                    },
                    _ => FaultSpec {
                        garbage_rate: 0.05,
                        ..FaultSpec::default()
                    },
                };
                fleet.servers[idx].set_faults(faults);
                chaos.faults_set += 1;
                clears.push((
                    now + Duration::from_millis(rng.random_range(200..1000)),
                    idx,
                ));
            }
            // A new backend on a new port of the range.
            _ => {
                if !fleet.spare.is_empty() {
                    fleet.start_spare(general_spec()).await;
                    chaos.new_ports += 1;
                }
            }
        }
    }
    // Bring everything back for the final checks.
    restarts.sort_by_key(|r| r.0);
    for (_, (idx, spec)) in restarts {
        let server = &fleet.servers[idx];
        if server.is_running() {
            chaos.lives.push(server.stats());
        }
        server
            .restart(spec)
            .await
            .expect("restart on the same port");
    }
    for (_, idx) in clears {
        fleet.servers[idx].set_faults(FaultSpec::default());
    }
    (fleet, chaos)
}

/// Removes and returns the entries whose time has come.
fn extract_due<T>(list: &mut Vec<(Instant, T)>, now: Instant) -> Vec<(Instant, T)> {
    let (due, later): (Vec<_>, Vec<_>) = list.drain(..).partition(|e| e.0 <= now);
    *list = later;
    due
}
