//! Discovery: every scan interval, probe every port of the range and every
//! `BACKENDS` URL with `GET /api/tags`, all at once, and apply the results to
//! the fleet in one step. A backend that answers with a readable model list is
//! healthy; anything else makes it unhealthy. Healthy ones are also asked
//! `/api/ps` (loaded models) and `/api/version`.
//!
//! Besides the range and the fixed URLs, each scan probes the backends that
//! registered themselves ([`Registry`]) and those that DNS entries resolve to
//! now ([`DnsDiscovery`]). One whose lease ran out, that was deregistered or
//! whose DNS record went is drained, and forgotten once nothing is in flight.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dns::DnsDiscovery;
use super::registry::Registry;
use super::{BackendId, Fleet, ProbeReport, Target};
use crate::config::{BackendSource, ServeArgs};
use crate::failure::FailureKind;

/// Range backends that fail this many probes in a row, with nothing in
/// flight, are forgotten (their metrics series retire with them).
const FORGET_AFTER_FAILED_PROBES: u32 = 12;

/// Largest probe answer read; a real `/api/tags` of hundreds of models is far smaller.
const MAX_PROBE_BODY: usize = 8 << 20;

/// The scan loop and its settings. Probes go over each backend's own
/// connections, like requests.
pub struct Discovery {
    fleet: Fleet,
    range: Vec<Arc<Target>>,
    extra: Vec<Arc<Target>>,
    registry: Arc<Registry>,
    dns: Option<DnsDiscovery>,
    /// Backends of DNS entries that are no longer in DNS: drained, forgotten when idle.
    dns_retiring: Mutex<BTreeSet<BackendId>>,
    interval: Duration,
    timeout: Duration,
}

/// The outcome of probing one backend.
pub type ProbeResult = Result<ProbeReport, ProbeError>;

/// Why a probe found a backend unhealthy.
#[derive(Debug, thiserror::Error)]
#[error("probe {path}: {detail}")]
pub struct ProbeError {
    kind: ProbeFailure,
    path: &'static str,
    detail: String,
}

/// The kinds of probe failure: those a request can have, and two of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailure {
    /// Connect, timeout, reset or an answer that was not HTTP.
    Request(FailureKind),
    /// A status other than 2xx.
    Status(http::StatusCode),
    /// An answer that is not an Ollama model list.
    NotOllama,
}

impl ProbeError {
    fn new(kind: ProbeFailure, path: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind,
            path,
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> ProbeFailure {
        self.kind
    }
}

impl Discovery {
    /// Discovery over the range and `BACKENDS` of `args`; the `BACKENDS` URLs
    /// are added to the fleet at once (unhealthy until probed).
    ///
    /// # Panics
    /// When `args` has DNS entries and the system's DNS configuration cannot
    /// be read; [`Discovery::try_new`] says so instead.
    pub fn new(fleet: Fleet, args: &ServeArgs) -> Self {
        Self::try_new(fleet, args, Arc::default()).expect("DNS configuration")
    }

    /// Discovery that also probes the backends registered in `registry`.
    pub fn try_new(
        fleet: Fleet,
        args: &ServeArgs,
        registry: Arc<Registry>,
    ) -> Result<Self, String> {
        let range = (args.backend_port_start..=args.backend_port_end)
            .filter_map(|port| {
                let uri = format!("http://{}:{port}", args.backend_host)
                    .parse()
                    .ok()?;
                Some(Arc::new(Target::new(BackendId::Port(port), &uri)))
            })
            .collect();
        let dns = DnsDiscovery::new(&args.backends, &args.dns_servers, args.probe_timeout)?;
        let extra: Vec<Arc<Target>> = args
            .backends
            .iter()
            .filter_map(|b| {
                let BackendSource::Url(uri) = b else {
                    return None;
                };
                let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
                Some(Arc::new(Target::new(BackendId::Url(authority.into()), uri)))
            })
            .collect();
        fleet.update(|s| {
            for t in &extra {
                s.add_backend(Arc::clone(t));
            }
        });
        Ok(Self {
            fleet,
            range,
            extra,
            registry,
            dns,
            dns_retiring: Mutex::default(),
            interval: args.scan_interval,
            timeout: args.probe_timeout,
        })
    }

