//! The placement benchmark's workloads, fleets and measurements, shared by
//! `examples/placement` (bench/run.sh placement) and `tests/placement.rs`
//! (the small-scale CI check). Each run starts a fresh simulated fleet with
//! the cost model on a block of loopback ports, sends one workload through
//! one target (corral cache-aware, corral least-busy, or an nginx already
//! pointed at that block), and reads the fleet's counters. Bounded in count
//! and time; talks only to 127.0.0.1.
#![allow(dead_code)]

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use corral::config::{Routing, ServeArgs};
use corral::sim::tokens::{Token, push_text, render_chat, render_prompt};
use corral::sim::{ModelSpec, ServerSpec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The four workloads of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Batch,
    Mixed,
    Control,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Chat, Kind::Batch, Kind::Mixed, Kind::Control];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Batch => "batch",
            Kind::Mixed => "mixed",
            Kind::Control => "control",
        }
    }
}

/// Where the requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Corral(Routing),
    /// An nginx `least_conn` over the fleet's ports, at this URL.
    Nginx(String),
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Corral(Routing::CacheAware) => "corral cache-aware",
            Target::Corral(Routing::LeastBusy) => "corral least-busy",
            Target::Nginx(_) => "nginx least_conn",
        }
    }
}

/// Backends in every fleet.
pub const BACKENDS: usize = 4;
/// Models of the mixed workload (more than the fleet holds at once).
const MIXED_MODELS: [&str; 6] = ["m0", "m1", "m2", "m3", "m4", "m5"];

/// One server of the fleet for `kind`.
pub fn server(kind: Kind) -> ServerSpec {
    let base = ServerSpec {
        parallel: 1,
        prompt_speed: 2000.0,
        // About four long conversations or few-shot prefixes of host memory.
        prompt_cache: 8192,
        check_host: true,
        ..ServerSpec::default()
    };
    match kind {
        Kind::Chat => ServerSpec {
            models: vec![ModelSpec::named("llama3.2")],
            loaded: vec!["llama3.2".into()],
            token_interval: Duration::from_millis(10),
            tokens: 24,
            ..base
        },
        Kind::Batch => ServerSpec {
            models: vec![ModelSpec::named("llama3.2")],
            loaded: vec!["llama3.2".into()],
            token_interval: Duration::from_millis(10),
            tokens: 8,
            ..base
        },
        Kind::Mixed => ServerSpec {
            models: MIXED_MODELS.iter().map(|m| ModelSpec::named(m)).collect(),
            max_loaded: 1,
            load_time: Duration::from_millis(1500),
            token_interval: Duration::from_millis(10),
            tokens: 16,
            ..base
        },
        Kind::Control => ServerSpec {
            models: vec![ModelSpec::named("llama3.2")],
            loaded: vec!["llama3.2".into()],
            token_interval: Duration::from_millis(5),
            tokens: 8,
            ..base
        },
    }
}

/// What one request sent and got.
struct Sent {
    model: String,
    prompt: Vec<Token>,
    answer: String,
    ttft: Duration,
}

/// What one (workload, target) run measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub requests: usize,
    pub errors: usize,
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    pub makespan: f64,
    pub throughput: f64,
    pub prompt_tokens: u64,
    pub loads: u64,
    pub oracle_tokens: u64,
    pub oracle_loads: u64,
}

