//! SHARED_STATE: three corral binaries share ten one-slot simulated backends
//! through a real `redis-server` on a loopback port. One instance is killed
//! with SIGKILL mid-run and restarted; then Redis itself goes away for 5 s.
//! Every request to a live instance is answered and no backend ever holds
//! more than its one slot (the simulators' own counters say so). A drain
//! made on one instance reaches the others.
//!
//! Needs Debian's `redis-server` on the PATH (`.ci/run` installs it). Under
//! `CI` its absence fails the test; elsewhere the test says so and skips.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use corral::sim::{ServerSpec, SimServer};
use serde_json::json;

use common::{
    TestFleet, backend_row_at, backend_rows_at, eventually, generate, get_json_at, slow,
    wait_healthy_at,
};
use tokio::time::Instant;

const INSTANCES: usize = 3;
const BACKENDS: usize = 10;
const REQUESTS: u64 = 3_000;
const CLIENTS: u64 = 30;
/// The lease TTL of `corral::fleet::shared`, and how often instances read
/// the holders back (a freed lease is seen at most that much later).
const LEASE_TTL: Duration = corral::fleet::shared::LEASE_TTL;
const RENEW_EVERY: Duration = corral::fleet::shared::RENEW_EVERY;

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc(Child);

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `redis-server` can run here; absent under CI is a failure.
fn have_redis() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed: `apt-get install -y redis-server` (the CI script does)"
        );
        eprintln!("skipped: redis-server is not installed (apt-get install -y redis-server)");
    }
    found
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A throw-away redis-server on `port`: no persistence, so a restart is empty.
async fn start_redis(port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let proc = Proc(child);
    eventually(Duration::from_secs(10), "redis-server listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    proc
}

/// A corral binary on `port` over `fleet`, sharing state at `redis`.
async fn start_instance(port: u16, fleet: &TestFleet, redis: u16) -> Proc {
    start_instance_of(port, fleet, redis, BACKENDS).await
}

/// The same, waiting for `backends` healthy backends.
async fn start_instance_of(port: u16, fleet: &TestFleet, redis: u16, backends: usize) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_corral"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "warn")
        .env("PROXY_HOST", "127.0.0.1")
        .env("PROXY_PORT", port.to_string())
        .env("BACKEND_PORT_START", fleet.port_start.to_string())
        .env("BACKEND_PORT_END", fleet.port_end.to_string())
        .env("SCAN_INTERVAL_SECONDS", "0.2")
        .env("MAX_CONCURRENT_PER_BACKEND", "1")
        .env("QUEUE_TIMEOUT_SECONDS", "60")
        .env("SHARED_STATE", format!("redis://127.0.0.1:{redis}/0"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("corral starts");
    let proc = Proc(child);
    wait_healthy_at(&format!("http://127.0.0.1:{port}"), backends as u64).await;
    proc
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

async fn health(port: u16) -> serde_json::Value {
    get_json_at(&format!("{}/__proxy/health", url(port))).await
}

/// This instance's name in the shared state.
async fn instance_name(port: u16) -> String {
    health(port).await["shared_state"]["instance"]
        .as_str()
        .expect("health names the instance")
        .to_string()
}

/// Slots held by `instance` on any backend, as instance `port` sees them.
async fn held_by(port: u16, instance: &str) -> u64 {
    backend_rows_at(&url(port))
        .await
        .iter()
        .map(|b| b["holders"][instance].as_u64().unwrap_or(0))
        .sum()
}

/// The load: `REQUESTS` spread over the live instances by `CLIENTS` tasks.
/// A request fails only excused when its instance was killed while it ran.
struct Load {
    ports: Vec<u16>,
    alive: Vec<AtomicBool>,
    /// Bumped on every kill of that instance.
    epoch: Vec<AtomicU64>,
    /// Answered by each instance.
    answered_by: Vec<AtomicU64>,
    done: AtomicU64,
    answered: AtomicU64,
    excused: AtomicU64,
    failed: AtomicU64,
}

impl Load {
    fn new(ports: Vec<u16>) -> Arc<Self> {
        Arc::new(Self {
            alive: ports.iter().map(|_| AtomicBool::new(true)).collect(),
            epoch: ports.iter().map(|_| AtomicU64::new(0)).collect(),
            answered_by: ports.iter().map(|_| AtomicU64::new(0)).collect(),
            ports,
            done: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            excused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    fn run(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let next = Arc::new(AtomicU64::new(0));
        (0..CLIENTS)
            .map(|_| {
                let (load, next) = (Arc::clone(self), Arc::clone(&next));
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .timeout(Duration::from_secs(90))
                        .build()
                        .unwrap();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= REQUESTS {
                            return;
                        }
                        load.one(&client, n).await;
                        load.done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect()
    }

    async fn one(&self, client: &reqwest::Client, n: u64) {
        let k = self.ports.len();
        let i = (0..k)
            .map(|d| (n as usize + d) % k)
            .find(|&i| self.alive[i].load(Ordering::SeqCst))
            .expect("a live instance");
        let epoch = self.epoch[i].load(Ordering::SeqCst);
        let result = client
            .post(format!("http://127.0.0.1:{}/api/generate", self.ports[i]))
            .json(&generate("llama3.2", "shared", false))
            .send()
            .await;
        let ok = match result {
            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
            Ok(r) => {
                eprintln!("instance {i}: {}", r.status());
                false
            }
            Err(_) => false,
        };
        if ok {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.answered_by[i].fetch_add(1, Ordering::Relaxed);
        } else if self.epoch[i].load(Ordering::SeqCst) != epoch
            || !self.alive[i].load(Ordering::SeqCst)
        {
            self.excused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn wait_done(&self, n: u64) {
        eventually(Duration::from_secs(60), "requests progress", || async {
            self.done.load(Ordering::Relaxed) >= n
        })
        .await;
    }
}

async fn fleet() -> TestFleet {
    TestFleet::uniform(BACKENDS, slow(2, 3)).await
}

fn assert_never_oversubscribed(fleet: &TestFleet) {
    for s in &fleet.servers {
        let st = s.stats();
        assert!(
            st.concurrent_peak <= 1 && st.oversubscribed == 0,
            "backend {} above its one slot: peak {}, oversubscribed {}",
            s.port(),
            st.concurrent_peak,
            st.oversubscribed
        );
    }
}

/// A simulated backend outside the scanned range, to register.
async fn outside(spec: ServerSpec) -> SimServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    SimServer::start(listener, spec).await.unwrap()
}

/// Registers `backend` at the instance on `port` for `lease` seconds
/// (`None`: until deregistered); answers the HTTP status.
async fn register(port: u16, backend: &SimServer, lease: Option<f64>) -> u16 {
    let body = json!({
        "url": format!("http://127.0.0.1:{}", backend.port()),
        "lease_seconds": lease,
    });
    reqwest::Client::new()
        .post(format!("{}/__proxy/backends", url(port)))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Whether the instance on `port` lists `id` as healthy.
async fn serves(port: u16, id: &str) -> bool {
    backend_row_at(&url(port), id)
        .await
        .is_some_and(|b| b["healthy"] == true && b["draining"] == false)
}

/// Whether Redis on `port` has `member` in the set `key` (SISMEMBER) or the
/// field `member` in the hash `key` (HEXISTS).
async fn redis_has(port: u16, command: &str, key: &str, member: &str) -> bool {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd(command)
        .arg(key)
        .arg(member)
        .query_async::<bool>(&mut conn)
        .await
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_run_loses_its_slots_within_one_lease() {
    if !have_redis() {
        return;
    }
    let fleet = fleet().await;
    let redis_port = free_port();
    let _redis = start_redis(redis_port).await;
    let ports: Vec<u16> = (0..INSTANCES).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for &p in &ports {
        procs.push(start_instance(p, &fleet, redis_port).await);
    }
    let victim = 2;
    let victim_name = instance_name(ports[victim]).await;

    let load = Load::new(ports.clone());
    let tasks = load.run();
    load.wait_done(REQUESTS / 4).await;
    // Wait until the victim holds slots, so its death leaves leases behind.
    eventually(
        Duration::from_secs(10),
        "the victim holds a slot",
        || async { held_by(ports[0], &victim_name).await > 0 },
    )
    .await;
    load.alive[victim].store(false, Ordering::SeqCst);
    load.epoch[victim].fetch_add(1, Ordering::SeqCst);
    procs[victim].kill();
    let killed = Instant::now();
    eventually(
        LEASE_TTL + RENEW_EVERY + Duration::from_millis(500),
        "the dead instance's slots free within one lease TTL",
        || async { held_by(ports[0], &victim_name).await == 0 },
    )
    .await;
    eprintln!(
        "dead instance's slots freed {:?} after the kill",
        killed.elapsed()
    );
    // Restarted on the same port: it takes its share of the load again.
    procs[victim] = start_instance(ports[victim], &fleet, redis_port).await;
    let before_restart = load.answered_by[victim].load(Ordering::SeqCst);
    let done_at_restart = load.done.load(Ordering::SeqCst);
    load.alive[victim].store(true, Ordering::SeqCst);

    for t in tasks {
        t.await.unwrap();
    }
    let (answered, excused, failed) = (
        load.answered.load(Ordering::Relaxed),
        load.excused.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    let after_restart = load.answered_by[victim].load(Ordering::SeqCst) - before_restart;
    eprintln!(
        "answered {answered}, lost with the killed instance {excused}, failed {failed}; \
         the restarted instance answered {after_restart} of the last {}",
        REQUESTS - done_at_restart
    );
    assert!(
        done_at_restart < REQUESTS - 300,
        "the load ended before the restart: the test proves nothing about it"
    );
    assert!(
        after_restart >= (REQUESTS - done_at_restart) / 10,
        "the restarted instance answered only {after_restart} requests"
    );
    assert_eq!(failed, 0, "requests to live instances went unanswered");
    assert!(
        excused <= CLIENTS,
        "only requests in flight on the victim may be lost"
    );
    assert_eq!(answered + excused, REQUESTS);
    assert_never_oversubscribed(&fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_for_five_seconds_degrades_and_never_oversubscribes() {
    if !have_redis() {
        return;
    }
    let fleet = fleet().await;
    let redis_port = free_port();
    let mut redis = start_redis(redis_port).await;
    let ports: Vec<u16> = (0..INSTANCES).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for &p in &ports {
        procs.push(start_instance(p, &fleet, redis_port).await);
    }
    // What Redis must hold again once it comes back empty: a drain made on
    // instance 0 and a registration made on instance 1.
    let drained = fleet.servers[0].port().to_string();
    let r = reqwest::Client::new()
        .post(format!(
            "{}/__proxy/backends/{drained}/drain",
            url(ports[0])
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let extra = outside(slow(2, 3)).await;
    let extra_id = format!("127.0.0.1:{}", extra.port());
    assert_eq!(register(ports[1], &extra, None).await, 201);
    eventually(
        RENEW_EVERY * 3,
        "every instance serves the registration",
        || async {
            for &p in &ports {
                if !serves(p, &extra_id).await {
                    return false;
                }
            }
            true
        },
    )
    .await;

    let load = Load::new(ports.clone());
    let tasks = load.run();
    load.wait_done(REQUESTS / 3).await;
    redis.kill();
    eventually(
        Duration::from_secs(5),
        "health says Redis is gone",
        || async { health(ports[0]).await["shared_state"]["reachable"] == false },
    )
    .await;
    // The outage itself: five seconds without Redis.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = load.done.load(Ordering::Relaxed);
    redis = start_redis(redis_port).await;
    eventually(
        Duration::from_secs(10),
        "health says Redis is back",
        || async { health(ports[0]).await["shared_state"]["reachable"] == true },
    )
    .await;
    eventually(
        RENEW_EVERY * 3,
        "the drain and the registration are written again",
        || async {
            redis_has(redis_port, "SISMEMBER", "corral:drained", &drained).await
                && redis_has(redis_port, "HEXISTS", "corral:registered", &extra_id).await
        },
    )
    .await;
    load.wait_done(during + 100).await;

    for t in tasks {
        t.await.unwrap();
    }
    // Still drained and still registered everywhere, well after the return.
    for &p in &ports {
        let row = backend_row_at(&url(p), &drained).await.unwrap();
        assert_eq!(row["draining"], true, "instance {p} undrained {drained}");
        assert!(serves(p, &extra_id).await, "instance {p} lost {extra_id}");
    }
    drop(redis);
    let (answered, failed) = (
        load.answered.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    eprintln!("answered {answered}, failed {failed}");
    assert_eq!(failed, 0, "requests went unanswered");
    assert_eq!(answered, REQUESTS);
    for p in &mut procs {
        assert!(p.0.try_wait().unwrap().is_none(), "an instance crashed");
    }
    assert_never_oversubscribed(&fleet);
    let st = extra.stats();
    assert!(st.concurrent_peak <= 1 && st.oversubscribed == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_on_one_instance_drains_the_backend_on_all() {
    if !have_redis() {
        return;
    }
    let fleet = TestFleet::uniform(2, slow(2, 3)).await;
    let redis_port = free_port();
    let _redis = start_redis(redis_port).await;
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for &p in &ports {
        procs.push(start_instance_of(p, &fleet, redis_port, 2).await);
    }
    let id = fleet.servers[0].port().to_string();
    let draining_on = |port: u16| {
        let id = id.clone();
        async move {
            backend_row_at(&url(port), &id)
                .await
                .is_some_and(|b| b["draining"] == true)
        }
    };
    // Drained on one, undrained on the other: both see each change.
    for (draining, action, on, other) in [
        (true, "drain", ports[0], ports[1]),
        (false, "undrain", ports[1], ports[0]),
    ] {
        let r = reqwest::Client::new()
            .post(format!("{}/__proxy/backends/{id}/{action}", url(on)))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{action}: {}", r.status());
        eventually(
            RENEW_EVERY * 3,
            &format!("the other instance sees the {action}"),
            || async { draining_on(other).await == draining },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_on_one_instance_is_served_by_all_until_withdrawn_on_any() {
    if !have_redis() {
        return;
    }
    // No range backends: the registered one is all there is. The range's
    // one port is closed, so that a scan never waits on its probe.
    let mut fleet = TestFleet::start(Vec::new(), 1).await;
    fleet.spare.clear();
    let redis_port = free_port();
    let _redis = start_redis(redis_port).await;
    let (a, b) = (free_port(), free_port());
    let _pa = start_instance_of(a, &fleet, redis_port, 0).await;
    let _pb = start_instance_of(b, &fleet, redis_port, 0).await;
    let backend = outside(ServerSpec::default()).await;
    let id = format!("127.0.0.1:{}", backend.port());
    let generate_on = |port: u16| async move {
        let r = reqwest::Client::new()
            .post(format!("{}/api/generate", url(port)))
            .json(&generate("llama3.2", "shared", false))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.headers()["x-corral-backend"]
            .to_str()
            .unwrap()
            .to_string()
    };

    // Registered on A with a 3 s lease: B serves it.
    assert_eq!(register(a, &backend, Some(3.0)).await, 201);
    eventually(RENEW_EVERY * 3, "B serves the registration", || async {
        serves(b, &id).await
    })
    .await;
    assert_eq!(generate_on(b).await, id);
    // Renewed on B for a minute: A keeps serving it past the first lease.
    assert_eq!(register(b, &backend, Some(60.0)).await, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(serves(a, &id).await, "A let the renewed lease run out");
    assert_eq!(generate_on(a).await, id);
    // An instance started now learns it from Redis.
    let c = free_port();
    let _pc = start_instance_of(c, &fleet, redis_port, 1).await;
    assert_eq!(generate_on(c).await, id);

    // Deregistered on B: A and C forget it too.
    let r = reqwest::Client::new()
        .delete(format!("{}/__proxy/backends/{id}", url(b)))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "deregister: {}", r.status());
    eventually(RENEW_EVERY * 3, "A and C forget it", || async {
        backend_row_at(&url(a), &id).await.is_none() && backend_row_at(&url(c), &id).await.is_none()
    })
    .await;

    // A lease that runs out on the instance it was made on runs out on all.
    assert_eq!(register(c, &backend, Some(1.5)).await, 201);
    eventually(RENEW_EVERY * 3, "A serves the new registration", || async {
        serves(a, &id).await
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the lease runs out everywhere",
        || async {
            for p in [a, b, c] {
                if backend_row_at(&url(p), &id).await.is_some() {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_slot_goes_to_the_oldest_waiter_of_any_instance() {
    if !have_redis() {
        return;
    }
    // One one-slot backend, 300 ms a request, shared by A and B.
    let fleet = TestFleet::uniform(1, slow(100, 3)).await;
    let redis_port = free_port();
    let _redis = start_redis(redis_port).await;
    let (a, b) = (free_port(), free_port());
    let _pa = start_instance_of(a, &fleet, redis_port, 1).await;
    let _pb = start_instance_of(b, &fleet, redis_port, 1).await;
    let send = |port: u16| {
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{}/api/generate", url(port)))
                .json(&generate("llama3.2", "oldest", false))
                .timeout(Duration::from_secs(20))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            Instant::now()
        })
    };
    let waiting = |port: u16| async move {
        get_json_at(&format!("{}/__proxy/backends", url(port))).await["queue"]["waiting"]
            .as_u64()
            .unwrap()
    };
    let name_a = instance_name(a).await;
    // A's request holds the slot; B's waits first, then another on A.
    let first = send(a);
    eventually(Duration::from_secs(5), "A holds the slot", || async {
        held_by(a, &name_a).await == 1
    })
    .await;
    let older = send(b);
    eventually(Duration::from_secs(5), "B's request waits", || async {
        waiting(b).await == 1
    })
    .await;
    // The age gap the handover weighs (more than its margin).
    tokio::time::sleep(corral::fleet::shared::YIELD_MARGIN * 4).await;
    let younger = send(a);
    eventually(
        Duration::from_secs(5),
        "A's second request waits",
        || async { waiting(a).await == 1 },
    )
    .await;
    let first = first.await.unwrap();
    let (older, younger) = (older.await.unwrap(), younger.await.unwrap());
    assert!(
        older < younger,
        "A kept the slot for its own younger waiter: B's older one finished {:?} after it",
        older - younger
    );
    assert!(first < older);
    assert_never_oversubscribed(&fleet);
}
