//! Prometheus metrics (`GET /metrics`): the registry and every metric family,
//! named `corral_*` in base units. Labels are bounded: endpoints are the fixed
//! route set, models only those some backend listed, backends only those in
//! the fleet table (a forgotten backend's series are removed). The request
//! path counts through handles resolved once ([`RequestSeries`]).

mod series;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::failure::FailureKind;
use crate::fleet::Rejection;
use crate::fleet::placement::{Placed, Reason};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use series::{BackendCounters, RequestSeries, SeriesCache};

/// Labels of per-request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route path, e.g. `/api/chat`.
    pub endpoint: &'static str,
    /// Model display name, or `unknown` / `none`.
    pub model: Arc<str>,
    /// HTTP status returned to the client.
    pub status: u16,
}

/// Labels of per-endpoint series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Route path.
    pub endpoint: &'static str,
}

/// Labels of per-backend series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Backend id (port or host:port).
    pub backend: Arc<str>,
}

/// Labels of per-backend failure series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Backend id.
    pub backend: Arc<str>,
    /// A [`FailureKind`] label.
    pub kind: &'static str,
}

/// Labels of token series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Model display name.
    pub model: Arc<str>,
    /// `in` (prompt) or `out` (generated).
    pub direction: &'static str,
}

/// Labels of per-model series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model display name.
    pub model: Arc<str>,
}

/// Labels of per-tenant series: a tenant named in the settings, or `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// Tenant name (a key's name, a TENANT_WEIGHTS or TENANT_PRIORITIES entry) or `other`.
    pub tenant: Arc<str>,
}

/// Labels of queue rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// queue_full, queue_bytes_full, queue_timeout, unknown_model, shutting_down.
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to ~9 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

fn rate_histogram() -> Histogram {
    // 1 to ~4,000 tokens per second.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Every metric family corral exports; what each counts is its HELP text,
/// registered in [`Metrics::new`].
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<EndpointLabels>,
    pub time_to_first_byte: HistogramFamily<EndpointLabels>,
    pub queue_depth: Gauge,
    pub queue_wait: Histogram,
    pub rejections: Family<ReasonLabels, Counter>,
    pub tenant_queue_wait: HistogramFamily<TenantLabels>,
    pub tenant_queue_depth: Family<TenantLabels, Gauge>,
    pub tenant_in_flight: Family<TenantLabels, Gauge>,
    pub backend_healthy: Family<BackendLabels, Gauge>,
    pub backend_in_flight: Family<BackendLabels, Gauge>,
    pub backend_requests: Family<BackendLabels, Counter>,
    pub backend_failures: Family<FailureLabels, Counter>,
    pub probe_seconds: Family<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub retries: Counter,
    pub stream_errors: Family<EndpointLabels, Counter>,
    /// Prompt and generated tokens, from the backend's final chunk or usage.
    pub tokens: Family<TokenLabels, Counter>,
    pub tokens_per_second: HistogramFamily<ModelLabels>,
    /// Placements by the rule that chose the backend (ROUTING=cache-aware).
    pub placements: Family<ReasonLabels, Counter>,
    pub prefix_hits: Counter,
    pub prompt_tokens_saved: Counter,
    /// Requests placed where their model was not known to be loaded (with that `num_ctx`).
    pub model_loads_caused: Counter,
    /// Plain running totals for the dashboard, which needs sums that the
    /// labelled families cannot give without walking every series.
    pub totals: Totals,
    /// The handles of each (endpoint, model) pair, resolved once.
    series: SeriesCache,
    /// Backends with series now and their attempt counters, to retire
    /// those that leave the fleet.
    backends: BackendCounters,
}

/// Running totals since start, cheap to read: the dashboard's sampler
/// (`proxy::history`) turns successive readings into rates.
#[derive(Debug, Default)]
pub struct Totals {
    /// Routed requests answered or refused.
    pub requests: AtomicU64,
    /// Of those, answered with a 5xx (by a backend or by corral).
    pub errors: AtomicU64,
    /// Slots acquired (after waiting or not).
    pub queue_waits: AtomicU64,
    /// Microseconds spent waiting for those slots.
    pub queue_wait_micros: AtomicU64,
    /// Generated tokens.
    pub tokens_out: AtomicU64,
}

/// A reading of [`Totals`], field by field.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TotalsView {
    pub requests: u64,
    pub errors: u64,
    pub queue_waits: u64,
    pub queue_wait_micros: u64,
    pub tokens_out: u64,
}

