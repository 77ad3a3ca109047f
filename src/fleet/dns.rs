//! DNS discovery: `dns+http://name:port` entries of BACKENDS make every A/AAAA
//! address of `name` a backend; `dnssrv+http://_ollama._tcp.name` entries
//! make every SRV target (each of its addresses, at the record's port) one.
//! Resolved afresh every scan with hickory (no cache, so a record that goes
//! is gone at the next scan), through DNS_SERVERS when set, else the
//! system's resolvers. A lookup that fails outright (timeout, server error)
//! keeps what the entry found before: a DNS hiccup does not empty the fleet;
//! a name that has no records any more does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};

use super::{BackendId, Target};
use crate::config::BackendSource;

/// The targets of one entry, by id.
type Found = BTreeMap<BackendId, Arc<Target>>;

/// One DNS entry of BACKENDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsSource {
    /// Every address of `host`, at `port`.
    Addresses { host: String, port: u16 },
    /// Every target of the SRV records of `name`.
    Srv { name: String },
}

/// The resolver and what each entry found at the last scan.
pub struct DnsDiscovery {
    resolver: TokioResolver,
    sources: Vec<DnsSource>,
    found: Mutex<Vec<Found>>,
}

fn target(ip: IpAddr, port: u16) -> Arc<Target> {
    let addr = SocketAddr::new(ip, port);
    let uri: http::Uri = format!("http://{addr}")
        .parse()
        .expect("a socket address makes a URL");
    Arc::new(Target::new(BackendId::Url(addr.to_string().into()), &uri))
}

impl DnsDiscovery {
    /// The DNS entries of `backends`, or `None` when there are none.
    pub fn new(
        backends: &[BackendSource],
        servers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Option<Self>, String> {
        let sources: Vec<DnsSource> = backends
            .iter()
            .filter_map(|b| match b {
                BackendSource::Url(_) => None,
                BackendSource::Dns { host, port } => Some(DnsSource::Addresses {
                    host: host.clone(),
                    port: *port,
                }),
                BackendSource::Srv { name } => Some(DnsSource::Srv { name: name.clone() }),
            })
            .collect();
        if sources.is_empty() {
            return Ok(None);
        }
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?
        } else {
            let mut config = ResolverConfig::new();
            for addr in servers {
                config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        // Every scan asks again: a job that ended must leave at the next scan.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.timeout = timeout;
        opts.attempts = 1;
        let found = Mutex::new(vec![Found::new(); sources.len()]);
        Ok(Some(Self {
            resolver: builder.build(),
            sources,
            found,
        }))
    }

    /// Resolves every entry. Returns every backend found now, and the ids
    /// found at the last scan but not at this one.
    pub async fn resolve(&self) -> (Vec<Arc<Target>>, Vec<BackendId>) {
        let lookups = self.sources.iter().map(|s| self.lookup(s));
        let results = futures_util::future::join_all(lookups).await;
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        for ((source, result), previous) in self.sources.iter().zip(results).zip(found.iter_mut()) {
            match result {
                Ok(addrs) => {
                    // Keep the same target (and so its slots) for an address still there.
                    let now: Found = addrs
                        .into_iter()
                        .map(|(ip, port)| {
                            let t = target(ip, port);
                            let t = previous.get(&t.id).cloned().unwrap_or(t);
                            (t.id.clone(), t)
                        })
                        .collect();
                    gone.extend(previous.keys().filter(|id| !now.contains_key(id)).cloned());
                    *previous = now;
                }
                Err(error) => {
                    tracing::warn!(%error, entry = ?source, "DNS lookup failed; keeping what it found before");
                }
            }
        }
        let all: Found = found
            .iter()
            .flatten()
            .map(|(id, t)| (id.clone(), Arc::clone(t)))
            .collect();
        // An address that one entry dropped and another still has is not gone.
        gone.retain(|id| !all.contains_key(id));
        gone.sort();
        gone.dedup();
        (all.into_values().collect(), gone)
    }

    /// The addresses of one entry; an empty list when the name has no such records.
    async fn lookup(&self, source: &DnsSource) -> Result<Vec<(IpAddr, u16)>, ResolveError> {
        match source {
            DnsSource::Addresses { host, port } => Ok(self
                .addresses(host)
                .await?
                .into_iter()
                .map(|ip| (ip, *port))
                .collect()),
            DnsSource::Srv { name } => {
                let srv = match self.resolver.srv_lookup(name.as_str()).await {
                    Ok(srv) => srv,
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                };
                let mut out = Vec::new();
                for record in srv.iter() {
                    let host = record.target().to_utf8();
                    for ip in self.addresses(&host).await? {
                        out.push((ip, record.port()));
                    }
                }
                Ok(out)
            }
        }
    }

    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        match self.resolver.lookup_ip(host).await {
            Ok(ips) => Ok(ips.iter().collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}
