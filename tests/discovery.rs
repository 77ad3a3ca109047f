//! Discovery: the range and `BACKENDS` are probed concurrently, so one scan
//! takes about one probe timeout however many ports hang; URL backends are
//! served like range backends; a backend that stops answering probes leaves
//! the healthy set.

mod common;

use std::time::{Duration, Instant};

use common::{TestFleet, bind_block, generate, start_proxy, test_args};
use corral::config::BackendSource;
use corral::fleet::discovery::Discovery;
use corral::fleet::{Fleet, Limits};
use corral::sim::{ServerSpec, SimServer};
use tokio::net::TcpListener;

#[tokio::test]
async fn a_scan_probes_every_port_at_once_so_hanging_ports_cost_one_timeout() {
    // 20 ports that accept connections (the kernel does) but never answer,
    // then 2 real backends, all in one range.
    let mut block = bind_block(22).await;
    let real: Vec<TcpListener> = block.split_off(20);
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
    args.probe_timeout = Duration::from_millis(300);

    let fleet = Fleet::new(
        Limits {
            cap: 1,
            max_queue: 10,
            max_queue_bytes: 1 << 20,
        },
        Duration::from_secs(1),
    );
    let discovery = Discovery::new(fleet.clone(), &args);
    let started = Instant::now();
    discovery.scan().await;
    let elapsed = started.elapsed();
    // One after the other, the hanging ports alone would take 20 × 300 ms.
    assert!(
        elapsed < Duration::from_millis(300 * 5),
        "scan took {elapsed:?}"
    );
    assert_eq!(fleet.read(|s| s.healthy_count()), 2);
    drop(block);
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
