//! Metric handles resolved once and kept: the series of one (endpoint,
//! model) pair in a [`RequestSeries`], found in a [`SeriesCache`] by one
//! look-up per request, and each backend's attempt counter in a
//! [`BackendCounters`]. A request then touches atomics, not label sets.
//!
//! Each handle is resolved from its family on first use (a `OnceLock`), so
//! `/metrics` shows exactly the series it showed before: none appears
//! before something was counted in it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::{BackendLabels, EndpointLabels, Metrics, ModelLabels, RequestLabels, TokenLabels};

/// The status nearly every answer has: its counter is kept; others are
/// looked up in the family.
const OK: u16 = 200;

/// Pairs kept at most. The label set is bounded already (the route set
/// times the models some backend listed, plus `none` and `unknown`); past
/// this a pair still counts, through a handle that is not kept.
pub const CAPACITY: usize = 4096;

/// The series of one (endpoint, model) pair.
#[derive(Debug, Default)]
pub struct RequestSeries {
    endpoint: &'static str,
    model: Arc<str>,
    ok: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    first_byte: OnceLock<Histogram>,
    stream_errors: OnceLock<Counter>,
    tokens_in: OnceLock<Counter>,
    tokens_out: OnceLock<Counter>,
    tokens_per_second: OnceLock<Histogram>,
}

impl RequestSeries {
    fn new(endpoint: &'static str, model: Arc<str>) -> Self {
        Self {
            endpoint,
            model,
            ..Self::default()
        }
    }

    /// The model label.
    pub fn model(&self) -> &Arc<str> {
        &self.model
    }

    fn request_labels(&self, status: u16) -> RequestLabels {
        RequestLabels {
            endpoint: self.endpoint,
            model: Arc::clone(&self.model),
            status,
        }
    }

    /// Counts a request answered with `status` and its duration.
    pub fn request_done(&self, m: &Metrics, status: u16, duration: Duration) {
        if status == OK {
            self.ok
                .get_or_init(|| m.requests.get_or_create_owned(&self.request_labels(OK)))
                .inc();
        } else {
            m.requests.get_or_create(&self.request_labels(status)).inc();
        }
        m.totals.request(status);
        self.duration
            .get_or_init(|| {
                m.request_duration
                    .get_or_create_owned(&self.endpoint_labels())
            })
            .observe(duration.as_secs_f64());
    }

    /// Observes the time until the first byte was ready for the client.
    pub fn first_byte(&self, m: &Metrics, after: Duration) {
        self.first_byte
            .get_or_init(|| {
                m.time_to_first_byte
                    .get_or_create_owned(&self.endpoint_labels())
            })
            .observe(after.as_secs_f64());
    }

    /// Counts a stream that ended with an error after its first byte.
    pub fn stream_error(&self, m: &Metrics) {
        self.stream_errors
            .get_or_init(|| m.stream_errors.get_or_create_owned(&self.endpoint_labels()))
            .inc();
    }

    /// Records the tokens of a finished generation.
    pub fn tokens(&self, m: &Metrics, prompt: u64, generated: u64, eval_seconds: Option<f64>) {
        let tokens = |direction| TokenLabels {
            model: Arc::clone(&self.model),
            direction,
        };
        if prompt > 0 {
            self.tokens_in
                .get_or_init(|| m.tokens.get_or_create_owned(&tokens("in")))
                .inc_by(prompt);
        }
        if generated == 0 {
            return;
        }
        m.totals
            .tokens_out
            .fetch_add(generated, std::sync::atomic::Ordering::Relaxed);
        self.tokens_out
            .get_or_init(|| m.tokens.get_or_create_owned(&tokens("out")))
            .inc_by(generated);
        if let Some(secs) = eval_seconds.filter(|s| *s > 0.0) {
            let labels = ModelLabels {
                model: Arc::clone(&self.model),
            };
            self.tokens_per_second
                .get_or_init(|| m.tokens_per_second.get_or_create_owned(&labels))
                .observe(generated as f64 / secs);
        }
    }

    fn endpoint_labels(&self) -> EndpointLabels {
        EndpointLabels {
            endpoint: self.endpoint,
        }
    }
}

/// The [`RequestSeries`] of every (endpoint, model) pair seen, by model,
/// then by endpoint (a short list).
#[derive(Debug, Default)]
pub struct SeriesCache {
    by_model: RwLock<HashMap<Arc<str>, Vec<Arc<RequestSeries>>>>,
    len: AtomicUsize,
}

impl SeriesCache {
    /// The series of `(endpoint, model)`, kept for the next request while
    /// fewer than `CAPACITY` pairs are.
    pub fn get(&self, endpoint: &'static str, model: &str) -> Arc<RequestSeries> {
        let find = |list: &[Arc<RequestSeries>]| {
            list.iter().find(|s| s.endpoint == endpoint).map(Arc::clone)
        };
        {
            let map = self.by_model.read().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = map.get(model).and_then(|l| find(l)) {
                return found;
            }
        }
        let mut map = self.by_model.write().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = map.get(model).and_then(|l| find(l)) {
            return found;
        }
        if self.len.load(Ordering::Relaxed) >= CAPACITY {
            return Arc::new(RequestSeries::new(endpoint, Arc::from(model)));
        }
        let model: Arc<str> = match map.get_key_value(model) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(model),
        };
        let series = Arc::new(RequestSeries::new(endpoint, Arc::clone(&model)));
        map.entry(model).or_default().push(Arc::clone(&series));
        self.len.fetch_add(1, Ordering::Relaxed);
        series
    }

    /// Pairs kept now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Each backend with series now, and its attempt counter once it has one:
