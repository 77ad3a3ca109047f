//! Scheduler tests: selection order, queue hand-off, rejections, and a seeded
//! random workload with the invariants checked after every step.

use super::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn limits(cap: u32) -> Limits {
    Limits {
        cap,
        max_queue: 1000,
        max_queue_bytes: 1 << 20,
    }
}

fn add(s: &mut Scheduler<u32>, port: u16, models: &[&str], loaded: &[&str]) {
    let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
    s.add_backend(Arc::new(Target::new(BackendId::Port(port), &uri)));
    let report = ProbeReport {
        models: models.iter().map(|m| m.to_string()).collect(),
        loaded: loaded.iter().map(|m| m.to_string()).collect(),
        ..ProbeReport::default()
    };
    s.apply_probe(&BackendId::Port(port), report);
}

fn want(model: &str) -> Want {
    Want {
        model: Some(ModelName::parse(model)),
        tried: Vec::new(),
        signature: None,
    }
}

fn granted_port(d: Decision) -> u16 {
    match d {
        Decision::Granted(t) => t.id.port().unwrap(),
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn target(s: &Scheduler<u32>, port: u16) -> Arc<Target> {
    Arc::clone(&s.backends()[&BackendId::Port(port)].target)
}

#[test]
fn least_in_flight_wins_and_ties_go_to_the_lowest_port() {
    let mut s = Scheduler::new(limits(2));
    for port in [24002, 24000, 24001] {
        add(&mut s, port, &["llama3"], &[]);
    }
    let order: Vec<u16> = (0..6)
        .map(|_| granted_port(s.try_acquire(&want("llama3"))))
        .collect();
    assert_eq!(order, [24000, 24001, 24002, 24000, 24001, 24002]);
    assert!(matches!(s.try_acquire(&want("llama3")), Decision::Wait));
}

#[test]
fn a_backend_with_the_model_loaded_is_preferred_under_a_cap() {
    let mut s = Scheduler::new(limits(4));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &["llama3:latest"]);
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24001);
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24001);
}

#[test]
fn without_a_cap_load_comes_before_loaded() {
    let mut s = Scheduler::new(limits(0));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &["llama3"]);
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24001);
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24000);
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24001);
}

#[test]
fn only_backends_that_listed_the_model_are_eligible() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["mistral"], &[]);
    add(&mut s, 24001, &["llama3:latest"], &[]);
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24001);
    assert!(matches!(
        s.try_acquire(&want("Llama3:latest")),
        Decision::Wait
    ));
}

#[test]
fn a_model_never_listed_is_unknown_while_some_backend_is_healthy() {
    let mut s = Scheduler::new(limits(1));
    assert!(
        matches!(s.try_acquire(&want("ghost")), Decision::Wait),
        "no backend yet: wait"
    );
    add(&mut s, 24000, &["llama3"], &[]);
    assert!(matches!(
        s.try_acquire(&want("ghost")),
        Decision::Rejected(Rejection::UnknownModel)
    ));
}

#[test]
fn a_model_only_on_unhealthy_backends_waits() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["mistral"], &[]);
    s.mark_unhealthy(&BackendId::Port(24000), "down".into());
    assert!(matches!(s.try_acquire(&want("llama3")), Decision::Wait));
}

#[test]
fn freed_slot_goes_to_oldest_waiter_for_that_model() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["mistral"], &[]);
    granted_port(s.try_acquire(&want("llama3")));
    granted_port(s.try_acquire(&want("mistral")));
    s.enqueue(want("mistral"), 10, 1).unwrap();
    s.enqueue(want("llama3"), 10, 2).unwrap();
    s.enqueue(want("llama3"), 10, 3).unwrap();
    let out = s.release(&target(&s, 24000));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].0, 2,
        "the older llama3 waiter, not the mistral one ahead of it"
    );
    assert_eq!(s.queue_len(), 2);
    assert_eq!(s.queued_bytes(), 20);
}

#[test]
fn a_waiter_for_another_model_does_not_block_a_free_backend() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["mistral"], &[]);
    granted_port(s.try_acquire(&want("llama3")));
    s.enqueue(want("llama3"), 0, 1).unwrap();
    assert_eq!(granted_port(s.try_acquire(&want("mistral"))), 24001);
}

#[test]
fn dequeued_waiter_is_not_granted() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    granted_port(s.try_acquire(&want("llama3")));
    let seq = s.enqueue(want("llama3"), 5, 1).unwrap();
    assert_eq!(s.dequeue(seq), Some(1));
    assert_eq!(s.dequeue(seq), None);
    assert!(s.release(&target(&s, 24000)).is_empty());
    assert_eq!(s.queued_bytes(), 0);
}

#[test]
fn queue_limits_refuse_at_once() {
    let mut s: Scheduler<u32> = Scheduler::new(Limits {
        cap: 1,
        max_queue: 2,
        max_queue_bytes: 100,
    });
    s.enqueue(Want::default(), 60, 1).unwrap();
    assert_eq!(
        s.enqueue(Want::default(), 50, 2),
        Err(Rejection::QueueBytesFull)
    );
    s.enqueue(Want::default(), 40, 3).unwrap();
    assert_eq!(s.enqueue(Want::default(), 0, 4), Err(Rejection::QueueFull));
}

#[test]
fn a_retry_skips_tried_backends_and_is_exhausted_when_none_is_left() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    let mut w = want("llama3");
    w.tried.push(BackendId::Port(24000));
    assert_eq!(granted_port(s.try_acquire(&w)), 24001);
    w.tried.push(BackendId::Port(24001));
    assert!(matches!(
        s.try_acquire(&w),
        Decision::Rejected(Rejection::Exhausted)
    ));
}

