//! Fairness, priority, retries and the settle time, on simulated time: every
//! tenant backlogged, slots turned over in the order their requests finish.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::*;

/// A tenant of a simulation: its name, weight, requests queued at the start,
/// and how long each of its requests holds a slot.
struct Load {
    name: &'static str,
    weight: f64,
    demand: usize,
    service: Duration,
}

/// What each tenant got while every tenant still had waiters.
struct Shares {
    slot_secs: Vec<f64>,
    grants: Vec<usize>,
}

/// Runs `loads` on `backends` one-slot backends of one model until the first
/// tenant runs out of waiters (or `horizon` passes).
fn simulate(backends: u16, loads: &[Load], horizon: Duration) -> Shares {
    let weights = loads
        .iter()
        .map(|l| (Arc::from(l.name), l.weight))
        .collect();
    let mut s: Scheduler<usize> = Scheduler::with_policy(
        Limits {
            cap: 1,
            max_queue: usize::MAX,
            max_queue_bytes: usize::MAX,
        },
        Policy {
            weights,
            ..Policy::default()
        },
    );
    for port in 0..backends {
        add(&mut s, 40000 + port, &["m"], &[]);
    }
    let start = now();
    // Fill the queue before any slot is taken, tenants interleaved, so that
    // nobody is first by luck of ordering.
    let most = loads.iter().map(|l| l.demand).max().unwrap_or(0);
    for i in 0..most {
        for (t, l) in loads.iter().enumerate().filter(|(_, l)| i < l.demand) {
            let ticket = Ticket::new(Arc::from(l.name), Priority::Interactive, start);
            s.enqueue(want("m"), 0, &ticket, t).unwrap();
        }
    }
    let mut left: Vec<usize> = loads.iter().map(|l| l.demand).collect();
    let mut shares = Shares {
        slot_secs: vec![0.0; loads.len()],
        grants: vec![0; loads.len()],
    };
    let mut running = Running::default();
    for (t, outcome) in s.dispatch(start) {
        let Outcome::Granted(grant) = outcome else {
            panic!("rejected")
        };
        left[t] -= 1;
        running.start(t, grant, start + loads[t].service);
    }
    while let Some(Reverse((at, key))) = running.heap.pop() {
        if left.contains(&0) || at - start > horizon {
            break;
        }
        let (grant, t) = running.grants.remove(&key).expect("running grant");
        shares.slot_secs[t] += loads[t].service.as_secs_f64();
        shares.grants[t] += 1;
        for (t, outcome) in s.release(grant, at) {
            let Outcome::Granted(grant) = outcome else {
                panic!("rejected")
            };
            left[t] -= 1;
            running.start(t, grant, at + loads[t].service);
        }
    }
    shares
}

/// Slots held in a simulation, by when they come back.
#[derive(Default)]
struct Running {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    grants: HashMap<u64, (Grant, usize)>,
    next: u64,
}

impl Running {
    fn start(&mut self, tenant: usize, grant: Grant, until: Instant) {
        self.heap.push(Reverse((until, self.next)));
        self.grants.insert(self.next, (grant, tenant));
        self.next += 1;
    }
}

/// Jain's fairness index of `x`: 1 when all are equal, 1/n at worst.
fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    sum * sum / (x.len() as f64 * squares)
}

#[test]
fn shares_follow_slot_time_not_request_count() {
    let loads = [
        Load {
            name: "long",
            weight: 1.0,
            demand: 10_000,
            service: Duration::from_secs(3),
        },
        Load {
            name: "short",
            weight: 1.0,
            demand: 10_000,
            service: Duration::from_secs(1),
        },
    ];
    let shares = simulate(4, &loads, Duration::from_secs(2_000));
    let ratio = shares.slot_secs[0] / shares.slot_secs[1];
    assert!((0.9..=1.1).contains(&ratio), "slot-time ratio {ratio}");
    let grants = shares.grants[1] as f64 / shares.grants[0] as f64;
    assert!(
        (2.7..=3.3).contains(&grants),
        "short got {grants}x the grants"
    );
}

#[test]
fn weights_scale_the_shares() {
    let load = |name, weight| Load {
        name,
        weight,
        demand: 10_000,
        service: Duration::from_millis(700),
    };
    let shares = simulate(
        6,
        &[load("alice", 2.0), load("bob", 1.0)],
        Duration::from_secs(1_000),
    );
    let ratio = shares.slot_secs[0] / shares.slot_secs[1];
    assert!((1.8..=2.2).contains(&ratio), "alice/bob {ratio}");
}

