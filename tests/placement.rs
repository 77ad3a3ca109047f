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

/// Cache-aware must save at least half of what could be saved over
/// least-busy (down to the oracle, every shared prefix evaluated once). A
/// plain ratio to least-busy is not a test: on some seeds least-busy itself
/// comes within 2× of the oracle, and then even a perfect placement fails
/// it. The 2× target of the issue is the benchmark's, at full scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_save_most_of_what_the_oracle_saves() {
    let (ca, lb) = both(Kind::Batch, seed(), 0.25).await;
    assert!(
        ca.prompt_tokens >= ca.oracle_tokens,
        "no better than the oracle"
    );
    let possible = lb.prompt_tokens.saturating_sub(lb.oracle_tokens) as f64;
    let saved = lb.prompt_tokens as f64 - ca.prompt_tokens as f64;
    assert!(
        possible > 0.0 && saved >= 0.5 * possible,
        "cache-aware saved {saved} of the {possible} prompt tokens least-busy could have saved \
         (least-busy / cache-aware {:.2})",
        lb.prompt_tokens as f64 / ca.prompt_tokens as f64
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
