//! Scheduler tests: selection order, queue hand-off, rejections, and a seeded
//! random workload with the invariants checked after every step. Fairness,
//! priorities, retries and the settle time are in `tests/fairness.rs`.

use super::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod fairness;
mod placing;

fn now() -> Instant {
    Instant::now()
}

fn ticket(tenant: &str) -> Ticket {
    Ticket::new(Arc::from(tenant), Priority::Interactive, now())
}

impl<W> Scheduler<W> {
    /// `try_acquire` for tenant `t`, now.
    fn acquire(&mut self, want: &Want) -> Decision {
        self.try_acquire(want, &ticket("t"), now())
    }

    /// `enqueue` for tenant `t`.
    fn enq(&mut self, want: Want, bytes: usize, payload: W) -> Result<u64, Rejection> {
        self.enqueue(want, bytes, &ticket("t"), payload)
    }

    /// Every backend a request could get now, by brute force over the table
    /// (the index must agree).
    fn could_get(&self, want: &Want) -> bool {
        self.backends
            .values()
            .any(|b| self.is_eligible(b, want) && self.slot_free(b))
    }
}

fn limits(cap: u32) -> Limits {
    Limits {
        cap,
        max_queue: 1000,
        max_queue_bytes: 1 << 20,
    }
}

fn add<W>(s: &mut Scheduler<W>, port: u16, models: &[&str], loaded: &[&str]) {
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
        ..Want::default()
    }
}

fn granted(d: Decision) -> Grant {
    match d {
        Decision::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn granted_port(d: Decision) -> u16 {
    granted(d).target.id.port().unwrap()
}

#[test]
fn least_in_flight_wins_and_ties_go_to_the_lowest_port() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(2));
    for port in [24002, 24000, 24001] {
        add(&mut s, port, &["llama3"], &[]);
    }
    let order: Vec<u16> = (0..6)
        .map(|_| granted_port(s.acquire(&want("llama3"))))
        .collect();
    assert_eq!(order, [24000, 24001, 24002, 24000, 24001, 24002]);
    assert!(matches!(s.acquire(&want("llama3")), Decision::Wait));
}

#[test]
fn a_backend_with_the_model_loaded_is_preferred_under_a_cap() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(4));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &["llama3:latest"]);
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24001);
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24001);
}

#[test]
fn without_a_cap_load_comes_before_loaded() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(0));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &["llama3"]);
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24001);
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24000);
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24001);
}

#[test]
fn only_backends_that_listed_the_model_are_eligible() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["mistral"], &[]);
    add(&mut s, 24001, &["llama3:latest"], &[]);
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24001);
    assert!(matches!(s.acquire(&want("Llama3:latest")), Decision::Wait));
}

#[test]
fn a_model_never_listed_is_unknown_while_some_backend_is_healthy() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    assert!(
        matches!(s.acquire(&want("ghost")), Decision::Wait),
        "no backend yet: wait"
    );
    add(&mut s, 24000, &["llama3"], &[]);
    assert!(matches!(
        s.acquire(&want("ghost")),
        Decision::Rejected(Rejection::UnknownModel)
    ));
}

#[test]
fn a_model_only_on_unhealthy_backends_waits() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["mistral"], &[]);
    s.mark_unhealthy(&BackendId::Port(24000), "down".into());
    assert!(matches!(s.acquire(&want("llama3")), Decision::Wait));
}

#[test]
fn freed_slot_goes_to_oldest_waiter_for_that_model() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["mistral"], &[]);
    let llama = granted(s.acquire(&want("llama3")));
    granted_port(s.acquire(&want("mistral")));
    s.enq(want("mistral"), 10, 1).unwrap();
    s.enq(want("llama3"), 10, 2).unwrap();
    s.enq(want("llama3"), 10, 3).unwrap();
    let out = s.release(llama, now());
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
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["mistral"], &[]);
    granted_port(s.acquire(&want("llama3")));
    s.enq(want("llama3"), 0, 1).unwrap();
    assert_eq!(granted_port(s.acquire(&want("mistral"))), 24001);
}

#[test]
fn dequeued_waiter_is_not_granted() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    let grant = granted(s.acquire(&want("llama3")));
    let seq = s.enq(want("llama3"), 5, 1).unwrap();
    assert_eq!(s.dequeue(seq), Some(1));
    assert_eq!(s.dequeue(seq), None);
    assert!(s.release(grant, now()).is_empty());
    assert_eq!(s.queued_bytes(), 0);
}