impl Totals {
    /// Counts a routed request that ended with `status`.
    pub fn request(&self, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads every total.
    pub fn view(&self) -> TotalsView {
        TotalsView {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            queue_waits: self.queue_waits.load(Ordering::Relaxed),
            queue_wait_micros: self.queue_wait_micros.load(Ordering::Relaxed),
            tokens_out: self.tokens_out.load(Ordering::Relaxed),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            time_to_first_byte: Family::new_with_constructor(latency_histogram),
            queue_depth: Gauge::default(),
            queue_wait: latency_histogram(),
            rejections: Family::default(),
            tenant_queue_wait: Family::new_with_constructor(latency_histogram),
            tenant_queue_depth: Family::default(),
            tenant_in_flight: Family::default(),
            backend_healthy: Family::default(),
            backend_in_flight: Family::default(),
            backend_requests: Family::default(),
            backend_failures: Family::default(),
            probe_seconds: Family::default(),
            retries: Counter::default(),
            stream_errors: Family::default(),
            tokens: Family::default(),
            tokens_per_second: Family::new_with_constructor(rate_histogram),
            placements: Family::default(),
            prefix_hits: Counter::default(),
            prompt_tokens_saved: Counter::default(),
            model_loads_caused: Counter::default(),
            totals: Totals::default(),
            series: SeriesCache::default(),
            backends: BackendCounters::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "corral_requests",
            "Requests answered, by endpoint, model and status",
            m.requests.clone(),
        );
        r.register(
            "corral_request_duration_seconds",
            "Request duration until the response body ended",
            m.request_duration.clone(),
        );
        r.register(
            "corral_time_to_first_byte_seconds",
            "Time until the first response byte",
            m.time_to_first_byte.clone(),
        );
        r.register(
            "corral_placements",
            "Requests placed, by the rule that chose the backend",
            m.placements.clone(),
        );
        r.register(
            "corral_prefix_hits",
            "Requests sent to the backend expected to hold their prompt prefix or session",
            m.prefix_hits.clone(),
        );
        r.register(
            "corral_prompt_tokens_saved",
            "Prompt tokens not evaluated: the prompt's estimated size minus prompt_eval_count",
            m.prompt_tokens_saved.clone(),
        );
        r.register(
            "corral_model_loads_caused",
            "Requests placed where their model was not known to be loaded",
            m.model_loads_caused.clone(),
        );
        r.register(
            "corral_queue_depth",
            "Requests waiting for a backend slot",
            m.queue_depth.clone(),
        );
        r.register(
            "corral_queue_wait_seconds",
            "Time requests waited for a backend slot",
            m.queue_wait.clone(),
        );
        r.register(
            "corral_queue_rejections",
            "Requests turned away before reaching a backend, by reason",
            m.rejections.clone(),
        );
        r.register(
            "corral_tenant_queue_wait_seconds",
            "Time requests waited for a backend slot, by tenant",
            m.tenant_queue_wait.clone(),
        );
        r.register(
            "corral_tenant_queue_depth",
            "Requests waiting for a backend slot, by tenant",
            m.tenant_queue_depth.clone(),
        );
        r.register(
            "corral_tenant_in_flight",
            "Requests holding a backend slot, by tenant",
            m.tenant_in_flight.clone(),
        );
        r.register(
            "corral_backend_healthy",
            "1 when the backend is healthy",
            m.backend_healthy.clone(),
        );
        r.register(
            "corral_backend_in_flight",
            "Requests holding a slot on the backend",
            m.backend_in_flight.clone(),
        );
        r.register(
            "corral_backend_requests",
            "Attempts sent to the backend",
            m.backend_requests.clone(),
        );
        r.register(
            "corral_backend_failures",
            "Failed attempts on the backend, by kind",
            m.backend_failures.clone(),
        );
        r.register(
            "corral_backend_probe_seconds",
            "Duration of the backend's last successful probe",
            m.probe_seconds.clone(),
        );
        r.register(
            "corral_retries",
            "Attempts after a request's first",
            m.retries.clone(),
        );
        r.register(
            "corral_stream_errors",
            "Streams that ended with an error after their first byte",
            m.stream_errors.clone(),
        );
        r.register(
            "corral_tokens",
            "Prompt (in) and generated (out) tokens",
            m.tokens.clone(),
        );
        r.register(
            "corral_tokens_per_second",
            "Generation speed of a request",
            m.tokens_per_second.clone(),
        );
        Self { registry, ..m }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Observes a tenant's wait for a slot (`tenant` is already a bounded label).
    pub fn tenant_waited(&self, tenant: &Arc<str>, wait: Duration) {
        self.tenant_queue_wait
            .get_or_create(&TenantLabels {
                tenant: Arc::clone(tenant),
            })
            .observe(wait.as_secs_f64());
    }

    /// Sets the per-tenant gauges: `(label, waiting, in flight)`, several
    /// tenants may share the label `other`. Labels absent now are removed.
    pub fn set_tenants(&self, tenants: impl Iterator<Item = (Arc<str>, usize, u32)>) {
        let mut sums: std::collections::HashMap<Arc<str>, (i64, i64)> =
            std::collections::HashMap::new();
        for (label, waiting, in_flight) in tenants {
            let sum = sums.entry(label).or_default();
            sum.0 += waiting as i64;
            sum.1 += i64::from(in_flight);
        }
        self.tenant_queue_depth.clear();
        self.tenant_in_flight.clear();
        for (tenant, (waiting, in_flight)) in sums {
            let labels = TenantLabels { tenant };
            self.tenant_queue_depth.get_or_create(&labels).set(waiting);
            self.tenant_in_flight.get_or_create(&labels).set(in_flight);
        }
    }

    /// Sets the per-backend gauges from the fleet table and retires the
    /// series of backends that left it.
    pub fn set_backends<'a>(
        &self,
        backends: impl Iterator<Item = (Arc<str>, bool, u32, Option<Duration>)> + 'a,
    ) {
        let mut now = HashSet::new();
        for (backend, healthy, in_flight, probe) in backends {
            let labels = BackendLabels {
                backend: Arc::clone(&backend),
            };
            self.backend_healthy
                .get_or_create(&labels)
                .set(i64::from(healthy));
            self.backend_in_flight
                .get_or_create(&labels)
                .set(i64::from(in_flight));
            if let Some(p) = probe {
                self.probe_seconds
                    .get_or_create(&labels)
                    .set(p.as_secs_f64());
            }
            now.insert(backend);
        }
        for gone in &self.backends.retain(&now) {
            let labels = BackendLabels {
                backend: Arc::clone(gone),
            };
            self.backend_healthy.remove(&labels);
            self.backend_in_flight.remove(&labels);
            self.backend_requests.remove(&labels);
            self.probe_seconds.remove(&labels);
            for kind in FailureKind::ALL {
                self.backend_failures.remove(&FailureLabels {
                    backend: Arc::clone(gone),
                    kind: kind.label(),
                });
            }
        }
    }

    /// The handles of `(endpoint, model)`: one look-up, then atomics.
    pub fn series(&self, endpoint: &'static str, model: &str) -> Arc<RequestSeries> {
        self.series.get(endpoint, model)
    }

    /// Counts an attempt sent to `backend` (its handle is kept until it
    /// leaves the fleet).
    pub fn backend_attempted(&self, backend: &Arc<str>) {
        self.backends.attempted(self, backend);
    }

    /// Records the time a request waited for a slot it got.
    pub fn queue_waited(&self, wait: Duration) {
        self.queue_wait.observe(wait.as_secs_f64());
        self.totals.queue_waits.fetch_add(1, Ordering::Relaxed);
        self.totals
            .queue_wait_micros
            .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a failed attempt.
    pub fn backend_failed(&self, backend: &Arc<str>, kind: FailureKind) {
        self.backends.touch(backend);
        self.backend_failures
            .get_or_create(&FailureLabels {
                backend: Arc::clone(backend),
                kind: kind.label(),
            })
            .inc();
    }

    /// Counts a rejection.
    pub fn rejected(&self, why: Rejection) {
        self.rejections
            .get_or_create(&ReasonLabels {
                reason: why.label(),
            })
            .inc();
    }

    /// Records why a request went where it went, and the prompt tokens its
    /// backend reported evaluating against the `estimated` size of its prompt.
    pub fn record_placement(&self, placed: &Placed, estimated: u64, evaluated: u64) {
        self.placements
            .get_or_create(&ReasonLabels {
                reason: placed.reason.label(),
            })
            .inc();
        if matches!(placed.reason, Reason::Prefix | Reason::Session) {
            self.prefix_hits.inc();
        }
        if placed.cold {
            self.model_loads_caused.inc();
        }
        if evaluated > 0 {
            self.prompt_tokens_saved
                .inc_by(estimated.saturating_sub(evaluated));
        }
    }
}
