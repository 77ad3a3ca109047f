//! Fairness through HTTP, for `bench/run.sh fairness`: a proxy in front of
//! simulated backends, tenants named by `X-Corral-Tenant`.
//!
//! - `burst`: tenant A queues `bulk` requests at once; tenant B sends one
//!   interactive request every `every_ms`; prints B's queue waits
//!   (`X-Corral-Queue-Ms`) and the service time.
//! - `shares`: ten tenants queue unequal numbers of requests of unequal
//!   length at once; prints each tenant's slot-seconds over a window in
//!   which every tenant still had requests waiting, and Jain's index of
//!   them; then gives up the rest (they need not drain).
//!
//! The many waiting requests ride on HTTP/2 connections (200 streams each,
//! hyper's default), so that 20,000 of them fit in the descriptor limit.
//! Every mode is bounded in count and time and prints `key=value` pairs.

use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// One tenant's flood against another's occasional request.
    Burst {
        #[arg(long)]
        proxy: String,
        #[arg(long, default_value_t = 20_000)]
        bulk: usize,
        #[arg(long, default_value_t = 2000)]
        every_ms: u64,
        #[arg(long, default_value_t = 15)]
        probes: usize,
        /// Tokens per request (the sims' rate sets the service time).
        #[arg(long, default_value_t = 10)]
        tokens: usize,
    },
    /// Ten tenants with unequal demand.
    Shares {
        #[arg(long)]
        proxy: String,
        /// Requests of tenant i: base × (10 − i).
        #[arg(long, default_value_t = 150)]
        base: usize,
        /// Tokens per request of tenant i: tokens × (i + 1).
        #[arg(long, default_value_t = 2)]
        tokens: usize,
        /// Longest measuring window, in seconds.
        #[arg(long, default_value_t = 10)]
        window_secs: u64,
    },
}

/// One answered request.
#[derive(Debug, Clone, Copy)]
struct Done {
    sent: Instant,
    queue: Duration,
    ended: Instant,
    ok: bool,
}

fn body(tokens: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false,"options":{{"num_predict":{tokens}}}}}"#
    ))
}

fn request(
    authority: &str,
    tenant: &str,
    priority: &str,
    tokens: usize,
) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{authority}/api/generate"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("x-corral-tenant", tenant)
        .header("x-corral-priority", priority)
        .body(Full::new(body(tokens)))
        .expect("a valid request")
}

/// Opens `n` HTTP/2 (prior knowledge) connections to `authority`.
async fn h2_connections(authority: &str, n: usize) -> Vec<SendRequest<Full<Bytes>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .expect("connect to the proxy");
        tcp.set_nodelay(true).ok();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        out.push(send);
    }
    out
}