#[test]
fn queue_limits_refuse_at_once() {
    let mut s: Scheduler<u32> = Scheduler::new(Limits {
        cap: 1,
        max_queue: 2,
        max_queue_bytes: 100,
    });
    s.enq(Want::default(), 60, 1).unwrap();
    assert_eq!(
        s.enq(Want::default(), 50, 2),
        Err(Rejection::QueueBytesFull)
    );
    s.enq(Want::default(), 40, 3).unwrap();
    assert_eq!(s.enq(Want::default(), 0, 4), Err(Rejection::QueueFull));
}

#[test]
fn a_retry_skips_tried_backends_and_is_exhausted_when_none_is_left() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    let mut w = want("llama3");
    w.tried.push(BackendId::Port(24000));
    assert_eq!(granted_port(s.acquire(&w)), 24001);
    w.tried.push(BackendId::Port(24001));
    assert!(matches!(
        s.acquire(&w),
        Decision::Rejected(Rejection::Exhausted)
    ));
}

#[test]
fn a_newly_healthy_backend_is_dispatched_to_waiters_in_order() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    granted_port(s.acquire(&want("llama3")));
    for w in 1..=3 {
        s.enq(want("llama3"), 0, w).unwrap();
    }
    add(&mut s, 24001, &["llama3"], &[]);
    add(&mut s, 24002, &["llama3"], &[]);
    let out: Vec<u32> = s.dispatch(now()).into_iter().map(|(w, _)| w).collect();
    assert_eq!(out, [1, 2]);
    assert_eq!(s.queue_len(), 1);
}

#[test]
fn dispatch_rejects_waiters_whose_last_candidate_died() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    granted_port(s.acquire(&want("llama3")));
    let mut w = want("llama3");
    w.tried.push(BackendId::Port(24001));
    s.enq(w, 0, 7).unwrap();
    s.mark_unhealthy(&BackendId::Port(24000), "reset".into());
    let out = s.dispatch(now());
    assert!(matches!(
        out.as_slice(),
        [(7, Outcome::Rejected(Rejection::Exhausted))]
    ));
}

#[test]
fn a_pinned_request_waits_for_its_backend_and_is_turned_away_when_it_is_gone() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    let mut pinned = want("llama3");
    pinned.pin = Some(BackendId::Port(24001));
    let grant = granted(s.acquire(&pinned));
    assert_eq!(grant.target.id, BackendId::Port(24001));
    // 24000 is free, but not the pinned request's to take.
    assert!(matches!(s.acquire(&pinned), Decision::Wait));
    s.enq(pinned.clone(), 0, 1).unwrap();
    s.enq(want("llama3"), 0, 2).unwrap();
    let out = s.dispatch(now());
    assert!(
        matches!(out.as_slice(), [(2, Outcome::Granted(l))] if l.target.id == BackendId::Port(24000))
    );
    let out = s.release(grant, now());
    let [(1, Outcome::Granted(grant))] = out.as_slice() else {
        panic!("the pinned waiter gets its backend's slot: {out:?}");
    };
    assert_eq!(grant.target.id, BackendId::Port(24001));
    s.enq(pinned.clone(), 0, 3).unwrap();
    s.mark_unhealthy(&BackendId::Port(24001), "reset".into());
    let out = s.dispatch(now());
    assert!(matches!(
        out.as_slice(),
        [(3, Outcome::Rejected(Rejection::Exhausted))]
    ));
    assert!(matches!(
        s.acquire(&pinned),
        Decision::Rejected(Rejection::Exhausted)
    ));
}

#[test]
fn an_unslotted_grant_takes_no_slot_and_prefers_a_backend_listing_the_model() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    add(&mut s, 24002, &["llama3", "qwen3:cloud"], &[]);
    let cloud = want("qwen3:cloud");
    let port = |t: Option<Arc<Target>>| t.and_then(|t| t.id.port());
    assert_eq!(port(s.grant_unslotted(&cloud)), Some(24002));
    assert!(s.backends().values().all(|b| b.in_flight == 0));
    // Then the fewest in flight, then the lowest id; a full backend is no
    // obstacle, as no slot is taken.
    let _held = granted(s.acquire(&want("llama3")));
    let mut w = want("gpt-oss:120b-cloud");
    assert_eq!(port(s.grant_unslotted(&w)), Some(24001));
    w.tried = vec![BackendId::Port(24001), BackendId::Port(24002)];
    assert_eq!(port(s.grant_unslotted(&w)), Some(24000));
    w.tried.clear();
    w.pin = Some(BackendId::Port(24000));
    assert_eq!(port(s.grant_unslotted(&w)), Some(24000));
    s.backend_mut(&BackendId::Port(24000)).unwrap().draining = true;
    assert_eq!(port(s.grant_unslotted(&w)), None);
}

