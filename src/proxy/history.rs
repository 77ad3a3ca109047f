//! The dashboard's recent history, kept by the proxy so that a page opened
//! now shows the last five minutes at once. Once a second the sampler
//! ([`sample`]) reads the running totals and the queue (one short fleet-lock read) and
//! pushes a [`Sample`] into the [`History`] ring, along with each backend's
//! requests per second; `/__proxy/stats` returns both. Turning two readings
//! into a sample and the ring itself are pure.
//!
//! Imports from the crate: `fleet` and `metrics` only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::metrics::{Metrics, TotalsView};

/// Samples kept: five minutes at one a second.
pub const CAPACITY: usize = 300;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One second of the proxy's life, as the dashboard draws it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Routed requests answered or refused per second.
    pub requests_per_second: f64,
    /// Of those, answered with a 5xx, per second.
    pub errors_per_second: f64,
    /// Generated tokens per second.
    pub tokens_per_second: f64,
    /// Requests waiting for a slot when it was taken.
    pub queue_waiting: usize,
    /// Mean wait of the slots acquired since the previous sample (0 when none).
    pub queue_wait_ms: f64,
    /// Requests holding a slot when it was taken.
    pub in_flight: u32,
}

/// Requests served per second by each backend, by id as the page spells it.
pub type BackendRates = BTreeMap<String, f64>;

/// What the sampler reads at each tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    pub totals: TotalsView,
    /// Requests waiting for a slot.
    pub queue_waiting: usize,
    /// Requests holding a slot, over every backend.
    pub in_flight: u32,
    /// Requests each backend has served since it joined the fleet.
    pub served: BTreeMap<String, u64>,
}

impl Sample {
    /// The sample for the `seconds` between two readings of the totals,
    /// taken at `unix_ms`. A total that went backwards counts as no change.
    pub fn between(before: &TotalsView, now: &Reading, seconds: f64, unix_ms: u64) -> Self {
        let after = &now.totals;
        let rate = |now: u64, before: u64| {
            if seconds > 0.0 {
                round2(now.saturating_sub(before) as f64 / seconds)
            } else {
                0.0
            }
        };
        let waits = after.queue_waits.saturating_sub(before.queue_waits);
        let waited_micros = after
            .queue_wait_micros
            .saturating_sub(before.queue_wait_micros);
        let queue_wait_ms = if waits > 0 {
            round2(waited_micros as f64 / waits as f64 / 1000.0)
        } else {
            0.0
        };
        Self {
            unix_ms,
            requests_per_second: rate(after.requests, before.requests),
            errors_per_second: rate(after.errors, before.errors),
            tokens_per_second: rate(after.tokens_out, before.tokens_out),
            queue_waiting: now.queue_waiting,
            queue_wait_ms,
            in_flight: now.in_flight,
        }
    }
}

/// Each backend's requests per second over the `seconds` between two
/// readings; a backend new since `before` counts from its first reading.
pub fn backend_rates(
    before: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    seconds: f64,
) -> BackendRates {
    now.iter()
        .map(|(id, &served)| {
            let rate = match before.get(id) {
                Some(&then) if seconds > 0.0 => {
                    round2(served.saturating_sub(then) as f64 / seconds)
                }
                _ => 0.0,
            };
            (id.clone(), rate)
        })
        .collect()
}

/// Two decimals are all the page shows; fewer digits keep the JSON small.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The last [`CAPACITY`] samples, oldest first, and the latest per-backend rates.
#[derive(Debug)]
pub struct History {
    /// A std mutex, not tokio's: a push or a copy of 300 small samples is
    /// all that happens under it, and nothing is awaited while it is held.
    recent: Mutex<Recent>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Recent {
    samples: VecDeque<Sample>,
    backends: BackendRates,
}

impl Default for History {
    fn default() -> Self {
        Self::new(CAPACITY)
    }
}

impl History {
    /// An empty ring that keeps the last `capacity` samples.
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: Mutex::new(Recent {
                samples: VecDeque::with_capacity(capacity),
                backends: BackendRates::new(),
            }),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        // A panic under the lock leaves whole samples behind: ignore poisoning.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `sample`, dropping the oldest when full, and replaces the
    /// per-backend rates with `backends`.
    pub fn push(&self, sample: Sample, backends: BackendRates) {
        let mut recent = self.lock();
        if recent.samples.len() == self.capacity {
            recent.samples.pop_front();
        }
        recent.samples.push_back(sample);
        recent.backends = backends;
    }

    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.iter().copied().collect()
    }

    /// Each backend's requests per second at the latest sample.
    pub fn backend_rates(&self) -> BackendRates {
        self.lock().backends.clone()
    }
}