#[test]
fn ten_tenants_with_unequal_demand_get_fair_shares() {
    let names = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"];
    let loads: Vec<Load> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Load {
            name,
            weight: 1.0,
            demand: 2_000 * (i + 1),
            service: Duration::from_millis(200 + 150 * i as u64),
        })
        .collect();
    let shares = simulate(8, &loads, Duration::from_secs(10_000));
    let index = jain(&shares.slot_secs);
    assert!(
        index >= 0.95,
        "Jain's index {index}: {:?}",
        shares.slot_secs
    );
    let mean = shares.slot_secs.iter().sum::<f64>() / 10.0;
    for (name, got) in names.iter().zip(&shares.slot_secs) {
        assert!(
            (got / mean - 1.0).abs() <= 0.1,
            "{name} got {got:.0} slot-s, fair share {mean:.0}"
        );
    }
}

/// A fleet of `n` one-slot backends of model `m`, every slot held.
fn full(n: u16, policy: Policy) -> (Scheduler<u32>, Vec<Grant>) {
    let roomy = Limits {
        max_queue: usize::MAX,
        ..limits(1)
    };
    let mut s = Scheduler::with_policy(roomy, policy);
    for port in 0..n {
        add(&mut s, 41000 + port, &["m"], &[]);
    }
    let held = (0..n)
        .map(|_| granted(s.try_acquire(&want("m"), &ticket("x"), now())))
        .collect();
    (s, held)
}

fn enqueue_as(s: &mut Scheduler<u32>, tenant: &str, priority: Priority, payload: u32) -> u64 {
    let t = Ticket::new(Arc::from(tenant), priority, now());
    s.enqueue(want("m"), 0, &t, payload).unwrap()
}

fn grantee(out: Vec<(u32, Outcome)>) -> u32 {
    match out.as_slice() {
        [(p, Outcome::Granted(_))] => *p,
        other => panic!("expected one grant, got {other:?}"),
    }
}

#[test]
fn a_newcomer_overtakes_a_deep_queue_of_another_tenant() {
    let (mut s, mut held) = full(2, Policy::default());
    for i in 0..20_000 {
        enqueue_as(&mut s, "batchy", Priority::Interactive, i);
    }
    enqueue_as(&mut s, "chat", Priority::Interactive, 99_999);
    let first = grantee(s.release(held.pop().unwrap(), now()));
    let second = grantee(s.release(held.pop().unwrap(), now()));
    assert!(
        [first, second].contains(&99_999),
        "chat waited behind the batch: {first}, {second}"
    );
}