#[test]
fn drained_backend_gets_nothing_new() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    add(&mut s, 24001, &["llama3"], &[]);
    s.backend_mut(&BackendId::Port(24000)).unwrap().draining = true;
    assert_eq!(granted_port(s.acquire(&want("llama3"))), 24001);
    assert!(matches!(s.acquire(&want("llama3")), Decision::Wait));
}

#[test]
fn a_slot_of_a_replaced_backend_is_not_given_back_to_its_successor() {
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    add(&mut s, 24000, &["llama3"], &[]);
    let mut old = granted(s.acquire(&want("llama3")));
    let id = old.target.id.clone();
    old.target = Arc::new(Target::new(
        id.clone(),
        &"http://127.0.0.1:24000".parse().unwrap(),
    ));
    assert!(s.release(old, now()).is_empty());
    assert_eq!(s.backends()[&id].in_flight, 1);
}

/// A seeded random workload: arrivals of four tenants in both priorities,
/// releases, abandoned slots that settle, retries that keep their place,
/// timeouts, health flips and drains, with the invariants checked after
/// every step. `CORRAL_SEEDS=n` widens the sweep.
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

const TENANT_CAP: usize = 6;

/// A request of the workload: what it wants and its ticket.
struct Req {
    want: Want,
    ticket: Ticket,
}