/// Runs `kind` through `target` on a fresh fleet bound at `port_start`
/// (0 = any free block). `nginx` targets need a fixed `port_start`.
pub async fn measure(
    kind: Kind,
    target: &Target,
    seed: u64,
    scale: f64,
    port_start: u16,
) -> Measured {
    let listeners = corral::sim::bind_consecutive([127, 0, 0, 1].into(), port_start, BACKENDS)
        .await
        .expect("a block of ports for the fleet");
    let first = listeners[0].local_addr().unwrap().port();
    let specs = vec![server(kind); BACKENDS];
    let sims = corral::sim::start_fleet(listeners, specs)
        .await
        .expect("the fleet starts");
    let (url, proxy) = match target {
        Target::Corral(routing) => {
            let mut args = ServeArgs::defaults();
            args.proxy_host = "127.0.0.1".parse().unwrap();
            args.backend_host = "127.0.0.1".into();
            args.backend_port_start = first;
            args.backend_port_end = first + BACKENDS as u16 - 1;
            args.scan_interval = Duration::from_millis(500);
            args.max_concurrent_per_backend = 0;
            args.routing = *routing;
            args.queue_timeout = Duration::from_secs(120);
            args.backend_read_timeout = Duration::from_secs(120);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let handle = corral::proxy::start(l, args).unwrap();
            let url = format!("http://{}", handle.addr);
            wait_healthy(&url).await;
            (url, Some(handle))
        }
        Target::Nginx(url) => (url.clone(), None),
    };
    let client = reqwest::Client::new();
    let started = Instant::now();
    let sent = match kind {
        Kind::Chat => chat(&client, &url, seed, scale).await,
        Kind::Batch => batch(&client, &url, seed, scale).await,
        Kind::Mixed => mixed(&client, &url, seed, scale).await,
        Kind::Control => control(&client, &url, seed, scale).await,
    };
    let makespan = started.elapsed().as_secs_f64();
    let (mut prompt_tokens, mut loads) = (0, 0);
    for s in &sims {
        let st = s.stats();
        prompt_tokens += st.prompt_tokens_evaluated;
        loads += st.loads;
    }
    if let Some(p) = proxy {
        // Why requests went where they went, for the run's log.
        if let Ok(r) = client.get(format!("{url}/metrics")).send().await {
            let text = r.text().await.unwrap_or_default();
            let why: Vec<&str> = text
                .lines()
                .filter(|l| {
                    [
                        "corral_placements_total",
                        "corral_prefix_hits_total",
                        "corral_model_loads_caused_total",
                        "corral_prompt_tokens_saved_total",
                    ]
                    .iter()
                    .any(|m| l.starts_with(m))
                })
                .collect();
            eprintln!("{} / {}: {}", kind.name(), target.name(), why.join("; "));
        }
        p.shutdown().await;
    }
    for s in &sims {
        s.kill().await;
    }
    let ok: Vec<&Sent> = sent.iter().flatten().collect();
    let mut ttfts: Vec<f64> = ok.iter().map(|s| s.ttft.as_secs_f64()).collect();
    ttfts.sort_by(f64::total_cmp);
    let (oracle_tokens, oracle_loads) = oracle(&ok);
    Measured {
        requests: sent.len(),
        errors: sent.len() - ok.len(),
        ttft_p50: quantile(&ttfts, 0.5),
        ttft_p99: quantile(&ttfts, 0.99),
        makespan,
        throughput: ok.len() as f64 / makespan,
        prompt_tokens,
        loads,
        oracle_tokens,
        oracle_loads,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn wait_healthy(url: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    let health = format!("{url}/__proxy/health");
    loop {
        let n = match reqwest::get(&health).await {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["healthy_backends"].as_u64()),
            Err(_) => None,
        };
        if n == Some(BACKENDS as u64) {
            return;
        }
        assert!(
            Instant::now() < end,
            "the fleet did not become healthy behind {url}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every shared prefix evaluated once: prompt tokens not already evaluated
/// or generated by an earlier request of the same model (at least one per
/// request, as the sim evaluates); and every model loaded once.
fn oracle(sent: &[&Sent]) -> (u64, u64) {
    let mut seen: HashSet<u64> = HashSet::new();
    let mut tokens = 0;
    let mut models = HashSet::new();
    for s in sent {
        models.insert(s.model.clone());
        let mut chain = hash((&s.model, 0u32));
        let mut new = 0;
        for t in &s.prompt {
            chain = hash((chain, *t));
            if seen.insert(chain) {
                new += 1;
            }
        }
        tokens += new.max(1);
        let mut answer = Vec::new();
        push_text(&mut answer, &s.answer);
        for t in answer {
            chain = hash((chain, t));
            seen.insert(chain);
        }
    }
    (tokens, models.len() as u64)
}

fn hash(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

fn words(rng: &mut StdRng, n: usize, tag: &str) -> String {
    (0..n)
        .map(|_| format!("{tag}{}", rng.random_range(0..5000u32)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn scaled(n: usize, scale: f64) -> usize {
    ((n as f64 * scale).round() as usize).max(1)
}

/// Sends one streamed request; `None` on any failure.
async fn send(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    body: Value,
    prompt: Vec<Token>,
) -> Option<Sent> {
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let t0 = Instant::now();
    let mut r = client
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let mut bytes = Vec::new();
    let mut ttft = None;
    while let Some(chunk) = r.chunk().await.ok()? {
        ttft.get_or_insert_with(|| t0.elapsed());
        bytes.extend_from_slice(&chunk);
    }
    let mut answer = String::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).ok()?;
        if v.get("error").is_some() {
            return None;
        }
        let piece = v["message"]["content"].as_str().or(v["response"].as_str());
        answer.push_str(piece.unwrap_or_default());
    }
    Some(Sent {
        model,
        prompt,
        answer,
        ttft: ttft?,
    })
}

/// Multi-turn conversations: a long system prompt (one of four), growing
/// history, think time between turns.
async fn chat(client: &reqwest::Client, url: &str, seed: u64, scale: f64) -> Vec<Option<Sent>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let systems: Vec<String> = (0..4)
        .map(|i| words(&mut rng, 1200, &format!("sys{i}w")))
        .collect();
    let conversations = scaled(16, scale);
    let turns = 6;
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..conversations {
        let mut rng = StdRng::seed_from_u64(seed ^ hash(("chat", c)));
        let system = systems[c % systems.len()].clone();
        let start = Duration::from_millis(rng.random_range(0..4000));
        let (client, url, out) = (client.clone(), url.to_owned(), Arc::clone(&out));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(start).await;
            let mut messages = vec![("system".to_owned(), system)];
            for t in 0..turns {
                messages.push(("user".into(), words(&mut rng, 40, &format!("c{c}t{t}u"))));
                let body = json!({
                    "model": "llama3.2",
                    "messages": messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>(),
                });
                let prompt = render_chat(messages.iter().map(|(r, c)| (r.as_str(), c.as_str())));
                let sent = send(&client, &url, "/api/chat", body, prompt).await;
                let Some(s) = sent else {
                    out.lock().await.push(None);
                    return;
                };
                messages.push(("assistant".into(), s.answer.clone()));
                out.lock().await.push(Some(s));
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(out)
        .map(Mutex::into_inner)
        .unwrap_or_default()
}

/// Several jobs, each with its own long few-shot prefix, interleaved, sent
/// by a pool of clients.
async fn batch(client: &reqwest::Client, url: &str, seed: u64, scale: f64) -> Vec<Option<Sent>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xba7c);
    let jobs = 6;
    let items = scaled(12, scale);
    let prefixes: Vec<String> = (0..jobs)
        .map(|j| words(&mut rng, 2500, &format!("job{j}w")))
        .collect();
    let mut queue = Vec::new();
    for i in 0..items {
        for (j, prefix) in prefixes.iter().enumerate() {
            let prompt = format!(
                "{prefix} item {}",
                words(&mut rng, 30, &format!("j{j}i{i}x"))
            );
            queue.push(prompt);
        }
    }
    let requests: Vec<(Value, Vec<Token>)> = queue
        .into_iter()
        .map(|p| {
            let tokens = render_prompt(None, &p);
            (json!({"model": "llama3.2", "prompt": p}), tokens)
        })
        .collect();
    pool(client, url, "/api/generate", requests, 24).await
}

/// Short prompts over more models than the fleet can hold, with demand
/// drifting between them, arriving at a steady rate.
async fn mixed(client: &reqwest::Client, url: &str, seed: u64, scale: f64) -> Vec<Option<Sent>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x313d);
    let n = scaled(240, scale);
    let phases = 4;
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for i in 0..n {
        let phase = i * phases / n;
        // The hot set moves by one model per phase: 60 % / 30 % / 10 %.
        let pick: f64 = rng.random();
        let offset = if pick < 0.6 {
            0
        } else if pick < 0.9 {
            1
        } else {
            2
        };
        let model = MIXED_MODELS[(phase + offset) % MIXED_MODELS.len()];
        let prompt = words(&mut rng, 12, &format!("q{i}w"));
        let at = Duration::from_millis(i as u64 * 150);
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(t0 + at).await;
            let tokens = render_prompt(None, &prompt);
            send(
                &client,
                &url,
                "/api/generate",
                json!({"model": model, "prompt": prompt}),
                tokens,
            )
            .await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.ok().flatten());
    }
    out
}

/// Unrelated short prompts from a pool of clients: affinity can only cost.
async fn control(client: &reqwest::Client, url: &str, seed: u64, scale: f64) -> Vec<Option<Sent>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc047);
    let n = scaled(600, scale);
    let requests = (0..n)
        .map(|i| {
            let p = words(&mut rng, 10, &format!("r{i}w"));
            let tokens = render_prompt(None, &p);
            (json!({"model": "llama3.2", "prompt": p}), tokens)
        })
        .collect();
    pool(client, url, "/api/generate", requests, 16).await
}

/// Sends `requests` in order from `clients` concurrent clients.
async fn pool(
    client: &reqwest::Client,
    url: &str,
    path: &'static str,
    requests: Vec<(Value, Vec<Token>)>,
    clients: usize,
) -> Vec<Option<Sent>> {
    let queue = Arc::new(Mutex::new(requests.into_iter()));
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, queue, out) = (
            client.clone(),
            url.to_owned(),
            Arc::clone(&queue),
            Arc::clone(&out),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().await.next();
                let Some((body, tokens)) = next else { return };
                let sent = send(&client, &url, path, body, tokens).await;
                out.lock().await.push(sent);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(out)
        .map(Mutex::into_inner)
        .unwrap_or_default()
}
