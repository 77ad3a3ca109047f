//! Scheduler micro-benchmark, sans-io (no sockets, no runtime): the cost of
//! the three operations the fleet lock is held for, on a full fleet of
//! one-slot backends with a deep queue.
//!
//! - **arrival**: a request for a model whose backends are all busy asks for
//!   a slot and is queued;
//! - **release**: a slot is given back and handed to a waiter, while the
//!   oldest half of the queue wants another (busy) model;
//! - **dispatch**: the re-examination after a scan that changed nothing;
//!   and, beside it, a whole scan's worth of work under the lock: every
//!   backend re-probed (its free-slot index entry rebuilt), then dispatch.
//!
//! Waiters belong to 100 tenants, a tenth of them batch, in two layouts:
//! *spread* (waiter i is tenant i mod 100: every tenant waits for every
//! model, the worst case for the per-model tenant order, which a grant must
//! update in every lane its tenant waits in) and *grouped* (each tenant
//! waits for one or two models, as users of a shared cluster mostly do).
//!
//! `cargo run --release --example sched_bench [backends models waiters]...`;
//! without arguments it runs 1,000/50/100,000 and 100/10/10,000 (the issue's
//! two sizes; the small one has 10 models so each has 10 backends).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use corral::fleet::scheduler::{Decision, Grant, Limits, Outcome, Scheduler, Ticket, Want};
use corral::fleet::{BackendId, ProbeReport, Target};
use corral::model::ModelName;
use corral::policy::Priority;

struct Size {
    backends: u16,
    models: usize,
    waiters: usize,
}

/// Which tenant the `i`-th waiter, for model `m`, belongs to.
fn tenant_of(spread: bool, i: usize, m: usize) -> usize {
    if spread {
        i % 100
    } else {
        (m * 2 + i % 2) % 100
    }
}

fn model(i: usize) -> ModelName {
    ModelName::parse(&format!("m{i}"))
}

fn want(m: usize) -> Want {
    Want {
        model: Some(model(m)),
        ..Want::default()
    }
}

fn ticket(tenants: &[Arc<str>], i: usize, tenant: usize) -> Ticket {
    let priority = if i % 10 == 9 {
        Priority::Batch
    } else {
        Priority::Interactive
    };
    Ticket::new(Arc::clone(&tenants[tenant]), priority, Instant::now())
}

fn probe(models: usize, port: u16) -> ProbeReport {
    ProbeReport {
        models: vec![format!("m{}", usize::from(port) % models)],
        ..ProbeReport::default()
    }
}

/// A fleet with every slot taken and `waiters` queued: the first half wants
/// model 0, the rest the other models in turn. Returns the held slots.
fn full_fleet(size: &Size, tenants: &[Arc<str>], spread: bool) -> (Scheduler<u64>, Vec<Grant>) {
    let mut s = Scheduler::new(Limits {
        cap: 1,
        max_queue: usize::MAX,
        max_queue_bytes: usize::MAX,
    });
    for port in 0..size.backends {
        let uri: http::Uri = format!("http://127.0.0.1:{}", 20000 + port)
            .parse()
            .unwrap();
        let id = BackendId::Port(20000 + port);
        s.add_backend(Arc::new(Target::new(id.clone(), &uri)));
        s.apply_probe(&id, probe(size.models, port));
        s.backend_mut(&id).unwrap().healthy = true;
    }
    let mut held = Vec::new();
    for port in 0..size.backends {
        let w = want(usize::from(port) % size.models);
        match s.try_acquire(&w, &ticket(tenants, 0, 0), Instant::now()) {
            Decision::Granted(t) => held.push(t),
            other => panic!("setup: {other:?}"),
        }
    }
    for i in 0..size.waiters {
        let m = if i < size.waiters / 2 {
            0
        } else {
            1 + i % (size.models - 1)
        };
        let t = ticket(tenants, i, tenant_of(spread, i, m));
        s.enqueue(want(m), 0, &t, i as u64).unwrap();
    }
    (s, held)
}

fn per_op(total: Duration, n: usize) -> f64 {
    total.as_secs_f64() * 1e6 / n as f64
}

fn run(size: &Size, spread: bool) {
    let tenants: Vec<Arc<str>> = (0..100).map(|t| Arc::from(format!("t{t}"))).collect();
    let (mut s, held) = full_fleet(size, &tenants, spread);
    let mut next = size.waiters as u64;

    // Arrival: every backend of the model busy, so the request waits.
    let n = 2000;
    let t = Instant::now();
    for i in 0..n {
        let m = 1 + i % (size.models - 1);
        let w = want(m);
        let t = ticket(&tenants, i, tenant_of(spread, i, m));
        match s.try_acquire(&w, &t, Instant::now()) {
            Decision::Wait => {
                black_box(s.enqueue(w, 0, &t, next).unwrap());
                next += 1;
            }
            other => panic!("arrival: {other:?}"),
        }
    }
    let arrival = per_op(t.elapsed(), n);

    // Release: a backend of a model other than 0 frees its slot; the oldest
    // waiter for it (behind the half of the queue that wants model 0) gets
    // it, and the grant holds the slot again. The model-0 backends stay busy.
    let (mut others, _model0): (Vec<Grant>, Vec<Grant>) = held
        .into_iter()
        .partition(|l| usize::from(l.target.id.port().unwrap() - 20000) % size.models != 0);
    let n = 2000.min(size.waiters / 4);
    let mut took = Duration::ZERO;
    for i in 0..n {
        let grant = others.remove(0);
        let t = Instant::now();
        let out = s.release(grant, Instant::now());
        took += t.elapsed();
        match <[_; 1]>::try_from(out) {
            Ok([(_, Outcome::Granted(grant))]) => others.push(grant),
            _ => panic!("release {i} did not hand exactly one grant"),
        }
    }
    let release = per_op(took, n);

    // Dispatch after a scan that changed nothing.
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        assert!(black_box(s.dispatch(Instant::now())).is_empty());
    }
    let dispatch = per_op(t.elapsed(), n);

    // A whole scan under the lock: every backend re-probed, then dispatch.
    let t = Instant::now();
    for _ in 0..n {
        for port in 0..size.backends {
            s.apply_probe(&BackendId::Port(20000 + port), probe(size.models, port));
        }
        assert!(black_box(s.dispatch(Instant::now())).is_empty());
    }
    let scan = per_op(t.elapsed(), n);

    println!(
        "| {} | {} | {} | {} | {arrival:.2} µs | {release:.2} µs | {:.3} ms | {:.3} ms |",
        if spread { "spread" } else { "grouped" },
        size.backends,
        size.models,
        size.waiters,
        dispatch / 1000.0,
        scan / 1000.0
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: backends models waiters ..."))
        .collect();
    let sizes: Vec<Size> = if args.is_empty() {
        vec![
            Size {
                backends: 100,
                models: 10,
                waiters: 10_000,
            },
            Size {
                backends: 1000,
                models: 50,
                waiters: 100_000,
            },
        ]
    } else {
        args.chunks(3)
            .map(|c| Size {
                backends: u16::try_from(c[0]).expect("at most 65535 backends"),
                models: c[1].max(2),
                waiters: c[2],
            })
            .collect()
    };
    println!(
        "| tenants | backends | models | waiters | arrival | release to a waiter | dispatch after a scan | re-probe all + dispatch |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for size in &sizes {
        for spread in [false, true] {
            run(size, spread);
        }
    }
}
