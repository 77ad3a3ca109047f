//! SHARED_STATE benchmark (`bench/run.sh shared`): one fleet of one-slot
//! simulated backends, one `redis-server` on a loopback port, and in one
//! run, side by side:
//! - the added latency per request of the shared state: one client, one
//!   request at a time, through one instance without and with SHARED_STATE;
//! - fleet efficiency (ideal busy time over wall time) under the same
//!   saturating load through one instance and through three sharing Redis.
//!
//! Prints a Markdown table. Everything runs on 127.0.0.1 and stops by itself.
//!
//! ```text
//! cargo run --release --example shared_bench -- --backends 10 --requests 2000
//! ```

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use corral::config::ServeArgs;
use corral::proxy::{self, ProxyHandle};
use corral::sim::ServerSpec;
use tokio::net::TcpListener;
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    /// One-slot simulated backends.
    #[arg(long, default_value_t = 10)]
    backends: usize,
    /// Requests of the saturating load.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Concurrent clients of the saturating load.
    #[arg(long, default_value_t = 60)]
    clients: u64,
    /// Requests of the one-at-a-time latency runs.
    #[arg(long, default_value_t = 300)]
    sequential: u64,
    /// Milliseconds per token of the simulated backends (4 tokens each).
    #[arg(long, default_value_t = 5)]
    token_ms: u64,
}

const TOKENS: usize = 4;

/// The redis-server child, killed when dropped.
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis_port = probe.local_addr().unwrap().port();
    drop(probe);
    let _redis = Redis(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install -y redis-server)"),
    );
    let redis_url = format!("redis://127.0.0.1:{redis_port}/0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let listeners = corral::sim::bind_consecutive([127, 0, 0, 1].into(), 0, cli.backends)
        .await
        .unwrap();
    let port_start = listeners[0].local_addr().unwrap().port();
    let spec = ServerSpec {
        token_interval: Duration::from_millis(cli.token_ms),
        tokens: TOKENS,
        ..ServerSpec::default()
    };
    let servers = corral::sim::start_fleet(listeners, vec![spec; cli.backends])
        .await
        .unwrap();
    let port_end = port_start + cli.backends as u16 - 1;
    let args = |shared: Option<&str>| {
        let mut a = ServeArgs::defaults();
        a.proxy_host = "127.0.0.1".parse().unwrap();
        a.backend_host = "127.0.0.1".into();
        a.backend_port_start = port_start;
        a.backend_port_end = port_end;
        a.scan_interval = Duration::from_millis(500);
        a.queue_timeout = Duration::from_secs(120);
        a.shared_state = shared.map(str::to_string);
        a
    };

    let local = start(args(None), cli.backends).await;
    let lat_local = sequential(&local, cli.sequential).await;
    let service = Duration::from_millis(cli.token_ms * TOKENS as u64);
    let ideal = service.as_secs_f64() * cli.requests as f64 / cli.backends as f64;
    let wall_local = saturate(std::slice::from_ref(&local), cli.requests, cli.clients).await;
    local.shutdown().await;
    let one = start(args(Some(&redis_url)), cli.backends).await;
    let lat_shared = sequential(&one, cli.sequential).await;
    let wall_one = saturate(std::slice::from_ref(&one), cli.requests, cli.clients).await;
    one.shutdown().await;
    let mut three = Vec::new();
    for _ in 0..3 {
        three.push(start(args(Some(&redis_url)), cli.backends).await);
    }
    let wall_three = saturate(&three, cli.requests, cli.clients).await;
    for p in three {
        p.shutdown().await;
    }
    let peak = servers
        .iter()
        .map(|s| s.stats().concurrent_peak)
        .max()
        .unwrap_or(0);

    println!(
        "| {} one-slot backends, {} ms/request | value |",
        cli.backends,
        service.as_millis()
    );
    println!("|---|---|");
    println!(
        "| latency, 1 client, no SHARED_STATE (mean of {}) | {:.2} ms |",
        cli.sequential,
        lat_local * 1e3
    );
    println!(
        "| latency, 1 client, SHARED_STATE | {:.2} ms |",
        lat_shared * 1e3
    );
    println!(
        "| added latency per request | {:.2} ms |",
        (lat_shared - lat_local) * 1e3
    );
    println!(
        "| efficiency, 1 instance, no SHARED_STATE ({} requests, {} clients) | {:.1} % |",
        cli.requests,
        cli.clients,
        100.0 * ideal / wall_local
    );
    println!(
        "| efficiency, 1 instance + SHARED_STATE ({} requests, {} clients) | {:.1} % |",
        cli.requests,
        cli.clients,
        100.0 * ideal / wall_one
    );
    println!(
        "| efficiency, 3 instances + SHARED_STATE (same load) | {:.1} % |",
        100.0 * ideal / wall_three
    );
    println!(
        "| 3 shared instances / 1 plain instance (throughput) | {:.2} |",
        wall_local / wall_three
    );
    println!("| highest in-flight on any backend (cap 1) | {peak} |");
}

async fn start(args: ServeArgs, backends: usize) -> ProxyHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = proxy::start(listener, args).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.app.fleet.read(|s| s.healthy_count()) < backends {
        assert!(Instant::now() < deadline, "backends not healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle
}

fn body() -> serde_json::Value {
    serde_json::json!({ "model": "llama3.2", "prompt": "bench", "stream": false })
}

/// Mean seconds per request, one at a time.
async fn sequential(proxy: &ProxyHandle, n: u64) -> f64 {
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/generate", proxy.addr);
    let started = Instant::now();
    for _ in 0..n {
        let r = client.post(&url).json(&body()).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{status}: {text}");
    }
    started.elapsed().as_secs_f64() / n as f64
}

/// Wall seconds for `n` requests by `clients` tasks spread over `proxies`.
async fn saturate(proxies: &[ProxyHandle], n: u64, clients: u64) -> f64 {
    let urls: Arc<Vec<String>> = Arc::new(
        proxies
            .iter()
            .map(|p| format!("http://{}/api/generate", p.addr))
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (urls, next) = (Arc::clone(&urls), Arc::clone(&next));
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let url = &urls[i as usize % urls.len()];
                    let r = client.post(url).json(&body()).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed().as_secs_f64()
}
