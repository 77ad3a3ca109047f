//! Load generator for the scenarios of `bench/run.sh` that `wrk` cannot do:
//! a fixed count of requests with queue-wait headers (`fleet`), streams timed
//! line by line (`stream`), thousands of parked clients plus a health probe
//! (`queue`), and backends that come and go under a scanning proxy
//! (`discovery`). Every mode is bounded in count and time and prints one
//! line of `key=value` pairs for the script to read.
//!
//! ```text
//! cargo build --release --examples
//! target/release/examples/loadgen fleet --url http://127.0.0.1:11434 --clients 300 --requests 3000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// `requests` non-streaming generations over `clients` connections.
    Fleet {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 300)]
        clients: usize,
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// `streams` concurrent streams, spread over `urls`; times every line.
    Stream {
        #[arg(long, value_delimiter = ',')]
        urls: Vec<String>,
        #[arg(long, default_value_t = 200)]
        streams: usize,
        #[arg(long, default_value_t = 500)]
        tokens: usize,
        /// Streams start evenly over this time, so that TTFB is not the
        /// time to accept a burst of connections on one core.
        #[arg(long, default_value_t = 2000)]
        ramp_ms: u64,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// `clients` requests that wait, each on its own connection, for
    /// `hold_secs`, while `/__proxy/health` is timed; then all give up. The
    /// clients connect all at once (a storm), each connect timed.
    Queue {
        #[arg(long)]
        proxy: String,
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
    },
    /// Time from a backend's start until it serves a waiting request; then
    /// requests that reach a backend after it was killed.
    Discovery {
        #[arg(long)]
        proxy: String,
        /// The `corral` binary, to start `corral sim` with.
        #[arg(long)]
        corral: String,
        /// First of two free ports inside the proxy's scan range.
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

type Http = Client<HttpConnector, Full<Bytes>>;

fn client() -> Http {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(20_000)
        .build(connector)
}

fn generate_body(stream: bool, tokens: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"llama3.2","prompt":"Why is the sky blue?","stream":{stream},"options":{{"num_predict":{tokens}}}}}"#
    ))
}

fn post(url: &str, body: Bytes) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("{url}/api/generate"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("a valid request")
}

/// The `q` quantile (0..=1) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

#[tokio::main]
async fn main() {
    match Cli::parse().mode {
        Mode::Fleet {
            url,
            clients,
            requests,
            timeout_secs,
        } => fleet(url, clients, requests, timeout_secs).await,
        Mode::Stream {
            urls,
            streams,
            tokens,
            ramp_ms,
            timeout_secs,
        } => stream(urls, streams, tokens, ramp_ms, timeout_secs).await,
        Mode::Queue {
            proxy,
            clients,
            hold_secs,
        } => queue(proxy, clients, hold_secs).await,
        Mode::Discovery {
            proxy,
            corral,
            port,
            rounds,
        } => discovery(proxy, corral, port, rounds).await,
    }
}

// ===== fleet =====

async fn fleet(url: String, clients: usize, requests: usize, timeout_secs: u64) {
    let http = client();
    let next = Arc::new(AtomicU64::new(0));
    let body = generate_body(false, 10);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, next, url, body) = (http.clone(), next.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            // (latency ms, queue ms, ok)
            let mut out: Vec<(f64, f64, bool)> = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests as u64 {
                let t = Instant::now();
                let r = http.request(post(&url, body.clone())).await;
                let (ok, queue_ms) = match r {
                    Ok(resp) => {
                        let q = resp
                            .headers()
                            .get("x-corral-queue-ms")
                            .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                            .unwrap_or(0.0);
                        let ok = resp.status().is_success();
                        let body_ok = resp.into_body().collect().await.is_ok();
                        (ok && body_ok, q)
                    }
                    Err(_) => (false, 0.0),
                };
                out.push((t.elapsed().as_secs_f64() * 1e3, queue_ms, ok));
            }
            out
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(timeout_secs), async {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    })
    .await
    .unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    let ok = all.iter().filter(|r| r.2).count();
    let lat = sorted(all.iter().map(|r| r.0).collect());
    let queue = sorted(all.iter().map(|r| r.1).collect());
    println!(
        "requests={} ok={ok} errors={} seconds={secs:.3} rps={:.1} p50_ms={:.1} p99_ms={:.1} queue_p50_ms={:.1} queue_p99_ms={:.1}",
        all.len(),
        all.len() - ok,
        ok as f64 / secs,
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        quantile(&queue, 0.5),
        quantile(&queue, 0.99),
    );
}