/// Sends one request and reads its answer.
async fn send(mut to: SendRequest<Full<Bytes>>, req: http::Request<Full<Bytes>>) -> Done {
    let sent = Instant::now();
    let answer = async {
        to.ready().await.ok()?;
        let resp = to.send_request(req).await.ok()?;
        let queue = resp
            .headers()
            .get("x-corral-queue-ms")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map(Duration::from_millis);
        let ok = resp.status().is_success();
        let body_ok = resp.into_body().collect().await.is_ok();
        Some((queue.unwrap_or_default(), ok && body_ok))
    };
    let (queue, ok) = answer.await.unwrap_or((Duration::ZERO, false));
    Done {
        sent,
        queue,
        ended: Instant::now(),
        ok,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() {
    match Cli::parse().mode {
        Mode::Burst {
            proxy,
            bulk,
            every_ms,
            probes,
            tokens,
        } => burst(proxy, bulk, every_ms, probes, tokens).await,
        Mode::Shares {
            proxy,
            base,
            tokens,
            window_secs,
        } => shares(proxy, base, tokens, window_secs).await,
    }
}

/// Waits until the proxy says `n` requests wait (or `deadline` passes).
async fn wait_queued(authority: &str, n: u64, deadline: Duration) -> u64 {
    let end = Instant::now() + deadline;
    let mut last = 0;
    while Instant::now() < end {
        if let Some(v) = backends(authority).await {
            last = v["queue"]["waiting"].as_u64().unwrap_or(0);
            if last >= n {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Waits until the queue stops growing (every request sent, the queue at
/// its deepest), or `deadline` passes; returns the deepest queue seen.
async fn wait_peak(authority: &str, deadline: Duration) -> u64 {
    let end = Instant::now() + deadline;
    let mut peak = 0;
    while Instant::now() < end {
        if let Some(v) = backends(authority).await {
            let waiting = v["queue"]["waiting"].as_u64().unwrap_or(0);
            if peak > 0 && waiting < peak {
                break;
            }
            peak = peak.max(waiting);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

async fn backends(authority: &str) -> Option<serde_json::Value> {
    let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/__proxy/backends")
        .header(http::header::HOST, authority)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let body = send
        .send_request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?;
    serde_json::from_slice(&body.to_bytes()).ok()
}

async fn burst(proxy: String, bulk: usize, every_ms: u64, probes: usize, tokens: usize) {
    let authority = proxy.trim_start_matches("http://").to_string();
    let conns = h2_connections(&authority, bulk.div_ceil(190).max(1)).await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..bulk {
        let to = conns[i % conns.len()].clone();
        flood.spawn(send(to, request(&authority, "a", "batch", tokens)));
    }
    let queued = wait_queued(
        &authority,
        (bulk as u64).saturating_sub(100),
        Duration::from_secs(60),
    )
    .await;
    let probe_conn = h2_connections(&authority, 1).await.remove(0);
    let mut waits = Vec::new();
    let mut service = Vec::new();
    let mut failed = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
    for _ in 0..probes {
        tick.tick().await;
        let d = send(
            probe_conn.clone(),
            request(&authority, "b", "interactive", tokens),
        )
        .await;
        if !d.ok {
            failed += 1;
            continue;
        }
        waits.push(d.queue.as_secs_f64() * 1e3);
        service.push((d.ended - d.sent).saturating_sub(d.queue).as_secs_f64() * 1e3);
    }
    flood.abort_all();
    waits.sort_by(f64::total_cmp);
    service.sort_by(f64::total_cmp);
    let service_p50 = quantile(&service, 0.5);
    println!(
        "bulk={bulk} queued={queued} probes={} failed={failed} b_wait_p50_ms={:.1} b_wait_p99_ms={:.1} b_wait_max_ms={:.1} service_p50_ms={service_p50:.1} p99_over_service={:.2}",
        waits.len(),
        quantile(&waits, 0.5),
        quantile(&waits, 0.99),
        waits.last().copied().unwrap_or(f64::NAN),
        quantile(&waits, 0.99) / service_p50,
    );
}

async fn shares(proxy: String, base: usize, tokens: usize, window_secs: u64) {
    const TENANTS: usize = 10;
    let authority = proxy.trim_start_matches("http://").to_string();
    // Tenant i: base × (10 − i) requests of tokens × (i + 1) tokens: ten
    // times the requests, a tenth of the length, from t9 to t0.
    let count = |t: usize| base * (TENANTS - t);
    let total: usize = (0..TENANTS).map(count).sum();
    let conns = h2_connections(&authority, total.div_ceil(190).max(1)).await;
    let mut all = tokio::task::JoinSet::new();
    let names: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    // Interleaved, so that every tenant is queued from the start.
    let mut n = 0;
    for round in 0..count(0) {
        for (t, name) in names.iter().enumerate() {
            if round < count(t) {
                let to = conns[n % conns.len()].clone();
                n += 1;
                all.spawn(send(
                    to,
                    request(&authority, name, "interactive", tokens * (t + 1)),
                ));
            }
        }
    }
    // The window opens once everything is queued, and closes after
    // `window_secs` or when a tenant runs out of waiters. Slot-seconds are
    // the proxy's own account (`/__proxy/backends` tenants: each finished
    // request's time from grant to release), read at both ends.
    let queued = wait_peak(&authority, Duration::from_secs(60)).await;
    let first = tenant_seconds(&authority, &names).await;
    let opened = Instant::now();
    let mut drained = None;
    while opened.elapsed() < Duration::from_secs(window_secs) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(v) = backends(&authority).await {
            let waiting = |name: &str| {
                v["tenants"]
                    .as_array()
                    .and_then(|ts| ts.iter().find(|t| t["name"] == name)?["waiting"].as_u64())
            };
            if let Some(t) = names.iter().position(|n| waiting(n).unwrap_or(0) == 0) {
                drained = Some(t);
                break;
            }
        }
    }
    let last = tenant_seconds(&authority, &names).await;
    let window = opened.elapsed();
    all.abort_all();
    let secs: Vec<f64> = first.iter().zip(&last).map(|(a, b)| b - a).collect();
    let sum: f64 = secs.iter().sum();
    let squares: f64 = secs.iter().map(|s| s * s).sum();
    let jain = sum * sum / (TENANTS as f64 * squares);
    let mean = sum / TENANTS as f64;
    let worst = secs
        .iter()
        .map(|s| (s / mean - 1.0).abs())
        .fold(0.0f64, f64::max);
    let shares: Vec<String> = secs.iter().map(|s| format!("{s:.2}")).collect();
    println!(
        "requests={total} queued={queued} drained_early={} window_s={:.2} jain={jain:.3} worst_off_fair={worst:.3} slot_seconds={}",
        drained.map_or("none".to_string(), |t| format!("t{t}")),
        window.as_secs_f64(),
        shares.join(",")
    );
}

/// Each tenant's slot-seconds as the proxy accounts them.
async fn tenant_seconds(authority: &str, names: &[String]) -> Vec<f64> {
    let v = backends(authority).await.unwrap_or_default();
    names
        .iter()
        .map(|name| {
            v["tenants"]
                .as_array()
                .and_then(|ts| {
                    ts.iter().find(|t| t["name"] == name.as_str())?["slot_seconds"].as_f64()
                })
                .unwrap_or(0.0)
        })
        .collect()
}