/// the set from which the series of backends that left are retired.
#[derive(Debug, Default)]
pub struct BackendCounters {
    by_backend: RwLock<HashMap<Arc<str>, Option<Counter>>>,
}

impl BackendCounters {
    /// Counts an attempt sent to `backend`.
    pub fn attempted(&self, m: &Metrics, backend: &Arc<str>) {
        {
            let map = self.by_backend.read().unwrap_or_else(|e| e.into_inner());
            if let Some(Some(counter)) = map.get(backend) {
                counter.inc();
                return;
            }
        }
        let mut map = self.by_backend.write().unwrap_or_else(|e| e.into_inner());
        let counter = map.entry(Arc::clone(backend)).or_default();
        counter
            .get_or_insert_with(|| {
                m.backend_requests.get_or_create_owned(&BackendLabels {
                    backend: Arc::clone(backend),
                })
            })
            .inc();
    }

    /// Notes that `backend` has series (a failure counted), so that they
    /// are retired when it leaves.
    pub fn touch(&self, backend: &Arc<str>) {
        let known = self
            .by_backend
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(backend);
        if !known {
            let mut map = self.by_backend.write().unwrap_or_else(|e| e.into_inner());
            map.entry(Arc::clone(backend)).or_default();
        }
    }

    /// Keeps the backends in `now` (adding those new), and returns those
    /// that had series and are no longer there, forgetting their handles.
    pub fn retain(&self, now: &std::collections::HashSet<Arc<str>>) -> Vec<Arc<str>> {
        let mut map = self.by_backend.write().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<Arc<str>> = map.keys().filter(|b| !now.contains(*b)).cloned().collect();
        map.retain(|backend, _| now.contains(backend));
        for backend in now {
            map.entry(Arc::clone(backend)).or_default();
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_resolved_once_and_shared() {
        let cache = SeriesCache::default();
        let a = cache.get("/api/chat", "llama3.2:latest");
        let b = cache.get("/api/chat", "llama3.2:latest");
        assert!(Arc::ptr_eq(&a, &b));
        let other = cache.get("/api/generate", "llama3.2:latest");
        assert!(!Arc::ptr_eq(&a, &other));
        // The model's name is stored once for both endpoints.
        assert!(Arc::ptr_eq(a.model(), other.model()));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn the_cache_stops_growing_at_its_capacity_and_still_counts() {
        let cache = SeriesCache::default();
        for i in 0..CAPACITY + 10 {
            cache.get("/api/chat", &format!("m{i}"));
        }
        assert_eq!(cache.len(), CAPACITY);
        let m = Metrics::new();
        let past = cache.get("/api/chat", "past-the-bound");
        assert_eq!(cache.len(), CAPACITY);
        past.request_done(&m, 200, Duration::from_millis(5));
        past.request_done(&m, 200, Duration::from_millis(5));
        assert!(
            m.encode().contains(
                "corral_requests_total{endpoint=\"/api/chat\",model=\"past-the-bound\",status=\"200\"} 2"
            ),
            "{}",
            m.encode()
        );
    }

    #[test]
    fn handles_count_into_the_exported_series_and_create_none_early() {
        let m = Metrics::new();
        let cache = SeriesCache::default();
        let s = cache.get("/api/generate", "llama3.2:latest");
        assert!(!m.encode().contains("llama3.2"), "nothing counted yet");
        s.request_done(&m, 200, Duration::from_millis(3));
        cache.get("/api/generate", "llama3.2:latest").request_done(
            &m,
            200,
            Duration::from_millis(3),
        );
        s.request_done(&m, 502, Duration::from_millis(3));
        s.tokens(&m, 26, 0, None);
        let text = m.encode();
        let ok = "corral_requests_total{endpoint=\"/api/generate\",model=\"llama3.2:latest\",status=\"200\"} 2";
        let bad = "corral_requests_total{endpoint=\"/api/generate\",model=\"llama3.2:latest\",status=\"502\"} 1";
        assert!(text.contains(ok) && text.contains(bad), "{text}");
        assert!(
            text.contains("corral_tokens_total{model=\"llama3.2:latest\",direction=\"in\"} 26"),
            "{text}"
        );
        assert!(!text.contains("direction=\"out\""), "{text}");
        assert!(!text.contains("corral_stream_errors_total{"), "{text}");
        assert_eq!(m.totals.view().requests, 3);
    }

    #[test]
    fn backends_that_leave_are_returned_once_and_forgotten() {
        let m = Metrics::new();
        let counters = BackendCounters::default();
        let a: Arc<str> = Arc::from("24001");
        let b: Arc<str> = Arc::from("24002");
        counters.attempted(&m, &a);
        counters.attempted(&m, &a);
        counters.touch(&b);
        let now = [Arc::clone(&b)].into_iter().collect();
        assert_eq!(counters.retain(&now), vec![Arc::clone(&a)]);
        assert!(counters.retain(&now).is_empty());
        assert!(
            m.encode()
                .contains("corral_backend_requests_total{backend=\"24001\"} 2")
        );
    }
}
