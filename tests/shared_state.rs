//! SHARED_STATE: three corral binaries share ten one-slot simulated backends
//! through a real `redis-server` (on a Unix socket of its own; each corral
//! on a loopback port it binds itself). One instance is killed with SIGKILL
//! mid-run and restarted; then Redis itself goes away until every instance
//! has noticed, and comes back empty. Every request to a live instance is
//! answered and no backend ever holds more than its one slot (the
//! simulators' own counters say so). A drain made on one instance reaches
//! the others.
//!
//! Needs Debian's `redis-server` on the PATH (`.ci/run` installs it). Its
//! absence fails the tests, unless `CORRAL_SKIP_REDIS=1` asks to skip them
//! (never under `CI`).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use corral::sim::{ServerSpec, SimServer};
use serde_json::json;

use common::child::{self, Corral};
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

/// Whether `redis-server` can run here. Missing, it fails the test unless
/// `CORRAL_SKIP_REDIS=1` asks to skip (never under `CI`).
fn have_redis() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let install = "redis-server is not installed: `apt-get install -y redis-server`";
    assert!(
        std::env::var_os("CI").is_none(),
        "{install} (the CI script does)"
    );
    assert!(
        std::env::var("CORRAL_SKIP_REDIS").is_ok_and(|v| v == "1"),
        "{install}, or CORRAL_SKIP_REDIS=1 to skip the shared-state tests"
    );
    eprintln!("SKIPPED (CORRAL_SKIP_REDIS=1): {install}");
    false
}

/// A throw-away redis-server on a Unix socket in a directory of its own:
/// no port to find, and a restart listens at the same address for sure. No
/// persistence, so a restart is empty. Killed when dropped, its directory
/// removed.
struct Redis {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Redis {
    async fn start() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("corral-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("redis.sock");
        let mut redis = Self {
            child: None,
            dir,
            socket,
        };
        redis.restart().await;
        redis
    }

    /// `redis+unix://…`, for SHARED_STATE.
    fn url(&self) -> String {
        format!("redis+unix://{}?db=0", self.socket.display())
    }

