//! `corral register` as a batch job runs it, against `corral sim` backends:
//! it registers, renews its lease past several lease periods, and on SIGTERM
//! drains, lets in-flight requests finish and deregisters, exiting 0, with
//! no request lost while a load runs. A refused registration is one line and
//! exit 1. A restarted corral relearns the backend from the next renewal.

mod common;

use common::child::{self, corral};

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestFleet, TestProxy, eventually, generate, slow, start_proxy};
use corral::sim::{ServerSpec, SimServer};
use tokio::net::TcpListener;

#[tokio::test]
async fn register_renews_then_on_sigterm_drains_and_deregisters_losing_nothing() {
    // One backend in the range keeps serving after the job leaves.
    let fleet = TestFleet::uniform(1, slow(10, 5)).await;
    let proxy = start_proxy(&fleet, |a| a.scan_interval = Duration::from_millis(100)).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let job = SimServer::start(listener, slow(40, 10)).await.unwrap();
    let id = format!("127.0.0.1:{}", job.port());
    // Where the helper checks that its Ollama answers, once a renewal (a
    // third of the lease): its `/api/tags` count is the helper's ticks.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let check = SimServer::start(listener, ServerSpec::default())
        .await
        .unwrap();
    let ticks = || {
        check
            .stats()
            .requests
            .get("/api/tags")
            .copied()
            .unwrap_or(0)
    };
    let lease = 0.6;
    let child = corral()
        .args([
            "register",
            "--proxy",
            &proxy.url,
            "--lease",
            &lease.to_string(),
        ])
        .args(["--url", &format!("http://{id}"), "--grace", "10"])
        .args(["--check", &format!("http://{}", check.addr())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    proxy.wait_healthy(2).await;

    // Renewed: still registered and in service well past three lease
    // periods, that is nine renewals (ten ticks) after the registration.
    eventually(Duration::from_secs(10), "three lease periods", || async {
        let r = proxy.backend_row(&id).await.expect("still registered");
        assert_eq!(r["draining"], false, "{r}");
        assert_eq!(r["healthy"], true, "{r}");
        ticks() >= 10
    })
    .await;

    // A load of 4 clients, each request after the other, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, url, stop) = (proxy.client.clone(), proxy.url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 400 {
                    let r = client
                        .post(format!("{url}/api/generate"))
                        .json(&generate("llama3.2", &format!("w{w} r{i}"), false))
                        .send()
                        .await;
                    statuses.push(match r {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    });
                    i += 1;
                }
                statuses
            })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "a request in flight on the job",
        || async { job.stats().in_flight >= 1 },
    )
    .await;
    child::signal(&child, "TERM");
    let out = child::exited(child, Duration::from_secs(20), "corral register exits").await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {log}", out.status);
    assert!(
        proxy.backend_row(&id).await.is_none(),
        "deregistered on exit: {log}"
    );
    // The job's Ollama finished all it was given before the helper left.
    assert_eq!(job.stats().in_flight, 0);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let statuses = w.await.unwrap();
        total += statuses.len();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    assert!(total > 0);
    assert!(job.stats().completed > 0);
    assert!(
        !log.contains("\x1b["),
        "no colour codes when stderr is not a terminal: {log}"
    );
}

#[tokio::test]
async fn a_refused_registration_exits_1_with_one_line() {
    let fleet = TestFleet::uniform(1, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |a| a.registration_key = "right".into()).await;
    let backend = fleet.servers[0].port();
    let out = corral()
        .args(["register", "--proxy", &proxy.url])
        .args(["--url", &format!("http://127.0.0.1:{backend}")])
        .env("REGISTRATION_KEY", "wrong")
        .env("LOG_LEVEL", "ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child::exited(out, Duration::from_secs(10), "corral register exits").await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("corral: the proxy refused the registration: 401"),
        "{err}"
    );
}

#[tokio::test]
async fn a_restarted_corral_relearns_the_backend_from_the_next_renewal() {
    let empty = TestFleet::start(Vec::new(), 1).await;
    // One listening socket for both corrals: the second takes it over, so
    // the address is never free for anything else in between.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    let mut args = common::test_args(&empty);
    args.scan_interval = Duration::from_secs(60);
    let listener = TcpListener::from_std(socket.try_clone().unwrap()).unwrap();
    let first = TestProxy {
        handle: corral::proxy::start(listener, args.clone()).unwrap(),
        url: format!("http://{addr}"),
        client: reqwest::Client::new(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let job = SimServer::start(listener, ServerSpec::default())
        .await
        .unwrap();
    let id = format!("127.0.0.1:{}", job.port());
    let child = corral()
        .args(["register", "--proxy", &first.url, "--lease", "0.9"])
        .args(["--url", &format!("http://{id}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    first.wait_healthy(1).await;
    // corral restarts on the same address, knowing nothing.
    first.handle.shutdown().await;
    let listener = TcpListener::from_std(socket).unwrap();
    let second = TestProxy {
        handle: corral::proxy::start(listener, args).unwrap(),
        url: format!("http://{addr}"),
        client: reqwest::Client::new(),
    };
    // The next renewal (a third of the lease) registers it again.
    eventually(
        Duration::from_secs(5),
        "relearned from a renewal",
        || async {
            second
                .backend_row(&id)
                .await
                .is_some_and(|r| r["healthy"] == true)
        },
    )
    .await;
    let r = second
        .post("/api/generate", generate("llama3.2", "again", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], id.as_str());
    child::signal(&child, "TERM");
    let out = child::exited(child, Duration::from_secs(10), "corral register exits").await;
    assert!(out.status.success());
}

#[tokio::test]
async fn a_job_registers_as_soon_as_its_ollama_first_answers() {
    let empty = TestFleet::start(Vec::new(), 1).await;
    let proxy = start_proxy(&empty, |a| a.scan_interval = Duration::from_secs(60)).await;
    // The job's port is bound before Ollama is up: until then it hangs up on
    // every connection, as a port whose server has not started does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let id = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let refuser = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        drop(conn);
        tx.send(()).await.unwrap();
        listener
    });
    // A lease of 30 s renews every 10 s: a helper that checked only at that
    // pace would register 10 s after Ollama came up.
    let child = child::Reaped::new(
        corral()
            .args(["register", "--proxy", &proxy.url, "--lease", "30"])
            .args(["--url", &format!("http://{id}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the helper looked for its Ollama");
    let listener = refuser.await.unwrap();
    let _job = SimServer::start(listener, ServerSpec::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(3),
        "registered well within a renewal period of Ollama answering",
        || async {
            proxy
                .backend_row(&id)
                .await
                .is_some_and(|r| r["healthy"] == true)
        },
    )
    .await;
    child::signal(&child, "TERM");
    let out = child::exited(
        child.take(),
        Duration::from_secs(10),
        "corral register exits",
    )
    .await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("waiting for the local Ollama to answer"),
        "{log}"
    );
    assert!(
        !log.contains("not renewing"),
        "no warning before anything was registered: {log}"
    );
}
