//! The placement hook in the scheduler (ROUTING=cache-aware): a request
//! held back for the busy backend that holds its prompt gets that backend
//! when it frees, or a free one once its patience runs out.

use std::time::Duration;

use super::*;
use crate::fleet::placement::{Observed, Signature};

/// A chat turn for model `m` with a long shared system prompt.
fn turn(system: &str, question: &str) -> Want {
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }))
    .unwrap();
    Want {
        model: Some(ModelName::parse("m")),
        signature: Signature::of(&body, &http::HeaderMap::new()).map(Arc::new),
        ..Want::default()
    }
}

/// Two one-slot backends with `m` loaded; the first turn of a conversation
/// with 40 kB of system prompt (about 5 s to recompute) runs on 24000, which
/// answers in 100 ms; the second turn arrives while it runs and is held.
fn held_second_turn() -> (Scheduler<u32>, Grant, Instant, Instant) {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    s.set_routing(Routing::CacheAware);
    add(&mut s, 24000, &["m"], &["m"]);
    add(&mut s, 24001, &["m"], &["m"]);
    let system = "x".repeat(40_000);
    let t0 = now();
    let first = granted(s.try_acquire(&turn(&system, "q1"), &ticket("t"), t0));
    assert_eq!(first.target.id.port(), Some(24000));
    let quick = Observed {
        service: Duration::from_millis(100),
        ..Observed::default()
    };
    s.placement_mut().observed(&BackendId::Port(24000), &quick);
    let second = turn(&system, "q2");
    let due = match s.try_acquire(&second, &ticket("t"), t0) {
        Decision::Hold(due) => due,
        other => panic!("expected the second turn to be held, got {other:?}"),
    };
    assert!(due > t0, "a hold ends in the future");
    let arrival = s.enqueue(second, 1, &ticket("t"), 7).unwrap();
    s.hold(arrival, due);
    assert_eq!(s.next_settle(), Some(due));
    (s, first, t0, due)
}

fn granted_to(out: &[(u32, Outcome)]) -> Vec<(u32, u16)> {
    out.iter()
        .map(|(w, o)| match o {
            Outcome::Granted(grant) => (*w, grant.target.id.port().unwrap()),
            Outcome::Rejected(r) => panic!("waiter {w} rejected: {r:?}"),
        })
        .collect()
}

#[test]
fn a_held_turn_gets_its_busy_backend_when_that_frees() {
    let (mut s, first, t0, due) = held_second_turn();
    assert!(s.expire(t0).is_empty(), "nothing is due yet");
    let out = s.release(first, t0 + Duration::from_millis(100));
    assert_eq!(granted_to(&out), [(7, 24000)]);
    // The hold ran out after the waiter left: nothing more to hand out.
    assert!(s.expire(due).is_empty());
    assert_eq!(s.next_settle(), None);
}

#[test]
fn a_held_turn_is_offered_the_free_backend_once_its_patience_runs_out() {
    let (mut s, _first, t0, due) = held_second_turn();
    assert!(s.expire(t0 + (due - t0) / 2).is_empty(), "still patient");
    assert_eq!(granted_to(&s.expire(due)), [(7, 24001)]);
    assert_eq!(s.queue_len(), 0);
}

#[test]
fn without_a_signature_or_under_least_busy_nothing_is_held() {
    let (mut s, _first, t0, _due) = held_second_turn();
    let plain = want("m");
    assert_eq!(granted_port(s.try_acquire(&plain, &ticket("u"), t0)), 24001);

    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["m"], &["m"]);
    add(&mut s, 24001, &["m"], &["m"]);
    let system = "x".repeat(40_000);
    let first = turn(&system, "q1");
    assert_eq!(granted_port(s.try_acquire(&first, &ticket("t"), t0)), 24000);
    let second = turn(&system, "q2");
    assert_eq!(
        granted_port(s.try_acquire(&second, &ticket("t"), t0)),
        24001
    );
}