// ===== stream =====

async fn stream(urls: Vec<String>, streams: usize, tokens: usize, ramp_ms: u64, timeout_secs: u64) {
    let http = client();
    let body = generate_body(true, tokens);
    let mut tasks = Vec::new();
    let begin = Instant::now();
    for i in 0..streams {
        let (http, body) = (http.clone(), body.clone());
        let url = urls[i % urls.len()].clone();
        let at = begin + Duration::from_millis(ramp_ms * i as u64 / streams as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let t = Instant::now();
            let resp = http.request(post(&url, body)).await.ok()?;
            let mut body = resp.into_body();
            let mut ttfb = None;
            let mut last = None::<Instant>;
            let mut gaps = Vec::with_capacity(tokens);
            let mut lines = 0usize;
            let mut reads = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let now = Instant::now();
                ttfb.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
                reads += 1;
                // A read that carries several lines means some were held
                // back: the gap before each extra line is zero.
                for _ in data.iter().filter(|b| **b == b'\n') {
                    if let Some(prev) = last {
                        gaps.push((now - prev).as_secs_f64() * 1e3);
                    }
                    last = Some(now);
                    lines += 1;
                }
            }
            Some((ttfb?, gaps, lines, reads))
        }));
    }
    let results = tokio::time::timeout(Duration::from_secs(timeout_secs), async {
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(Some(r)) = t.await {
                out.push(r);
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    let ttfb = sorted(results.iter().map(|r| r.0).collect());
    let gaps = sorted(results.iter().flat_map(|r| r.1.iter().copied()).collect());
    let lines: usize = results.iter().map(|r| r.2).sum();
    let reads: usize = results.iter().map(|r| r.3).sum();
    println!(
        "streams={} lines={lines} reads={reads} ttfb_p50_ms={:.3} ttfb_p99_ms={:.3} gap_p50_ms={:.3} gap_p99_ms={:.3} gap_max_ms={:.3} gaps_under_1ms={}",
        results.len(),
        quantile(&ttfb, 0.5),
        quantile(&ttfb, 0.99),
        quantile(&gaps, 0.5),
        quantile(&gaps, 0.99),
        gaps.last().copied().unwrap_or(f64::NAN),
        gaps.iter().filter(|g| **g < 1.0).count(),
    );
}

// ===== queue =====

async fn queue(proxy: String, clients: usize, hold_secs: u64) {
    let addr = proxy.trim_start_matches("http://").to_string();
    let connected = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    // Client 0 takes the one slot and keeps it until the others have given
    // up: a waiter that reaches the backend then is one that did not leave.
    let stop = tokio_util::sync::CancellationToken::new();
    let stop_holder = tokio_util::sync::CancellationToken::new();
    let connects = Arc::new(std::sync::Mutex::new(Vec::with_capacity(clients)));
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let (addr, connected, answered, connects) = (
            addr.clone(),
            connected.clone(),
            answered.clone(),
            connects.clone(),
        );
        let stop = if i == 0 {
            stop_holder.clone()
        } else {
            stop.clone()
        };
        tasks.push(tokio::spawn(async move {
            // A SYN the server dropped shows here as a second's retransmission.
            let t = Instant::now();
            let tcp = tokio::net::TcpStream::connect(&addr).await.ok()?;
            let connect_ms = t.elapsed().as_secs_f64() * 1e3;
            connects.lock().unwrap().push(connect_ms);
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                    .await
                    .ok()?;
            let request = http::Request::post("/api/generate")
                .header(http::header::HOST, &addr)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(generate_body(false, 16)))
                .ok()?;
            let wait = async {
                let resp = send.send_request(request).await.ok()?;
                resp.into_body().collect().await.ok()
            };
            connected.fetch_add(1, Ordering::Relaxed);
            // Dropping the connection at `stop` is the client giving up.
            tokio::select! {
                _ = conn => None,
                r = wait => { answered.fetch_add(1, Ordering::Relaxed); r.map(|_| ()) }
                () = stop.cancelled() => None,
            }
        }));
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let health = client();
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut health_errors = 0;
    let end = started + Duration::from_secs(hold_secs);
    while Instant::now() < end {
        let t = Instant::now();
        let req = http::Request::get(format!("{proxy}/__proxy/health"))
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        match tokio::time::timeout(Duration::from_secs(5), health.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => {
                let _ = r.into_body().collect().await;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            _ => health_errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let peak_connected = connected.load(Ordering::Relaxed);
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_holder.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let lat = sorted(lat);
    let connects = sorted(std::mem::take(&mut *connects.lock().unwrap()));
    println!(
        "clients={clients} connected={peak_connected} answered={} connect_p50_ms={:.2} connect_p99_ms={:.2} connect_max_ms={:.2} health_n={} health_errors={health_errors} health_p50_ms={:.2} health_p99_ms={:.2} health_max_ms={:.2}",
        answered.load(Ordering::Relaxed),
        quantile(&connects, 0.5),
        quantile(&connects, 0.99),
        connects.last().copied().unwrap_or(f64::NAN),
        lat.len(),
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );
}

// ===== discovery =====

/// A `corral sim` child process, killed when dropped.
struct Sim {
    _child: tokio::process::Child,
}

fn start_sim(corral: &str, port: u16) -> Sim {
    let child = tokio::process::Command::new(corral)
        .args(["sim", "--port-start", &port.to_string(), "--count", "1"])
        .args(["--tokens-per-second", "0", "--loaded", "llama3.2"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("corral sim starts");
    // The bench script kills these by PID if the loadgen itself is killed.
    if let (Ok(path), Some(pid)) = (std::env::var("BENCH_PID_FILE"), child.id()) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{pid}");
        }
    }
    Sim { _child: child }
}

/// `corral_backend_requests_total` of one backend, from `/metrics`.
async fn backend_requests(http: &Http, proxy: &str, port: u16) -> u64 {
    let req = http::Request::get(format!("{proxy}/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let Ok(resp) = http.request(req).await else {
        return 0;
    };
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let needle = format!("corral_backend_requests_total{{backend=\"{port}\"}} ");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn discovery(proxy: String, corral: String, port: u16, rounds: usize) {
    let http = client();
    let mut serve_ms = Vec::new();
    for _ in 0..rounds {
        // A request waits in the queue (no healthy backend), the backend
        // starts, the request is answered: that is "serves".
        let t0 = Instant::now();
        let sim = start_sim(&corral, port);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            http.request(post(&proxy, generate_body(false, 1))),
        )
        .await;
        let served = matches!(&r, Ok(Ok(resp)) if resp.status().is_success());
        serve_ms.push(if served {
            t0.elapsed().as_secs_f64() * 1e3
        } else {
            f64::INFINITY
        });
        drop(sim);
        // Wait until the proxy has noticed the death, at a random phase.
        tokio::time::sleep(Duration::from_millis(1500 + rand::random::<u64>() % 1000)).await;
    }
    // Killed: two backends, one client sending back to back; kill one.
    let a = start_sim(&corral, port);
    let b = start_sim(&corral, port + 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let errors = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let loop_task = {
        let (http, proxy, stop, errors, sent) = (
            http.clone(),
            proxy.clone(),
            stop.clone(),
            errors.clone(),
            sent.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let ok = match http.request(post(&proxy, generate_body(false, 1))).await {
                    Ok(r) => r.status().is_success() && r.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = backend_requests(&http, &proxy, port).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = backend_requests(&http, &proxy, port).await;
    stop.cancel();
    let _ = loop_task.await;
    drop(b);
    let s = sorted(serve_ms);
    println!(
        "rounds={rounds} serve_p50_ms={:.0} serve_max_ms={:.0} killed_attempts_after_kill={} client_errors={} requests={}",
        quantile(&s, 0.5),
        s.last().copied().unwrap_or(f64::NAN),
        after.saturating_sub(before),
        errors.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
    );
}