    /// Scans until `shutdown` is cancelled; `ready` is cancelled after the first scan.
    pub async fn run(self, shutdown: CancellationToken, ready: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                // A new registration is probed at once, not a scan interval later.
                () = self.registry.changed.notified() => {}
            }
            self.scan().await;
            ready.cancel();
        }
    }

    /// Probes every backend once, concurrently, and applies the results.
    pub async fn scan(&self) {
        let started = Instant::now();
        for id in self.registry.expire(started) {
            tracing::info!(backend = %id, "lease ran out: draining, forgotten when idle");
            // Every instance runs the same lease out: nothing to share.
            self.fleet.set_draining_here(&id, true);
        }
        let dns = match &self.dns {
            Some(dns) => self.resolve(dns).await,
            None => Vec::new(),
        };
        let registered = self.registry.live();
        let probes: FuturesUnordered<_> = self
            .range
            .iter()
            .chain(&self.extra)
            .chain(&registered)
            .chain(&dns)
            .map(|t| async move { (t, self.probe(t).await) })
            .collect();
        let results: Vec<_> = probes.collect().await;
        let retiring = self.retiring();
        // Registrations withdrawn (and maybe forgotten at once) while their
        // probe ran: not brought back either.
        let withdrawn: BTreeSet<BackendId> = registered
            .iter()
            .filter(|t| !self.registry.is_live(&t.id))
            .map(|t| t.id.clone())
            .collect();
        let (healthy, forgotten) = self.fleet.update(|s| {
            for (target, result) in results {
                // Deregistered or out of DNS while its probe ran: not brought back.
                if !retiring.contains(&target.id) && !withdrawn.contains(&target.id) {
                    apply(s, target, result);
                }
            }
            let mut forgotten = Vec::new();
            for id in retiring {
                if s.backends().get(&id).is_none_or(|b| b.in_flight == 0) {
                    s.remove_backend(&id);
                    forgotten.push(id);
                }
            }
            (s.healthy_count(), forgotten)
        });
        for id in forgotten {
            self.registry.forget(&id);
            self.dns_retiring().remove(&id);
            tracing::info!(backend = %id, "backend drained and forgotten");
        }
        tracing::debug!(
            healthy,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "scan done"
        );
    }

    /// Resolves the DNS entries; what left DNS starts retiring (drained),
    /// what came back stops retiring.
    async fn resolve(&self, dns: &DnsDiscovery) -> Vec<Arc<Target>> {
        let (found, gone) = dns.resolve().await;
        let mut retiring = self.dns_retiring();
        let undrain: Vec<BackendId> = found
            .iter()
            .filter(|t| retiring.remove(&t.id))
            .map(|t| t.id.clone())
            .collect();
        let drain: Vec<BackendId> = gone
            .into_iter()
            .filter(|id| retiring.insert(id.clone()))
            .collect();
        drop(retiring);
        for id in undrain {
            tracing::info!(backend = %id, "back in DNS");
            self.fleet.set_draining(&id, false);
        }
        for id in drain {
            tracing::info!(backend = %id, "gone from DNS: draining, forgotten when idle");
            self.fleet.set_draining(&id, true);
        }
        found
    }

    /// Everything retiring now: expired or deregistered leases and addresses gone from DNS.
    fn retiring(&self) -> BTreeSet<BackendId> {
        let mut ids: BTreeSet<BackendId> = self.registry.retiring().into_iter().collect();
        ids.extend(self.dns_retiring().iter().cloned());
        ids
    }

    fn dns_retiring(&self) -> MutexGuard<'_, BTreeSet<BackendId>> {
        self.dns_retiring.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn probe(&self, target: &Target) -> ProbeResult {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let tags = self.get_json(target, "/api/tags", deadline).await?;
        let latency = started.elapsed();
        let tags = model_entries(&tags).ok_or_else(|| {
            ProbeError::new(ProbeFailure::NotOllama, "/api/tags", "no model list")
        })?;
        // Loaded models and version are extras: a backend that cannot answer
        // them is still healthy.
        let (ps, version) = tokio::join!(
            self.get_json(target, "/api/ps", deadline),
            self.get_json(target, "/api/version", deadline)
        );
        let ps = ps.ok().as_ref().and_then(model_entries).unwrap_or_default();
        Ok(ProbeReport {
            models: tags.iter().filter_map(entry_name).collect(),
            loaded: ps.iter().filter_map(entry_name).collect(),
            tags,
            ps,
            version: version
                .ok()
                .and_then(|v| v.get("version")?.as_str().map(str::to_owned)),
            latency: Some(latency),
        })
    }

    async fn get_json(
        &self,
        target: &Target,
        path: &'static str,
        deadline: Instant,
    ) -> Result<Value, ProbeError> {
        let fail = |kind, detail: String| ProbeError::new(kind, path, detail);
        let failed = |kind, detail: String| fail(ProbeFailure::Request(kind), detail);
        let uri = target
            .path(&http::uri::PathAndQuery::from_static(path))
            .map_err(|e| failed(FailureKind::Connect, format!("bad URL: {e}")))?;
        let mut request = http::Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        request
            .headers_mut()
            .insert(http::header::HOST, target.authority.clone());
        let fetch = async {
            let response = target
                .conns
                .send(request, self.timeout)
                .await
                .map_err(|e| failed(e.kind(), e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                let detail = format!("status {status}");
                return Err(fail(ProbeFailure::Status(status), detail));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_PROBE_BODY)
                .collect()
                .await
                .map_err(|e| {
                    // Too long for a model list, or the connection broke.
                    let kind = if e.is::<http_body_util::LengthLimitError>() {
                        ProbeFailure::NotOllama
                    } else {
                        ProbeFailure::Request(FailureKind::Reset)
                    };
                    fail(kind, format!("reading body: {e}"))
                })?
                .to_bytes();
            serde_json::from_slice(&body)
                .map_err(|e| fail(ProbeFailure::NotOllama, format!("not JSON: {e}")))
        };
        tokio::time::timeout_at(deadline, fetch)
            .await
            .unwrap_or_else(|_| Err(failed(FailureKind::Timeout, "timed out".into())))
    }
}

