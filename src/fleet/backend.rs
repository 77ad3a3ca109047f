//! One backend as the fleet knows it: its identity, health, models and
//! counters, and its [`Target`] (where requests go, with corral's kept
//! connections there). The scheduler and discovery change it under the
//! fleet lock.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::model::ModelName;
use crate::pool::Conns;

/// Names a backend: its port for the scanned range, its URL's authority for a
/// `BACKENDS` entry. Range backends sort first, by port, so that "lowest port"
/// tie-breaks are deterministic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendId {
    /// A backend of the scanned port range.
    Port(u16),
    /// A backend named in `BACKENDS`, by `host:port`.
    Url(Arc<str>),
}

impl BackendId {
    /// Parses the id as `/__proxy/backends/{id}/drain` spells it.
    pub fn parse(s: &str) -> Self {
        match s.parse::<u16>() {
            Ok(port) => Self::Port(port),
            Err(_) => Self::Url(s.into()),
        }
    }

    /// The port for range backends.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Port(p) => Some(*p),
            Self::Url(_) => None,
        }
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Port(p) => write!(f, "{p}"),
            Self::Url(a) => f.write_str(a),
        }
    }
}

impl Serialize for BackendId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Port(p) => s.serialize_u16(*p),
            Self::Url(a) => s.serialize_str(a),
        }
    }
}

/// Where requests for a backend go: fixed for the backend's lifetime, shared
/// with every slot so that forwarding needs no lock.
#[derive(Debug)]
pub struct Target {
    pub id: BackendId,
    /// Base URL without a trailing slash, `http://127.0.0.1:24001`.
    pub base: String,
    /// The `host:port` to send as `Host`: Ollama on loopback refuses others.
    pub authority: http::HeaderValue,
    /// A path prefix of a `BACKENDS` URL (`/ollama`), usually empty.
    prefix: String,
    /// The id as text, for metric labels and `X-Corral-Backend`, made once.
    pub label: Arc<str>,
    /// The id as a header value.
    pub header: http::HeaderValue,
    /// corral's connections to it.
    pub conns: Arc<Conns>,
}

impl Target {
    /// A target from a base URL such as `http://127.0.0.1:24001` or `http://gpu7:11434/ollama`.
    pub fn new(id: BackendId, base: &http::Uri) -> Self {
        let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
        let path = base.path().trim_end_matches('/');
        let label: Arc<str> = id.to_string().into();
        let address = match base.port_u16() {
            Some(_) => authority.to_owned(),
            None => format!("{}:80", base.host().unwrap_or_default()),
        };
        Self {
            conns: Arc::new(Conns::new(address)),
            header: http::HeaderValue::from_str(&label)
                .unwrap_or_else(|_| http::HeaderValue::from_static("unnamed")),
            label,
            id,
            prefix: path.to_owned(),
            base: format!("http://{authority}{path}"),
            authority: http::HeaderValue::from_str(authority)
                .unwrap_or_else(|_| http::HeaderValue::from_static("localhost")),
        }
    }

    /// The request target of `path_and_query` on this backend, in origin
    /// form (`/api/chat`) as a request on one of its connections carries it.
    /// Without a path prefix it is the path itself, with no formatting.
    pub fn path(&self, path_and_query: &http::uri::PathAndQuery) -> Result<http::Uri, http::Error> {
        if self.prefix.is_empty() {
            return Ok(http::Uri::from(path_and_query.clone()));
        }
        Ok(http::Uri::try_from(format!(
            "{}{path_and_query}",
            self.prefix
        ))?)
    }
}

/// What a successful probe found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeReport {
    /// Models of `/api/tags`, as the backend spells them.
    pub models: Vec<String>,
    /// The `/api/tags` entries themselves, for the fleet-wide `/api/tags`.
    pub tags: Vec<serde_json::Value>,
    /// Models of `/api/ps`, as the backend spells them.
    pub loaded: Vec<String>,
    /// The `/api/ps` entries themselves, for the fleet-wide `/api/ps`.
    pub ps: Vec<serde_json::Value>,
    /// `/api/version`, when the backend answered it.
    pub version: Option<String>,
    /// How long its `/api/tags` took to answer.
    pub latency: Option<std::time::Duration>,
}

/// A backend's state.
#[derive(Debug)]
pub struct Backend {
    pub target: Arc<Target>,
    /// Healthy: the last probe succeeded and no request failed on it since.
    pub healthy: bool,
    /// Drained: finishes what it has, gets nothing new.
    pub draining: bool,
    /// Models its last successful probe listed, normalised.
    pub models: HashSet<ModelName>,
    /// Models its last successful probe found loaded, normalised.
    pub loaded: HashSet<ModelName>,
    /// The last successful probe's findings, for the fleet-wide views.
    pub report: ProbeReport,
    /// Requests holding a slot on it now.
    pub in_flight: u32,
    /// Slots other corral instances hold on it, as the shared state last
    /// said (SHARED_STATE; always 0 without it).
    pub foreign: u32,
    /// Who holds its slots, instance by instance, as the shared state last
    /// said (empty without SHARED_STATE).
    pub holders: std::collections::BTreeMap<String, u32>,
    /// Why it was last marked unhealthy.
    pub last_error: Option<String>,
    /// Requests it answered (any status) since it (re)appeared.
    pub served: u64,
    /// Attempts that failed on it since it (re)appeared.
    pub failures: u64,
    /// Probes in a row that failed; reset by a successful one.
    pub failed_probes: u32,
}

