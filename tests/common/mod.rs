//! Test harness: a simulated fleet on a race-free block of consecutive
//! loopback ports, a proxy scanning exactly that block, `corral` child
//! processes on ports they bind themselves (`child`), bounded polling and a
//! hang guard. No logic of its own beyond wiring: every assertion lives in
//! the tests.
#![allow(dead_code)]

pub mod child;

use std::future::Future;
use std::time::Duration;

use corral::config::ServeArgs;
use corral::proxy::{self, ProxyHandle};
use corral::sim::{ServerSpec, SimServer};
use tokio::net::TcpListener;

/// Polls `check` until it holds or `deadline` passes (then panics naming `what`).
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("not within {deadline:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long one awaited step may take before the test counts it as hung:
/// a guard that fails the test, never a measurement of how fast it was.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// Awaits `step`, failing the test (naming `what`) if it is still pending
/// after [`HANG_GUARD`].
pub async fn unhung<T>(what: &str, step: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, step).await {
        Ok(out) => out,
        Err(_) => panic!("hung for {HANG_GUARD:?}: {what}"),
    }
}

/// Binds `n` consecutive ports on 127.0.0.1 below the ephemeral range, so
/// the proxy's scan range holds only this test's servers. Retries on collision.
pub async fn bind_block(n: usize) -> Vec<TcpListener> {
    corral::sim::bind_consecutive([127, 0, 0, 1].into(), 0, n)
        .await
        .unwrap()
}

/// Simulated servers on consecutive ports, plus spare ports of the same
/// block to start servers on later.
pub struct TestFleet {
    /// The running servers, in port order.
    pub servers: Vec<SimServer>,
    /// Held, unused ports of the block, in port order.
    pub spare: Vec<TcpListener>,
    /// First port of the block.
    pub port_start: u16,
    /// Last port of the block.
    pub port_end: u16,
}

impl TestFleet {
    /// One server per spec, and `spare` more ports held for later.
    pub async fn start(specs: Vec<ServerSpec>, spare: usize) -> Self {
        let mut listeners = bind_block(specs.len() + spare).await;
        let port_start = listeners[0].local_addr().unwrap().port();
        let port_end = port_start + listeners.len() as u16 - 1;
        let spare = listeners.split_off(specs.len());
        let servers = corral::sim::start_fleet(listeners, specs).await.unwrap();
        Self {
            servers,
            spare,
            port_start,
            port_end,
        }
    }

    /// `n` servers with the same spec.
    pub async fn uniform(n: usize, spec: ServerSpec) -> Self {
        Self::start(vec![spec; n], 0).await
    }

    /// Starts a server on the next spare port.
    pub async fn start_spare(&mut self, spec: ServerSpec) -> SimServer {
        let listener = self.spare.remove(0);
        let server = SimServer::start(listener, spec).await.unwrap();
        self.servers.push(server.clone());
        server
    }

    /// The server on `port`.
    pub fn on(&self, port: u16) -> &SimServer {
        self.servers
            .iter()
            .find(|s| s.port() == port)
            .expect("a server on that port")
    }

    /// Completed inference requests over all servers.
    pub fn completed(&self) -> u64 {
        self.servers.iter().map(|s| s.stats().completed).sum()
    }
}

/// A running proxy and a client for it.
pub struct TestProxy {
    /// The proxy.
    pub handle: ProxyHandle,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// A plain HTTP client.
    pub client: reqwest::Client,
}

impl TestProxy {
    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// POSTs JSON and returns the response.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.at(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs JSON and returns the JSON answer, whatever its status.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.post(path, body).await.json().await.unwrap()
    }

    /// The row of backend `id` in `/__proxy/backends`, if it is there.
    pub async fn backend_row(&self, id: &str) -> Option<serde_json::Value> {
        backend_row_at(&self.url, id).await
    }

    /// The `/metrics` page as text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.at("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// GETs a JSON document.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.at(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Healthy backends as `/__proxy/health` says.
    pub async fn healthy(&self) -> u64 {
        self.get_json("/__proxy/health").await["healthy_backends"]
            .as_u64()
            .unwrap()
    }

    /// Waits until `/__proxy/health` reports `n` healthy backends.
    pub async fn wait_healthy(&self, n: u64) {
        wait_healthy_at(&self.url, n).await;
    }
}

/// Waits until the corral at `url` (in this process or a child, perhaps
/// still starting) reports `n` healthy backends on `/__proxy/health`.
pub async fn wait_healthy_at(url: &str, n: u64) {
    let client = reqwest::Client::new();
    let health = format!("{url}/__proxy/health");
    eventually(
        Duration::from_secs(10),
        &format!("{n} healthy backends at {url}"),
        || async {
            match client.get(&health).send().await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["healthy_backends"] == n),
                Err(_) => false,
            }
        },
    )
    .await;
}

