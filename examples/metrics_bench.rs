//! The metric work of one answered request, timed in-process: the family
//! look-ups the request path made before issue 14 (a label set built and
//! hashed per series, the model label allocated, a mutex to note the
//! backend) against the handles `metrics::series` resolves once per
//! (endpoint, model) and per backend. Same counters, same exposition.
//!
//! `cargo run --release --example metrics_bench` (ROUNDS, REQUESTS to change
//! the size; both ways alternate, the median round is reported).

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral::metrics::{
    BackendLabels, EndpointLabels, Metrics, ModelLabels, RequestLabels, TokenLabels,
};

const ENDPOINT: &str = "/api/generate";
const MODEL: &str = "llama3.2:latest";
const BACKENDS: usize = 8;

/// The request path's metric calls as they were: every series looked up
/// through its family by a label set built for the call.
fn before(m: &Metrics, seen: &Mutex<HashSet<Arc<str>>>, backend: &Arc<str>, d: Duration) {
    {
        let mut seen = seen.lock().unwrap();
        if !seen.contains(backend) {
            seen.insert(Arc::clone(backend));
        }
    }
    m.backend_requests
        .get_or_create(&BackendLabels {
            backend: Arc::clone(backend),
        })
        .inc();
    let model: Arc<str> = Arc::from(black_box(MODEL));
    m.time_to_first_byte
        .get_or_create(&EndpointLabels { endpoint: ENDPOINT })
        .observe(d.as_secs_f64());
    m.requests
        .get_or_create(&RequestLabels {
            endpoint: ENDPOINT,
            model: Arc::clone(&model),
            status: 200,
        })
        .inc();
    m.totals.request(200);
    m.request_duration
        .get_or_create(&EndpointLabels { endpoint: ENDPOINT })
        .observe(d.as_secs_f64());
    for (direction, n) in [("in", 26), ("out", 94)] {
        m.tokens
            .get_or_create(&TokenLabels {
                model: Arc::clone(&model),
                direction,
            })
            .inc_by(n);
    }
    m.tokens_per_second
        .get_or_create(&ModelLabels { model })
        .observe(47.0);
}

/// The same calls through the kept handles.
fn after(m: &Metrics, backend: &Arc<str>, d: Duration) {
    m.backend_attempted(backend);
    let series = m.series(ENDPOINT, black_box(MODEL));
    series.first_byte(m, d);
    series.request_done(m, 200, d);
    series.tokens(m, 26, 94, Some(2.0));
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = env("ROUNDS", 7);
    let requests = env("REQUESTS", 1_000_000);
    let backends: Vec<Arc<str>> = (0..BACKENDS)
        .map(|i| Arc::from(format!("{}", 24001 + i)))
        .collect();
    let d = Duration::from_millis(3);
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let m = Metrics::new();
        let seen = Mutex::new(HashSet::new());
        let start = Instant::now();
        for i in 0..requests {
            before(&m, &seen, &backends[i % BACKENDS], d);
        }
        old.push(start.elapsed().as_nanos() as f64 / requests as f64);
        let m = Metrics::new();
        let start = Instant::now();
        for i in 0..requests {
            after(&m, &backends[i % BACKENDS], d);
        }
        new.push(start.elapsed().as_nanos() as f64 / requests as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (o, n) = (median(&mut old), median(&mut new));
    println!("metric work per request, median of {rounds} rounds of {requests}:");
    println!("  family look-ups (before): {o:.0} ns");
    println!("  kept handles (after):     {n:.0} ns");
    println!("  before / after:           {:.2}", o / n);
}
