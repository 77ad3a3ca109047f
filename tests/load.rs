//! Load with churn: 2,000 requests from 200 concurrent clients through corral
//! to 20 one-slot simulated backends, while some backends die mid-request and
//! come back. Every request must get its correct answer, and no backend may
//! ever hold two requests at once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{TestFleet, generate, start_proxy};
use corral::sim::{ServerSpec, expected_text};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const REQUESTS: u64 = 2_000;
const CLIENTS: usize = 200;
const BACKENDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_answered_correctly_while_backends_die_and_return() {
    let spec = ServerSpec {
        token_interval: Duration::from_millis(2),
        tokens: 8,
        parallel: 1,
        ..ServerSpec::default()
    };
    let fleet = Arc::new(TestFleet::uniform(BACKENDS, spec.clone()).await);
    let proxy = Arc::new(
        start_proxy(&fleet, |a| {
            a.max_retries = 5;
            a.max_concurrent_per_backend = 1;
        })
        .await,
    );

    // Peaks of server incarnations that were killed (a restart resets the counters).
    let peaks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicU64::new(0));
    let chaos = {
        let (fleet, peaks, done) = (Arc::clone(&fleet), Arc::clone(&peaks), Arc::clone(&done));
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(7);
            let mut kills = 0;
            // Bounded: at most 40 kills, and only while requests are still running.
            while kills < 40 && done.load(Ordering::Relaxed) < REQUESTS * 9 / 10 {
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
                // Only the first five backends churn: the others keep capacity.
                let victim = fleet.servers[rng.random_range(0..5)].clone();
                if !victim.is_running() {
                    continue;
                }
                let stats = victim.stats();
                peaks
                    .lock()
                    .unwrap()
                    .push((stats.concurrent_peak, stats.oversubscribed));
                victim.kill().await;
                kills += 1;
                let spec = spec.clone();
                let back_after = Duration::from_millis(rng.random_range(50..400));
                tokio::spawn(async move {
                    tokio::time::sleep(back_after).await;
                    victim.restart(spec).await.unwrap();
                });
            }
            kills
        })
    };

    let next = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (proxy, next, done) = (Arc::clone(&proxy), Arc::clone(&next), Arc::clone(&done));
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS {
                    return failures;
                }
                let prompt = format!("request {i}");
                let r = proxy
                    .post("/api/generate", generate("llama3.2", &prompt, false))
                    .await;
                let status = r.status();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if status != 200 || body["response"] != expected_text(0, "llama3.2", &prompt, 8) {
                    failures.push(format!("{i}: {status} {body}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let all = async {
        let mut failures = Vec::new();
        for c in clients {
            failures.extend(c.await.unwrap());
        }
        failures
    };
    let failures = tokio::time::timeout(Duration::from_secs(240), all)
        .await
        .expect("the load finished in time");
    let kills = chaos.await.unwrap();

    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(done.load(Ordering::Relaxed), REQUESTS);
    assert!(kills >= 5, "the chaos actually happened ({kills} kills)");
    let mut all_peaks = peaks.lock().unwrap().clone();
    all_peaks.extend(fleet.servers.iter().map(|s| {
        let st = s.stats();
        (st.concurrent_peak, st.oversubscribed)
    }));
    for (peak, over) in all_peaks {
        assert!(peak <= 1, "a backend held {peak} requests at once");
        assert_eq!(over, 0, "a request found its backend's slot taken");
    }
    println!(
        "load: {REQUESTS} requests, {CLIENTS} clients, {BACKENDS} backends, {kills} kills, 0 failures"
    );
}