/// Applies one probe result under the fleet lock, logging health changes once.
fn apply<W>(s: &mut super::scheduler::Scheduler<W>, target: &Arc<Target>, result: ProbeResult) {
    let id = &target.id;
    match result {
        Ok(report) => {
            s.add_backend(Arc::clone(target));
            let was_healthy = s.backends().get(id).is_some_and(|b| b.healthy);
            let models = report.models.join(",");
            let replaced = s.apply_probe(id, report);
            if !was_healthy {
                tracing::info!(backend = %id, %models, replaced, "backend healthy");
            } else if replaced {
                tracing::info!(backend = %id, %models, "another server on the backend's port");
            }
        }
        Err(error) => {
            let Some(backend) = s.backend_mut(id) else {
                return;
            };
            backend.failed_probes = backend.failed_probes.saturating_add(1);
            let forget = matches!(id, BackendId::Port(_))
                && backend.failed_probes >= FORGET_AFTER_FAILED_PROBES
                && backend.in_flight == 0;
            if s.mark_unhealthy(id, error.to_string()) {
                tracing::warn!(backend = %id, %error, "backend unhealthy");
            }
            if forget {
                tracing::info!(backend = %id, "backend forgotten");
                s.remove_backend(id);
            }
        }
    }
}

/// The `models` array of a `/api/tags` or `/api/ps` answer.
fn model_entries(v: &Value) -> Option<Vec<Value>> {
    v.get("models")?.as_array().cloned()
}

/// A model entry's name: `model`, else `name`.
fn entry_name(entry: &Value) -> Option<String> {
    entry
        .get("model")
        .or_else(|| entry.get("name"))?
        .as_str()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Limits;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend at a loopback port answering every request with `answer`.
    async fn answering(answer: &'static str) -> Arc<Target> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        target(port)
    }

    fn target(port: u16) -> Arc<Target> {
        let uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        Arc::new(Target::new(BackendId::Port(port), &uri))
    }

    fn discovery() -> Discovery {
        let mut args = ServeArgs::defaults();
        args.backend_port_start = 1;
        args.backend_port_end = 1;
        let limits = Limits {
            cap: 1,
            max_queue: 1,
            max_queue_bytes: 1,
        };
        Discovery::new(Fleet::new(limits, Duration::from_secs(1)), &args)
    }

    #[tokio::test]
    async fn probe_failures_are_typed() {
        let d = discovery();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = target(listener.local_addr().unwrap().port());
        drop(listener);
        let kind = |r: ProbeResult| r.map(|_| ()).unwrap_err().kind();
        assert_eq!(
            kind(d.probe(&closed).await),
            ProbeFailure::Request(FailureKind::Connect)
        );
        let missing = answering("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(
            kind(d.probe(&missing).await),
            ProbeFailure::Status(http::StatusCode::NOT_FOUND)
        );
        let html = answering("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n<html>").await;
        assert_eq!(kind(d.probe(&html).await), ProbeFailure::NotOllama);
        let garbage = answering("SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        assert_eq!(
            kind(d.probe(&garbage).await),
            ProbeFailure::Request(FailureKind::Body)
        );
        let ollama = answering(
            "HTTP/1.1 200 OK\r\ncontent-length: 31\r\n\r\n{\"models\":[{\"model\":\"llama3\"}]}",
        )
        .await;
        let report = d.probe(&ollama).await.unwrap();
        assert_eq!(report.models, ["llama3"]);
        // `/api/tags` gave its connection back; `/api/ps` and `/api/version`
        // run at once, one on it and one on a new connection: both kept.
        assert_eq!(ollama.conns.idle_count(), 2);
    }
}