#[test]
fn a_newly_healthy_backend_is_dispatched_to_waiters_in_order() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    granted_port(s.try_acquire(&want("llama3")));
    for w in 1..=3 {
        s.enqueue(want("llama3"), 0, w).unwrap();
    }
    add(&mut s, 24001, &["llama3"], &[]);
    add(&mut s, 24002, &["llama3"], &[]);
    let out: Vec<u32> = s.dispatch().into_iter().map(|(w, _)| w).collect();
    assert_eq!(out, [1, 2]);
    assert_eq!(s.queue_len(), 1);
}

#[test]
fn dispatch_rejects_waiters_whose_last_candidate_died() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    granted_port(s.try_acquire(&want("llama3")));
    let mut w = want("llama3");
    w.tried.push(BackendId::Port(24001));
    s.enqueue(w, 0, 7).unwrap();
    s.mark_unhealthy(&BackendId::Port(24000), "reset".into());
    let out = s.dispatch();
    assert!(matches!(
        out.as_slice(),
        [(7, Outcome::Rejected(Rejection::Exhausted))]
    ));
}

#[test]
fn drained_backend_gets_nothing_new() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    s.backend_mut(&BackendId::Port(24000)).unwrap().draining = true;
    assert_eq!(granted_port(s.try_acquire(&want("llama3"))), 24001);
    assert!(matches!(s.try_acquire(&want("llama3")), Decision::Wait));
}

#[test]
fn a_slot_of_a_replaced_backend_is_not_given_back_to_its_successor() {
    let mut s = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    let old = target(&s, 24000);
    let stale = Arc::new(Target::new(
        old.id.clone(),
        &"http://127.0.0.1:24000".parse().unwrap(),
    ));
    granted_port(s.try_acquire(&want("llama3")));
    assert!(s.release(&stale).is_empty());
    assert_eq!(s.backends()[&old.id].in_flight, 1);
}

/// A seeded random workload: arrivals, releases, timeouts, health flips and
/// drains, with the invariants checked after every step. `CORRAL_SEEDS=n`
/// widens the sweep.
#[test]
fn random_workloads_keep_the_invariants() {
    let seeds: u64 = std::env::var("CORRAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 0..seeds {
        run_workload(seed);
    }
}

fn run_workload(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cap = rng.random_range(1..=3);
    let mut s = Scheduler::new(limits(cap));
    let models = ["a", "b", "c"];
    for port in 0..6u16 {
        let m = models[usize::from(port) % 3];
        add(&mut s, 30000 + port, &[m, "a"], &[]);
    }
    let mut held: Vec<Arc<Target>> = Vec::new();
    let mut waiting: Vec<(u64, u32)> = Vec::new(); // (seq, payload)
    let mut next_payload = 0u32;
    let grant =
        |out: Vec<(u32, Outcome)>, held: &mut Vec<Arc<Target>>, waiting: &mut Vec<(u64, u32)>| {
            for (payload, outcome) in out {
                let pos = waiting
                    .iter()
                    .position(|(_, p)| *p == payload)
                    .expect("granted waiter was waiting");
                waiting.remove(pos);
                if let Outcome::Granted(t) = outcome {
                    held.push(t);
                }
            }
        };
    for step in 0..400 {
        match rng.random_range(0..10) {
            0..=3 => {
                let w = want(models[rng.random_range(0..3)]);
                match s.try_acquire(&w) {
                    Decision::Granted(t) => held.push(t),
                    Decision::Wait => {
                        let seq = s.enqueue(w, 1, next_payload).unwrap();
                        waiting.push((seq, next_payload));
                        next_payload += 1;
                    }
                    Decision::Rejected(r) => panic!("seed {seed} step {step}: unexpected {r:?}"),
                }
            }
            4..=6 if !held.is_empty() => {
                let t = held.swap_remove(rng.random_range(0..held.len()));
                let out = s.release(&t);
                grant(out, &mut held, &mut waiting);
            }
            7 if !waiting.is_empty() => {
                let (seq, payload) = waiting.swap_remove(rng.random_range(0..waiting.len()));
                assert_eq!(s.dequeue(seq), Some(payload));
            }
            8 => {
                let id = BackendId::Port(30000 + rng.random_range(0..6));
                if rng.random_bool(0.5) {
                    s.mark_unhealthy(&id, "flip".into());
                } else if let Some(b) = s.backend_mut(&id) {
                    b.healthy = true;
                    b.draining = rng.random_bool(0.2);
                }
                let out = s.dispatch();
                grant(out, &mut held, &mut waiting);
            }
            _ => {}
        }
        check_invariants(&s, cap, &held, seed, step);
    }
    for (seq, _) in waiting {
        s.dequeue(seq);
    }
    for t in held {
        assert!(
            s.release(&t).is_empty(),
            "seed {seed}: nobody is left waiting"
        );
    }
    assert!(
        s.backends().values().all(|b| b.in_flight == 0),
        "seed {seed}: in-flight did not return to 0"
    );
    assert_eq!(s.queued_bytes(), 0);
}

fn check_invariants(s: &Scheduler<u32>, cap: u32, held: &[Arc<Target>], seed: u64, step: usize) {
    for (id, b) in s.backends() {
        let holding = held.iter().filter(|t| &t.id == id).count() as u32;
        assert_eq!(
            b.in_flight, holding,
            "seed {seed} step {step}: {id} in_flight drifted"
        );
        assert!(
            b.in_flight <= cap,
            "seed {seed} step {step}: {id} over its cap"
        );
    }
    // No waiter could have been granted: every eligible backend is full.
    for w in s.queue.values() {
        assert!(
            s.pick(&w.want).is_none(),
            "seed {seed} step {step}: a waiter was left behind a free slot"
        );
    }
}
