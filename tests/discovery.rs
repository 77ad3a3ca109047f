//! Discovery: the range and `BACKENDS` are probed concurrently, so one scan
//! costs one probe timeout however many ports hang (every hanging port is
//! probed before the first is given up); URL backends are
//! served like range backends; a backend that stops answering probes leaves
//! the healthy set.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestFleet, bind_block, generate, start_proxy, test_args, unhung};
use corral::config::BackendSource;
use corral::fleet::discovery::Discovery;
use corral::fleet::{Fleet, Limits};
use corral::sim::{ServerSpec, SimServer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// Ports that accept a probe's connection and never answer.
const HANGING: usize = 20;

#[tokio::test]
async fn a_scan_probes_every_port_at_once_so_hanging_ports_cost_one_timeout() {
    // 20 ports that accept connections but never answer, then 2 real
    // backends, all in one range.
    let mut block = bind_block(22).await;
    let real: Vec<TcpListener> = block.split_off(HANGING);
    let port_start = block[0].local_addr().unwrap().port();
    let servers = corral::sim::start_fleet(real, vec![ServerSpec::default(); 2])
        .await
        .unwrap();
    let fleet_spec = TestFleet {
        servers,
        spare: Vec::new(),
        port_start,
        port_end: port_start + 21,
    };
    let mut args = test_args(&fleet_spec);
    args.probe_timeout = Duration::from_secs(1);
    // Each hanging port holds its probe's connection, unanswered, until the
    // prober gives up on it and closes it. Probed one after the other, the
    // first would be given up before the last was tried.
    let probed = Arc::new(AtomicUsize::new(0));
    let given_up_early = Arc::new(AtomicBool::new(false));
    let holders: Vec<_> = block
        .into_iter()
        .map(|listener| {
            let (probed, early) = (Arc::clone(&probed), Arc::clone(&given_up_early));
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                probed.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                while !matches!(s.read(&mut buf).await, Ok(0) | Err(_)) {}
                if probed.load(Ordering::SeqCst) < HANGING {
                    early.store(true, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let fleet = Fleet::new(
        Limits {
            cap: 1,
            max_queue: 10,
            max_queue_bytes: 1 << 20,
        },
        Duration::from_secs(1),
    );
    let discovery = Discovery::new(fleet.clone(), &args);
    unhung("one scan", discovery.scan()).await;
    for h in holders {
        unhung("every hanging probe given up", h).await.unwrap();
    }
    assert!(
        !given_up_early.load(Ordering::SeqCst),
        "a probe timed out before every hanging port was probed"
    );
    assert_eq!(fleet.read(|s| s.healthy_count()), 2);
}

#[tokio::test]
async fn backends_given_by_url_are_probed_and_served() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outside = SimServer::start(listener, ServerSpec::default())
        .await
        .unwrap();
    // A range with nothing in it, and one backend by URL.
    let empty = TestFleet::start(Vec::new(), 1).await;
    let url: http::Uri = format!("http://127.0.0.1:{}", outside.port())
        .parse()
        .unwrap();
    let proxy = start_proxy(&empty, |a| a.backends = vec![BackendSource::Url(url)]).await;
    proxy.wait_healthy(1).await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    let id = format!("127.0.0.1:{}", outside.port());
    assert_eq!(r.headers()["x-corral-backend"], id.as_str());
    assert!(!r.text().await.unwrap().is_empty());
    let rows = proxy.get_json("/__proxy/backends").await;
    let row = &rows["backends"][0];
    assert_eq!(row["id"], id.as_str());
    assert!(row["port"].is_null());
    assert_eq!(row["requests_served"], 1);
    assert_eq!(row["in_flight"], 0);
    let drained = proxy
        .client
        .post(proxy.at(&format!("/__proxy/backends/{id}/drain")))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
}

#[tokio::test]
async fn a_backend_that_stops_answering_probes_leaves_the_healthy_set() {
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    let proxy = start_proxy(&fleet, |_| {}).await;
    fleet.servers[1].kill().await;
    proxy.wait_healthy(1).await;
    let rows = proxy.get_json("/__proxy/backends").await;
    assert_eq!(rows["backends"][1]["healthy"], false);
    assert!(
        rows["backends"][1]["last_error"]
            .as_str()
            .unwrap()
            .starts_with("probe /api/tags")
    );
}