impl Backend {
    /// A backend not yet probed: unhealthy, no models.
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            healthy: false,
            draining: false,
            models: HashSet::new(),
            loaded: HashSet::new(),
            report: ProbeReport::default(),
            in_flight: 0,
            foreign: 0,
            holders: std::collections::BTreeMap::new(),
            last_error: None,
            served: 0,
            failures: 0,
            failed_probes: 0,
        }
    }

    /// Whether the backend listed `model` at its last probe; `None` (a request
    /// without a model) fits any backend, which then gives its own error.
    pub fn has_model(&self, model: Option<&ModelName>) -> bool {
        model.is_none_or(|m| self.models.contains(m))
    }

    /// Whether `model` is loaded there.
    pub fn has_loaded(&self, model: Option<&ModelName>) -> bool {
        model.is_some_and(|m| self.loaded.contains(m))
    }

    /// Records a successful probe. Returns true when this looks like another
    /// server than before (another model list or another version than the
    /// last probe found: a new batch job on a reused port, whether or not a
    /// failed request or probe saw the old one go), in which case the
    /// counters and the last error start afresh.
    pub fn apply_probe(&mut self, report: ProbeReport) -> bool {
        let probed_before = !self.report.models.is_empty() || self.report.version.is_some();
        let replaced = probed_before
            && (self.report.models != report.models || self.report.version != report.version);
        if replaced {
            self.served = 0;
            self.failures = 0;
            self.last_error = None;
        }
        self.models = report.models.iter().map(|m| ModelName::parse(m)).collect();
        self.loaded = report.loaded.iter().map(|m| ModelName::parse(m)).collect();
        self.report = report;
        self.healthy = true;
        self.failed_probes = 0;
        replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(models: &[&str], version: &str) -> ProbeReport {
        ProbeReport {
            models: models.iter().map(|m| m.to_string()).collect(),
            loaded: models.iter().take(1).map(|m| m.to_string()).collect(),
            version: Some(version.into()),
            ..ProbeReport::default()
        }
    }

    fn backend() -> Backend {
        let uri: http::Uri = "http://127.0.0.1:24001".parse().unwrap();
        Backend::new(Arc::new(Target::new(BackendId::Port(24001), &uri)))
    }

    #[test]
    fn another_server_on_the_port_starts_with_fresh_counters_and_models() {
        let mut b = backend();
        assert!(!b.apply_probe(report(&["llama3"], "0.5.0")), "first probe");
        b.served = 7;
        b.failures = 2;
        b.last_error = Some("boom".into());
        assert!(!b.apply_probe(report(&["llama3"], "0.5.0")), "same server");
        assert_eq!(b.served, 7);
        // Replaced between two scans, without ever being seen down.
        assert!(b.apply_probe(report(&["mistral"], "0.5.0")));
        assert_eq!((b.served, b.failures, b.last_error.clone()), (0, 0, None));
        assert!(b.has_model(Some(&ModelName::parse("mistral"))));
        assert!(!b.has_model(Some(&ModelName::parse("llama3"))));
        assert!(b.has_loaded(Some(&ModelName::parse("mistral"))));
        b.served = 3;
        assert!(
            b.apply_probe(report(&["mistral"], "0.6.0")),
            "another version"
        );
        assert_eq!(b.served, 0);
    }

    #[test]
    fn request_paths_keep_the_path_prefix_of_a_backends_url() {
        let pq = http::uri::PathAndQuery::from_static("/api/chat?x=1");
        let plain = Target::new(
            BackendId::Port(24001),
            &"http://127.0.0.1:24001".parse().unwrap(),
        );
        assert_eq!(plain.path(&pq).unwrap(), "/api/chat?x=1");
        assert_eq!(plain.authority, "127.0.0.1:24001");
        let prefixed = Target::new(
            BackendId::Url("gpu7:80".into()),
            &"http://gpu7/ollama/".parse().unwrap(),
        );
        assert_eq!(prefixed.path(&pq).unwrap(), "/ollama/api/chat?x=1");
        assert_eq!(prefixed.authority, "gpu7");
        assert!(format!("{:?}", prefixed.conns).contains("gpu7:80"));
        assert_eq!(&*plain.label, "24001");
        assert_eq!(plain.header, "24001");
    }
}