    /// (Re)starts the server on the same socket and waits until it answers.
    async fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        eventually(Duration::from_secs(10), "redis-server listens", || async {
            tokio::net::UnixStream::connect(&self.socket).await.is_ok()
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection for the test's own look at what Redis holds.
    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_multiplexed_async_connection().await.ok()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A corral binary over `fleet`, sharing state at `redis`, on a port of its
/// own choosing.
async fn start_instance(fleet: &TestFleet, redis: &Redis) -> Corral {
    start_instance_of(fleet, redis, BACKENDS).await
}

/// The same, waiting for `backends` healthy backends.
async fn start_instance_of(fleet: &TestFleet, redis: &Redis, backends: usize) -> Corral {
    let mut command = child::corral();
    command
        .env("LOG_LEVEL", "info")
        .env("BACKEND_PORT_START", fleet.port_start.to_string())
        .env("BACKEND_PORT_END", fleet.port_end.to_string())
        .env("SCAN_INTERVAL_SECONDS", "0.2")
        .env("MAX_CONCURRENT_PER_BACKEND", "1")
        .env("QUEUE_TIMEOUT_SECONDS", "60")
        .env("SHARED_STATE", redis.url());
    let instance = child::spawn(command).await;
    wait_healthy_at(&instance.url, backends as u64).await;
    instance
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
    /// Each instance's port (a restarted one listens on a new port).
    ports: Vec<AtomicU16>,
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
            ports: ports.into_iter().map(AtomicU16::new).collect(),
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
            .post(format!(
                "http://127.0.0.1:{}/api/generate",
                self.ports[i].load(Ordering::SeqCst)
            ))
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

/// Whether Redis has `member` in the set `key` (SISMEMBER) or the field
/// `member` in the hash `key` (HEXISTS).
async fn redis_has(redis: &Redis, command: &str, key: &str, member: &str) -> bool {
    let Some(mut conn) = redis.conn().await else {
        return false;
    };
    redis::cmd(command)
        .arg(key)
        .arg(member)
        .query_async::<bool>(&mut conn)
        .await
        .unwrap_or(false)
}

/// How long ago, by Redis's clock, `instance`'s oldest waiter arrived
/// (`corral:waiting`), if it has one there.
async fn waited_ms(redis: &Redis, instance: &str) -> Option<u64> {
    let mut conn = redis.conn().await?;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.ok()?;
    let arrived: Option<f64> = redis::cmd("ZSCORE")
        .arg("corral:waiting")
        .arg(instance)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some((secs * 1000 + micros / 1000).saturating_sub(arrived? as u64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_run_loses_its_slots_within_one_lease() {
    if !have_redis() {
        return;
    }
    let fleet = fleet().await;
    let redis = Redis::start().await;
    let mut procs = Vec::new();
    for _ in 0..INSTANCES {
        procs.push(start_instance(&fleet, &redis).await);
    }
    let ports: Vec<u16> = procs.iter().map(Corral::port).collect();
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
    // Restarted (on a port of its own again): it takes its share of the load.
    procs[victim] = start_instance(&fleet, &redis).await;
    load.ports[victim].store(procs[victim].port(), Ordering::SeqCst);
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
async fn redis_gone_degrades_every_instance_and_never_oversubscribes() {
    if !have_redis() {
        return;
    }
    let fleet = fleet().await;
    let mut redis = Redis::start().await;
    let mut procs = Vec::new();
    for _ in 0..INSTANCES {
        procs.push(start_instance(&fleet, &redis).await);
    }
    let ports: Vec<u16> = procs.iter().map(Corral::port).collect();
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
    // The outage, until every instance says Redis is gone and holds its
    // requests waiting (one slot over three instances: no local share).
    eventually(
        Duration::from_secs(10),
        "every instance degraded, its requests waiting",
        || async {
            for &p in &ports {
                let waiting =
                    get_json_at(&format!("{}/__proxy/backends", url(p))).await["queue"]["waiting"]
                        .as_u64()
                        .unwrap_or(0);
                if health(p).await["shared_state"]["reachable"] != false || waiting == 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let during = load.done.load(Ordering::Relaxed);
    redis.restart().await;
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
            redis_has(&redis, "SISMEMBER", "corral:drained", &drained).await
                && redis_has(&redis, "HEXISTS", "corral:registered", &extra_id).await
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
        assert!(p.child.try_wait().unwrap().is_none(), "an instance crashed");
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
    let redis = Redis::start().await;
    let mut procs = Vec::new();
    for _ in 0..2 {
        procs.push(start_instance_of(&fleet, &redis, 2).await);
    }
    let ports: Vec<u16> = procs.iter().map(Corral::port).collect();
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
    let redis = Redis::start().await;
    let pa = start_instance_of(&fleet, &redis, 0).await;
    let pb = start_instance_of(&fleet, &redis, 0).await;
    let (a, b) = (pa.port(), pb.port());
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
    // A witness registered on A after it with the same lease, never
    // renewed, shows when that first lease has run out on A.
    assert_eq!(register(b, &backend, Some(60.0)).await, 200);
    let witness = outside(ServerSpec::default()).await;
    let witness_id = format!("127.0.0.1:{}", witness.port());
    assert_eq!(register(a, &witness, Some(3.0)).await, 201);
    eventually(
        Duration::from_secs(10),
        "the witness's lease runs out on A",
        || async { backend_row_at(&url(a), &witness_id).await.is_none() },
    )
    .await;
    assert!(serves(a, &id).await, "A let the renewed lease run out");
    assert_eq!(generate_on(a).await, id);
    // An instance started now learns it from Redis.
    let pc = start_instance_of(&fleet, &redis, 1).await;
    let c = pc.port();
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
    let redis = Redis::start().await;
    let pa = start_instance_of(&fleet, &redis, 1).await;
    let pb = start_instance_of(&fleet, &redis, 1).await;
    let (a, b) = (pa.port(), pb.port());
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
    let (name_a, name_b) = (instance_name(a).await, instance_name(b).await);
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
    // The age gap the handover weighs: B's waiter older, by Redis's clock,
    // than its margin four times over before A's younger one arrives.
    let gap = corral::fleet::shared::YIELD_MARGIN.as_millis() as u64 * 4;
    eventually(
        Duration::from_secs(5),
        "B's waiter is old enough",
        || async { waited_ms(&redis, &name_b).await.is_some_and(|ms| ms > gap) },
    )
    .await;
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