fn run_workload(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cap = rng.random_range(1..=3);
    let policy = Policy {
        max_queue_per_tenant: TENANT_CAP,
        weights: [(Arc::from("a"), 2.0)].into_iter().collect(),
        ..Policy::default()
    };
    let mut s = Scheduler::with_policy(limits(cap), policy);
    let models = ["a", "b", "c"];
    let tenants = ["a", "b", "c", "d"];
    for port in 0..6u16 {
        let m = models[usize::from(port) % 3];
        add(&mut s, 30000 + port, &[m, "a"], &[]);
    }
    let mut clock = now();
    let mut held: Vec<(Grant, u32)> = Vec::new();
    let mut settling: Vec<(Instant, BackendId)> = Vec::new();
    let mut waiting: HashMap<u32, u64> = HashMap::new(); // payload -> arrival
    let mut reqs: HashMap<u32, Req> = HashMap::new();
    let mut next_payload = 0u32;
    let deliver = |out: Vec<(u32, Outcome)>,
                   held: &mut Vec<(Grant, u32)>,
                   waiting: &mut HashMap<u32, u64>| {
        for (payload, outcome) in out {
            assert!(
                waiting.remove(&payload).is_some(),
                "seed {seed}: granted waiter was waiting"
            );
            if let Outcome::Granted(grant) = outcome {
                held.push((grant, payload));
            }
        }
    };
    for step in 0..500 {
        clock += Duration::from_millis(rng.random_range(0..40));
        match rng.random_range(0..14) {
            0..=3 => {
                let priority = if rng.random_bool(0.3) {
                    Priority::Batch
                } else {
                    Priority::Interactive
                };
                let tenant = tenants[rng.random_range(0..tenants.len())];
                let mut req = Req {
                    want: want(models[rng.random_range(0..3)]),
                    ticket: Ticket::new(Arc::from(tenant), priority, clock),
                };
                if rng.random_bool(0.15) {
                    // A continued response: only its own backend will do.
                    req.want.pin = Some(BackendId::Port(30000 + rng.random_range(0..6)));
                }
                let id = next_payload;
                next_payload += 1;
                reqs.insert(id, req);
                ask(&mut s, &mut reqs, id, clock, &mut held, &mut waiting, seed);
            }
            4..=6 if !held.is_empty() => {
                let (grant, _) = held.swap_remove(rng.random_range(0..held.len()));
                let out = s.release(grant, clock);
                deliver(out, &mut held, &mut waiting);
            }
            7 if !held.is_empty() => {
                // Cut off mid-request: stays taken for the settle time.
                let (grant, _) = held.swap_remove(rng.random_range(0..held.len()));
                let id = grant.target.id.clone();
                settling.push((s.abandon(grant, clock), id));
            }
            8 if !held.is_empty() => {
                // The attempt failed: the backend is marked unhealthy, the
                // slot abandoned, and the request asks again with the same
                // ticket, excluding that backend.
                let (grant, id) = held.swap_remove(rng.random_range(0..held.len()));
                let backend = grant.target.id.clone();
                if rng.random_bool(0.5) {
                    s.mark_unhealthy(&backend, "failed".into());
                    deliver(s.dispatch(clock), &mut held, &mut waiting);
                }
                settling.push((s.abandon(grant, clock), backend.clone()));
                if let Some(req) = reqs.get_mut(&id) {
                    req.want.tried.push(backend);
                }
                ask(&mut s, &mut reqs, id, clock, &mut held, &mut waiting, seed);
            }
            9 if !waiting.is_empty() => {
                let payloads: Vec<u32> = waiting.keys().copied().collect();
                let payload = payloads[rng.random_range(0..payloads.len())];
                let arrival = waiting.remove(&payload).unwrap();
                assert_eq!(s.dequeue(arrival), Some(payload));
            }
            10 => {
                let id = BackendId::Port(30000 + rng.random_range(0..6));
                if rng.random_bool(0.5) {
                    s.mark_unhealthy(&id, "flip".into());
                } else if let Some(b) = s.backend_mut(&id) {
                    b.healthy = true;
                    b.draining = rng.random_bool(0.2);
                }
                deliver(s.dispatch(clock), &mut held, &mut waiting);
            }
            11 => {
                let out = s.expire(clock);
                settling.retain(|(due, _)| *due > clock);
                deliver(out, &mut held, &mut waiting);
            }
            12 => {
                // A scan: the same lists again (nothing to re-index), or
                // after a model was struck off (the probe brings it back).
                let port = rng.random_range(0..6u16);
                let id = BackendId::Port(30000 + port);
                if rng.random_bool(0.3) {
                    if let Some(b) = s.backend_mut(&id) {
                        b.models.remove(&ModelName::parse("a"));
                    }
                    deliver(s.dispatch(clock), &mut held, &mut waiting);
                }
                let m = models[usize::from(port) % 3];
                add(&mut s, 30000 + port, &[m, "a"], &[]);
                deliver(s.dispatch(clock), &mut held, &mut waiting);
            }
            13 => {
                // A cloud model: an unslotted grant, which changes nothing.
                let mut w = want("cloud");
                w.tried
                    .push(BackendId::Port(30000 + rng.random_range(0..6)));
                if rng.random_bool(0.3) {
                    w.pin = Some(BackendId::Port(30000 + rng.random_range(0..6)));
                }
                let usable = |b: &Backend| b.healthy && !b.draining && w.may_use(&b.target.id);
                match s.grant_unslotted(&w) {
                    Some(t) => {
                        let got = &s.backends()[&t.id];
                        assert!(usable(got), "seed {seed} step {step}: unusable {}", t.id);
                        assert!(
                            s.backends()
                                .values()
                                .all(|b| !usable(b) || b.in_flight >= got.in_flight),
                            "seed {seed} step {step}: {} is not the least busy",
                            t.id
                        );
                    }
                    None => assert!(
                        !s.backends().values().any(usable),
                        "seed {seed} step {step}: a usable backend was passed over"
                    ),
                }
            }
            _ => {}
        }
        check_invariants(&s, cap, &held, &settling, seed, step);
        for (grant, id) in &held {
            let w = &reqs[id].want;
            assert!(
                w.pin.as_ref().is_none_or(|p| p == &grant.target.id),
                "seed {seed} step {step}: a pinned request went elsewhere"
            );
        }
    }
    let arrivals: Vec<u64> = waiting.values().copied().collect();
    for arrival in arrivals {
        s.dequeue(arrival);
    }
    for (grant, _) in held {
        assert!(
            s.release(grant, clock).is_empty(),
            "seed {seed}: nobody is left waiting"
        );
    }
    assert!(s.expire(clock + Duration::from_secs(1)).is_empty());
    assert!(
        s.backends().values().all(|b| b.in_flight == 0),
        "seed {seed}: in-flight did not return to 0"
    );
    assert_eq!(s.queued_bytes(), 0);
    assert!(
        s.waiters.tenants.is_empty(),
        "seed {seed}: idle tenants are forgotten"
    );
}

