//! The placement benchmark at a small scale with a random seed (printed, so
//! a failure can be replayed with PLACEMENT_SEED): corral cache-aware
//! against least-busy on the same simulated fleets, checking the ratios
//! that do not depend on time — prompt tokens the fleet evaluated and model
//! loads. Drives the real proxy and simulated servers in-process.

#[path = "../examples/placement/workload.rs"]
mod workload;

use corral::config::Routing;
use workload::{Kind, Measured, Target, measure};

fn seed() -> u64 {
    let seed = std::env::var("PLACEMENT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("PLACEMENT_SEED={seed}");
    seed
}

async fn both(kind: Kind, seed: u64, scale: f64) -> (Measured, Measured) {
    let ca = measure(kind, &Target::Corral(Routing::CacheAware), seed, scale, 0).await;
    let lb = measure(kind, &Target::Corral(Routing::LeastBusy), seed, scale, 0).await;
    eprintln!("{}: cache-aware {ca:?}\nleast-busy {lb:?}", kind.name());
    assert_eq!((ca.errors, lb.errors), (0, 0));
    (ca, lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_are_evaluated_at_least_twice_less_often() {
    let (ca, lb) = both(Kind::Batch, seed(), 0.25).await;
    let ratio = lb.prompt_tokens as f64 / ca.prompt_tokens as f64;
    assert!(
        ratio >= 2.0,
        "least-busy / cache-aware prompt tokens {ratio:.2}"
    );
    assert!(
        ca.prompt_tokens >= ca.oracle_tokens,
        "no better than the oracle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drifting_models_are_loaded_less_often() {
    let (ca, lb) = both(Kind::Mixed, seed(), 0.3).await;
    assert!(
        ca.loads < lb.loads,
        "cache-aware {} loads, least-busy {}",
        ca.loads,
        lb.loads
    );
    assert!(ca.loads >= ca.oracle_loads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_short_prompts_are_placed_as_least_busy_would() {
    let (ca, lb) = both(Kind::Control, seed(), 0.2).await;
    assert_eq!(ca.prompt_tokens, lb.prompt_tokens);
    assert_eq!((ca.loads, lb.loads), (0, 0));
}