/// GETs a JSON document from any corral (`url` in full).
pub async fn get_json_at(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The rows of `/__proxy/backends` of the corral at `base`.
pub async fn backend_rows_at(base: &str) -> Vec<serde_json::Value> {
    let v = get_json_at(&format!("{base}/__proxy/backends")).await;
    v["backends"]
        .as_array()
        .expect("a list of backends")
        .clone()
}

/// The row of backend `id` (its id as text or a port) of the corral at `base`.
pub async fn backend_row_at(base: &str, id: &str) -> Option<serde_json::Value> {
    backend_rows_at(base)
        .await
        .into_iter()
        .find(|b| b["id"] == id || b["port"].as_u64().is_some_and(|p| p.to_string() == id))
}

/// Proxy settings for tests: the fleet's block, fast scans, short timeouts.
pub fn test_args(fleet: &TestFleet) -> ServeArgs {
    let mut args = ServeArgs::defaults();
    args.proxy_host = "127.0.0.1".parse().unwrap();
    args.backend_host = "127.0.0.1".into();
    args.backend_port_start = fleet.port_start;
    args.backend_port_end = fleet.port_end;
    args.scan_interval = Duration::from_millis(200);
    args.probe_timeout = Duration::from_millis(500);
    args.queue_timeout = Duration::from_secs(30);
    args.backend_read_timeout = Duration::from_secs(10);
    args.shutdown_grace = Duration::from_secs(5);
    args
}

/// Starts a proxy over `fleet` with `tweak`ed settings and waits for every
/// running server of the fleet to be healthy.
pub async fn start_proxy(fleet: &TestFleet, tweak: impl FnOnce(&mut ServeArgs)) -> TestProxy {
    let mut args = test_args(fleet);
    tweak(&mut args);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = proxy::start(listener, args).unwrap();
    let url = format!("http://{}", handle.addr);
    let proxy = TestProxy {
        handle,
        url,
        client: reqwest::Client::new(),
    };
    let running = fleet.servers.iter().filter(|s| s.is_running()).count() as u64;
    proxy.wait_healthy(running).await;
    proxy
}

/// A simulated backend that takes `ms` per token and answers `tokens` tokens.
pub fn slow(ms: u64, tokens: usize) -> ServerSpec {
    ServerSpec {
        token_interval: Duration::from_millis(ms),
        tokens,
        ..ServerSpec::default()
    }
}

/// A simulated backend that answers every inference request with a 500.
pub fn failing() -> ServerSpec {
    let faults = corral::sim::FaultSpec {
        error_rate: 1.0,
        ..Default::default()
    };
    ServerSpec {
        faults,
        ..ServerSpec::default()
    }
}

/// A simulated backend whose every stream breaks after its first tokens
/// (a mid-stream error), two milliseconds a token.
pub fn breaking_midway() -> ServerSpec {
    let faults = corral::sim::FaultSpec {
        mid_stream_error_rate: 1.0,
        ..Default::default()
    };
    ServerSpec {
        faults,
        token_interval: Duration::from_millis(2),
        ..ServerSpec::default()
    }
}

/// The port of the backend that answered, from `X-Corral-Backend`.
pub fn backend_of(r: &reqwest::Response) -> u16 {
    r.headers()["x-corral-backend"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A generate request body.
pub fn generate(model: &str, prompt: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({ "model": model, "prompt": prompt, "stream": stream })
}

/// A spawned request, aborted (its client gone) when dropped.
pub struct Held(Option<tokio::task::JoinHandle<Result<reqwest::Response, reqwest::Error>>>);

impl Held {
    /// Waits for the response.
    pub async fn response(mut self) -> reqwest::Response {
        let task = self.0.take().expect("awaited once");
        task.await.unwrap().unwrap()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// POSTs JSON from a spawned task with extra `headers`; the request is
/// abandoned when the returned handle is dropped.
pub fn spawn_post(
    proxy: &TestProxy,
    path: &str,
    body: serde_json::Value,
    headers: &[(&'static str, &'static str)],
) -> Held {
    let mut request = proxy.client.post(proxy.at(path)).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Held(Some(tokio::spawn(request.send())))
}

/// Waits until `n` requests wait in corral's queue.
pub async fn wait_waiting(proxy: &TestProxy, n: u64) {
    eventually(Duration::from_secs(5), &format!("{n} waiting"), || async {
        proxy.get_json("/__proxy/backends").await["queue"]["waiting"] == n
    })
    .await;
}

/// Sends a request the backend never answers (`x-sim-fault: hang`) and waits
/// until it holds a slot: the one-slot fleet is then busy.
pub async fn hold_slot(proxy: &TestProxy) -> Held {
    let before = in_flight(proxy).await;
    let held = spawn_post(
        proxy,
        "/api/generate",
        generate("llama3.2", "hold", false),
        &[("x-sim-fault", "hang")],
    );
    eventually(Duration::from_secs(5), "the holder took a slot", || async {
        in_flight(proxy).await > before
    })
    .await;
    held
}

/// Requests in flight over all backends, as `/__proxy/backends` says.
pub async fn in_flight(proxy: &TestProxy) -> u64 {
    let v = proxy.get_json("/__proxy/backends").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["in_flight"].as_u64().unwrap())
        .sum()
}

/// The `(event, data)` pairs of a server-sent-events body, each frame
/// exactly `event: <name>\ndata: <json>`.
pub fn sse_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.trim_end()
        .split("\n\n")
        .map(|frame| {
            let (event, data) = frame.split_once('\n').expect("two lines");
            let name = event.strip_prefix("event: ").expect("event line");
            let data = data.strip_prefix("data: ").expect("data line");
            (name.to_string(), serde_json::from_str(data).unwrap())
        })
        .collect()
}