#[test]
fn interactive_goes_first_and_batch_keeps_its_floor() {
    let policy = Policy {
        batch_floor_percent: 10,
        ..Policy::default()
    };
    let (mut s, held) = full(1, policy);
    for i in 0..1000 {
        enqueue_as(&mut s, "etl", Priority::Batch, 10_000 + i);
        enqueue_as(&mut s, "chat", Priority::Interactive, i);
    }
    let mut grant = held.into_iter().next().unwrap();
    let mut batch = 0;
    let mut order = Vec::new();
    for _ in 0..200 {
        let out = s.release(grant, now());
        let [(p, Outcome::Granted(l))] = <[_; 1]>::try_from(out).unwrap() else {
            panic!("rejected")
        };
        order.push(p);
        batch += usize::from(p >= 10_000);
        grant = l;
    }
    assert_eq!(batch, 20, "batch keeps 10 % of the grants");
    assert!(order[..9].iter().all(|p| *p < 10_000), "interactive first");
    // Within a tenant, first come first served.
    let chat: Vec<u32> = order.iter().copied().filter(|p| *p < 10_000).collect();
    assert!(chat.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn without_a_floor_batch_waits_for_interactive_to_drain() {
    let policy = Policy {
        batch_floor_percent: 0,
        ..Policy::default()
    };
    let (mut s, held) = full(1, policy);
    enqueue_as(&mut s, "etl", Priority::Batch, 2);
    enqueue_as(&mut s, "chat", Priority::Interactive, 1);
    let mut grant = held.into_iter().next().unwrap();
    let mut order = Vec::new();
    for _ in 0..2 {
        let out = s.release(grant, now());
        let [(p, Outcome::Granted(l))] = <[_; 1]>::try_from(out).unwrap() else {
            panic!("rejected")
        };
        order.push(p);
        grant = l;
    }
    assert_eq!(order, [1, 2]);
}

#[test]
fn the_tenant_cap_refuses_only_that_tenant() {
    let policy = Policy {
        max_queue_per_tenant: 2,
        ..Policy::default()
    };
    let (mut s, _held) = full(1, policy);
    enqueue_as(&mut s, "a", Priority::Interactive, 1);
    enqueue_as(&mut s, "a", Priority::Batch, 2);
    let t = Ticket::new(Arc::from("a"), Priority::Interactive, now());
    assert_eq!(
        s.enqueue(want("m"), 0, &t, 3),
        Err(Rejection::TenantQueueFull)
    );
    enqueue_as(&mut s, "b", Priority::Interactive, 4);
    assert_eq!(s.queue_len(), 3);
}

#[test]
fn a_retry_waits_at_its_original_place() {
    let (mut s, mut held) = full(1, Policy::default());
    let mut retry = Ticket::new(Arc::from("t"), Priority::Interactive, now());
    retry.arrival = Some(s.enqueue(want("m"), 0, &retry, 1).unwrap());
    for p in 2..5 {
        enqueue_as(&mut s, "t", Priority::Interactive, p);
    }
    // Waiter 1 gets the slot, its backend fails it, and it asks again.
    let out = s.release(held.pop().unwrap(), now());
    let [(1, Outcome::Granted(grant))] = <[_; 1]>::try_from(out).unwrap() else {
        panic!("waiter 1 first")
    };
    add(&mut s, 41001, &["m"], &[]);
    let busy = granted(s.try_acquire(&want("m"), &ticket("x"), now()));
    let mut w = want("m");
    w.tried.push(grant.target.id.clone());
    s.abandon(grant, now());
    assert!(matches!(s.try_acquire(&w, &retry, now()), Decision::Wait));
    let again = s.enqueue(w, 0, &retry, 1).unwrap();
    assert_eq!(Some(again), retry.arrival, "same arrival number");
    assert_eq!(grantee(s.release(busy, now())), 1, "ahead of 2, 3 and 4");
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_slot_stays_taken_for_the_settle_time() {
    let (mut s, mut held) = full(1, Policy::default());
    enqueue_as(&mut s, "t", Priority::Interactive, 7);
    let due = s.abandon(held.pop().unwrap(), Instant::now());
    assert_eq!(s.next_settle(), Some(due));
    tokio::time::advance(Duration::from_millis(49)).await;
    assert!(s.expire(Instant::now()).is_empty(), "still settling");
    assert_eq!(s.backends().values().next().unwrap().in_flight, 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(grantee(s.expire(Instant::now())), 7);
    assert_eq!(s.next_settle(), None);
}

#[test]
fn an_idle_tenant_banks_no_credit() {
    let (mut s, held) = full(1, Policy::default());
    let t0 = now();
    // "old" used the backend alone for an hour.
    let mut grant = held.into_iter().next().unwrap();
    for i in 0..60 {
        enqueue_as(&mut s, "old", Priority::Interactive, i);
        let out = s.release(grant, t0 + Duration::from_secs(60 * i as u64));
        let [(_, Outcome::Granted(l))] = <[_; 1]>::try_from(out).unwrap() else {
            panic!("rejected")
        };
        grant = l;
    }
    for i in 0..10 {
        enqueue_as(&mut s, "old", Priority::Interactive, 100 + i);
        enqueue_as(&mut s, "new", Priority::Interactive, 200 + i);
    }
    // The newcomer starts level: the two alternate rather than "new" taking
    // ten in a row for the hour "old" used while it was away.
    let mut order = Vec::new();
    let mut at = t0 + Duration::from_secs(3600);
    for _ in 0..6 {
        at += Duration::from_secs(60);
        let out = s.release(grant, at);
        let [(p, Outcome::Granted(l))] = <[_; 1]>::try_from(out).unwrap() else {
            panic!("rejected")
        };
        order.push(p / 100);
        grant = l;
    }
    let old = order.iter().filter(|p| **p == 1).count();
    assert!((2..=4).contains(&old), "order {order:?}");
}

#[test]
fn retry_after_grows_with_the_tenants_place_and_falls_with_turnover() {
    let (mut s, held) = full(4, Policy::default());
    let t0 = now();
    let short = s.retry_after(Some(&ModelName::parse("m")), "a");
    for i in 0..400 {
        enqueue_as(&mut s, "a", Priority::Interactive, i);
    }
    let long = s.retry_after(Some(&ModelName::parse("m")), "a");
    assert!(long > short, "{long:?} > {short:?}");
    // Four one-second slots: about 4 a second turn over; 400 ahead ≈ 100 s.
    let mut grants = held;
    for step in 1..=40u64 {
        let at = t0 + Duration::from_secs(step / 4) + Duration::from_millis(250 * (step % 4));
        let grant = grants.remove(0);
        for (_, o) in s.release(grant, at) {
            if let Outcome::Granted(l) = o {
                grants.push(l);
            }
        }
    }
    let measured = s
        .retry_after(Some(&ModelName::parse("m")), "a")
        .as_secs_f64();
    assert!((60.0..=150.0).contains(&measured), "{measured} s");
    // A tenant with nothing queued is told less than one with 360 queued.
    let other = s
        .retry_after(Some(&ModelName::parse("m")), "b")
        .as_secs_f64();
    assert!(other < measured, "{other} < {measured}");
}

#[test]
fn the_tenant_view_shows_waits_and_shares() {
    let (mut s, _held) = full(2, Policy::default());
    enqueue_as(&mut s, "a", Priority::Interactive, 1);
    let later = now() + Duration::from_millis(1500);
    let view = s.tenants(later);
    let names: Vec<&str> = view.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "x"]);
    assert_eq!(view[0].waiting, 1);
    assert!(view[0].oldest_wait_ms >= 1500);
    assert_eq!(view[1].in_flight, 2);
    assert_eq!(view[1].share, 1.0);
}