/// What the sampler reads: one short fleet-lock read, then the totals.
fn read(fleet: &Fleet, metrics: &Metrics) -> Reading {
    fleet.read(|s| Reading {
        queue_waiting: s.queue_len(),
        in_flight: s.backends().values().map(|b| b.in_flight).sum(),
        served: s
            .backends()
            .values()
            .map(|b| (b.target.id.to_string(), b.served))
            .collect(),
        totals: metrics.totals.view(),
    })
}

/// The background task that fills `history` from this fleet's queue and
/// these totals: a sample every [`INTERVAL`] until `shutdown` is cancelled.
pub async fn sample(
    fleet: Fleet,
    metrics: Arc<Metrics>,
    history: Arc<History>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(INTERVAL);
    // After a stall, one sample over the longer span, not a burst of them.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate: it gives the baseline.
    ticks.tick().await;
    let mut before = (Instant::now(), read(&fleet, &metrics));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let at = Instant::now();
        let now = read(&fleet, &metrics);
        let seconds = at.duration_since(before.0).as_secs_f64();
        let sample = Sample::between(&before.1.totals, &now, seconds, unix_ms());
        let backends = backend_rates(&before.1.served, &now.served, seconds);
        history.push(sample, backends);
        before = (at, now);
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(requests_per_second: f64) -> Sample {
        Sample {
            unix_ms: 0,
            requests_per_second,
            errors_per_second: 0.0,
            tokens_per_second: 0.0,
            queue_waiting: 0,
            queue_wait_ms: 0.0,
            in_flight: 0,
        }
    }

    #[test]
    fn two_readings_give_rates_per_second_and_the_mean_wait() {
        let before = TotalsView {
            requests: 10,
            errors: 1,
            queue_waits: 4,
            queue_wait_micros: 1_000,
            tokens_out: 100,
        };
        let now = Reading {
            totals: TotalsView {
                requests: 16,
                errors: 2,
                queue_waits: 7,
                queue_wait_micros: 31_000,
                tokens_out: 400,
            },
            queue_waiting: 3,
            in_flight: 5,
            served: BTreeMap::new(),
        };
        let s = Sample::between(&before, &now, 2.0, 1_234);
        assert_eq!(
            s,
            Sample {
                unix_ms: 1_234,
                requests_per_second: 3.0,
                errors_per_second: 0.5,
                tokens_per_second: 150.0,
                queue_waiting: 3,
                queue_wait_ms: 10.0,
                in_flight: 5,
            }
        );
    }

    #[test]
    fn a_second_without_slots_acquired_has_no_wait_and_no_division_by_zero() {
        let totals = TotalsView {
            requests: 5,
            queue_waits: 5,
            queue_wait_micros: 9_000,
            ..TotalsView::default()
        };
        let now = Reading {
            totals,
            ..Reading::default()
        };
        let s = Sample::between(&totals, &now, 1.0, 0);
        assert_eq!(s.requests_per_second, 0.0);
        assert_eq!(s.queue_wait_ms, 0.0);
        let s = Sample::between(&TotalsView::default(), &now, 0.0, 0);
        assert_eq!(s.requests_per_second, 0.0, "no time passed: no rate");
    }

    #[test]
    fn a_total_that_went_backwards_counts_as_no_change() {
        let before = TotalsView {
            requests: 9,
            ..TotalsView::default()
        };
        let s = Sample::between(&before, &Reading::default(), 1.0, 0);
        assert_eq!(s.requests_per_second, 0.0);
    }

    #[test]
    fn rates_are_rounded_to_two_decimals() {
        let now = Reading {
            totals: TotalsView {
                requests: 1,
                ..TotalsView::default()
            },
            ..Reading::default()
        };
        let s = Sample::between(&TotalsView::default(), &now, 3.0, 0);
        assert_eq!(s.requests_per_second, 0.33);
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_oldest_first() {
        let history = History::new(3);
        assert!(history.samples().is_empty());
        for i in 0..5 {
            history.push(sample(f64::from(i)), BackendRates::new());
        }
        let rates: Vec<f64> = history
            .samples()
            .iter()
            .map(|s| s.requests_per_second)
            .collect();
        assert_eq!(rates, [2.0, 3.0, 4.0]);
    }

    #[test]
    fn backend_rates_count_each_backend_and_zero_for_a_new_one() {
        let served = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(id, n)| ((*id).to_owned(), *n)).collect()
        };
        let before = served(&[("20000", 4), ("20001", 10), ("gone:1", 3)]);
        let now = served(&[("20000", 8), ("20001", 10), ("20002", 7)]);
        let rates = backend_rates(&before, &now, 2.0);
        let expected: BackendRates = [("20000", 2.0), ("20001", 0.0), ("20002", 0.0)]
            .into_iter()
            .map(|(id, r)| (id.to_owned(), r))
            .collect();
        assert_eq!(rates, expected);
        let history = History::new(2);
        history.push(sample(1.0), rates.clone());
        assert_eq!(history.backend_rates(), rates);
    }
}