/// Asks for a slot for request `id`: granted, queued (a retry at its old
/// place) or refused.
fn ask(
    s: &mut Scheduler<u32>,
    reqs: &mut HashMap<u32, Req>,
    id: u32,
    clock: Instant,
    held: &mut Vec<(Grant, u32)>,
    waiting: &mut HashMap<u32, u64>,
    seed: u64,
) {
    let req = reqs.get_mut(&id).expect("request exists");
    match s.try_acquire(&req.want, &req.ticket, clock) {
        Decision::Granted(grant) => held.push((grant, id)),
        Decision::Hold(_) => panic!("seed {seed}: held back without a signature"),
        Decision::Wait => {
            let before = req.ticket.arrival;
            match s.enqueue(req.want.clone(), 1, &req.ticket, id) {
                Ok(arrival) => {
                    if let Some(old) = before {
                        assert_eq!(arrival, old, "seed {seed}: a retry keeps its place");
                    }
                    req.ticket.arrival = Some(arrival);
                    waiting.insert(id, arrival);
                }
                Err(Rejection::TenantQueueFull) => {
                    let tid = s.waiters.tenant_named(&req.ticket.tenant).unwrap();
                    assert_eq!(s.waiters.waiting_of(tid), TENANT_CAP, "seed {seed}");
                }
                Err(r) => panic!("seed {seed}: unexpected {r:?}"),
            }
        }
        Decision::Rejected(Rejection::Exhausted)
            if !req.want.tried.is_empty() || req.want.pin.is_some() => {}
        Decision::Rejected(r) => panic!("seed {seed}: unexpected {r:?}"),
    }
}

fn check_invariants(
    s: &Scheduler<u32>,
    cap: u32,
    held: &[(Grant, u32)],
    settling: &[(Instant, BackendId)],
    seed: u64,
    step: usize,
) {
    for (id, b) in s.backends() {
        let holding = held.iter().filter(|(l, _)| &l.target.id == id).count()
            + settling.iter().filter(|(_, b)| b == id).count();
        assert_eq!(
            b.in_flight, holding as u32,
            "seed {seed} step {step}: {id} in_flight drifted"
        );
        assert!(
            b.in_flight <= cap,
            "seed {seed} step {step}: {id} over its cap"
        );
    }
    // No waiter could have been granted: every eligible backend is full.
    for w in s.waiters.by_arrival.values() {
        assert!(
            !s.could_get(&w.want),
            "seed {seed} step {step}: a waiter was left behind a free slot"
        );
    }
    // The free index agrees with the table.
    for m in ["a", "b", "c"] {
        let w = want(m);
        assert_eq!(
            s.least_busy(&w).is_some(),
            s.could_get(&w),
            "seed {seed} step {step}: the free index disagrees for {m}"
        );
    }
    for t in s.waiters.tenants.values() {
        assert!(
            t.waiting <= TENANT_CAP,
            "seed {seed} step {step}: tenant cap"
        );
    }
    let bytes: usize = s.waiters.by_arrival.values().map(|w| w.bytes).sum();
    assert_eq!(s.queued_bytes(), bytes);
}

/// A forgotten backend's kept connection is closed, not left open to a
/// server that may be gone or replaced.
#[tokio::test]
async fn forgetting_a_backend_closes_its_idle_connections() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .unwrap();
        // Kept alive until the client closes it.
        let _ = closed_tx.send(socket.read(&mut buf).await.map(|n| n == 0));
    });
    let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
    let target = Arc::new(Target::new(BackendId::Port(port), &uri));
    let mut s: Scheduler<u32> = Scheduler::new(limits(1));
    s.add_backend(Arc::clone(&target));
    let request = http::Request::get("/api/tags")
        .header(http::header::HOST, target.authority.clone())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = target
        .conns
        .send(request, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(target.conns.idle_count(), 1);
    s.remove_backend(&BackendId::Port(port));
    assert_eq!(target.conns.idle_count(), 0);
    let eof = tokio::time::timeout(std::time::Duration::from_secs(5), closed)
        .await
        .expect("the connection closes")
        .unwrap();
    assert!(eof.unwrap(), "the backend saw the connection close");
}

#[test]
fn rejection_labels_are_distinct() {
    let mut labels: Vec<&str> = Rejection::ALL.iter().map(|r| r.label()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), Rejection::ALL.len());
}
