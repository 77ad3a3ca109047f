//! DNS discovery against a DNS server this test starts on loopback (hickory's
//! server with a handler that answers from a record list the test changes):
//! `dns+http://name:port` makes every A address a backend and
//! `dnssrv+http://_ollama._tcp.name` every SRV target; addresses added and
//! removed between scans join and leave the fleet.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestFleet, TestProxy, eventually, generate, start_proxy};
use corral::config::parse_backend_source;
use corral::sim::{ServerSpec, SimServer};
use hickory_proto::op::{Header, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record};
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::net::{TcpListener, UdpSocket};

/// The zone: every record the server answers, changed by the test at will.
#[derive(Clone, Default)]
struct Zone(Arc<Mutex<Vec<Record>>>);

impl Zone {
    fn set(&self, records: Vec<Record>) {
        *self.0.lock().unwrap() = records;
    }
}

fn a(name: &str, ip: Ipv4Addr) -> Record {
    Record::from_rdata(Name::from_str(name).unwrap(), 0, RData::A(A(ip)))
}

fn srv(name: &str, port: u16, target: &str) -> Record {
    let rdata = SRV::new(0, 0, port, Name::from_str(target).unwrap());
    Record::from_rdata(Name::from_str(name).unwrap(), 0, RData::SRV(rdata))
}

#[async_trait::async_trait]
impl RequestHandler for Zone {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut header = Header::response_from_request(request.header());
        header.set_authoritative(true);
        let answers: Vec<Record> = match request.request_info() {
            Ok(info) => {
                let name = Name::from(info.query.name().clone());
                let kind = info.query.query_type();
                self.0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r| r.name().eq_case(&name) && r.record_type() == kind)
                    .cloned()
                    .collect()
            }
            Err(_) => {
                header.set_response_code(ResponseCode::FormErr);
                Vec::new()
            }
        };
        let message = MessageResponseBuilder::from_message_request(request).build(
            header,
            answers.iter(),
            [],
            [],
            [],
        );
        response
            .send_response(message)
            .await
            .unwrap_or_else(|_| header.into())
    }
}

/// Starts the DNS server on loopback (UDP and TCP on one port); it runs
/// until the test's runtime ends.
async fn dns_server(zone: Zone) -> SocketAddr {
    let (udp, tcp, addr) = loopback_pair().await;
    let mut server = ServerFuture::new(zone);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5));
    tokio::spawn(async move { server.block_until_done().await });
    addr
}

/// A UDP socket and a TCP listener on one free loopback port. The UDP port
/// is free when bound, but the same TCP port may be some other test's
/// ephemeral connection: then another port is tried, a bounded number of times.
async fn loopback_pair() -> (UdpSocket, TcpListener, SocketAddr) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp, addr),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("binding TCP {addr}: {e}"),
        }
    }
    panic!("no loopback port free for both UDP and TCP after 50 tries");
}

/// A proxy with an empty range, discovering through `entry` and the test's DNS.
async fn dns_proxy(entry: &str, dns: SocketAddr) -> TestProxy {
    let empty = TestFleet::start(Vec::new(), 1).await;
    let entry = parse_backend_source(entry).unwrap();
    start_proxy(&empty, |a| {
        a.backends = vec![entry];
        a.dns_servers = vec![dns];
        a.scan_interval = Duration::from_millis(100);
    })
    .await
}

async fn ids(proxy: &TestProxy) -> Vec<String> {
    let v = proxy.get_json("/__proxy/backends").await;
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["healthy"] == true)
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_ids(proxy: &TestProxy, want: &[String]) {
    eventually(
        Duration::from_secs(5),
        &format!("backends {want:?}"),
        || async {
            let mut got = ids(proxy).await;
            got.sort();
            let mut want = want.to_vec();
            want.sort();
            got == want
        },
    )
    .await;
}

/// Two simulated servers on one port, at 127.0.0.1 and 127.0.0.2.
async fn two_addresses_one_port() -> (SimServer, SimServer) {
    for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        if let Ok(second) = TcpListener::bind((IpAddr::from([127, 0, 0, 2]), port)).await {
            let spec = ServerSpec {
                check_host: false,
                ..ServerSpec::default()
            };
            return (
                SimServer::start(first, spec.clone()).await.unwrap(),
                SimServer::start(second, spec).await.unwrap(),
            );
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

#[tokio::test]
async fn a_records_become_backends_and_follow_the_zone_between_scans() {
    let (one, two) = two_addresses_one_port().await;
    let port = one.port();
    let zone = Zone::default();
    zone.set(vec![a("gpus.test.", Ipv4Addr::new(127, 0, 0, 1))]);
    let dns = dns_server(zone.clone()).await;
    let proxy = dns_proxy(&format!("dns+http://gpus.test:{port}"), dns).await;
    let first = format!("127.0.0.1:{port}");
    let second = format!("127.0.0.2:{port}");
    wait_ids(&proxy, std::slice::from_ref(&first)).await;

    zone.set(vec![
        a("gpus.test.", Ipv4Addr::new(127, 0, 0, 1)),
        a("gpus.test.", Ipv4Addr::new(127, 0, 0, 2)),
    ]);
    wait_ids(&proxy, &[first.clone(), second.clone()]).await;

    zone.set(vec![a("gpus.test.", Ipv4Addr::new(127, 0, 0, 2))]);
    eventually(
        Duration::from_secs(5),
        "first address forgotten",
        || async {
            let v = proxy.get_json("/__proxy/backends").await;
            let rows = v["backends"].as_array().unwrap().clone();
            rows.len() == 1 && rows[0]["id"] == second.as_str()
        },
    )
    .await;
    let r = proxy
        .post("/api/generate", generate("llama3.2", "hi", false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-corral-backend"], second.as_str());
    assert_eq!(two.stats().completed, 1);

    // The name gone altogether: the fleet empties.
    zone.set(Vec::new());
    wait_ids(&proxy, &[]).await;
}

#[tokio::test]
async fn srv_records_give_targets_and_ports_and_follow_the_zone_between_scans() {
    let fleet = TestFleet::uniform(2, ServerSpec::default()).await;
    let (p1, p2) = (fleet.servers[0].port(), fleet.servers[1].port());
    let zone = Zone::default();
    let name = "_ollama._tcp.gpus.test.";
    let node = a("node1.gpus.test.", Ipv4Addr::LOCALHOST);
    zone.set(vec![srv(name, p1, "node1.gpus.test."), node.clone()]);
    let dns = dns_server(zone.clone()).await;
    let proxy = dns_proxy("dnssrv+http://_ollama._tcp.gpus.test", dns).await;
    let (id1, id2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    wait_ids(&proxy, std::slice::from_ref(&id1)).await;

    zone.set(vec![
        srv(name, p1, "node1.gpus.test."),
        srv(name, p2, "node1.gpus.test."),
        node.clone(),
    ]);
    wait_ids(&proxy, &[id1.clone(), id2.clone()]).await;

    zone.set(vec![srv(name, p2, "node1.gpus.test."), node]);
    eventually(Duration::from_secs(5), "first target forgotten", || async {
        let v = proxy.get_json("/__proxy/backends").await;
        let rows = v["backends"].as_array().unwrap().clone();
        rows.len() == 1 && rows[0]["id"] == id2.as_str()
    })
    .await;
}
