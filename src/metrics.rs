//! Low-level instruments that hot-ish code records into and monitoring
//! reads: for now a lock-free latency [`Histogram`].
//!
//! This module depends on nothing else in the crate, so the store and
//! stream layers can record without knowing about HTTP or Prometheus;
//! [`crate::monitor`] reads [`Histogram::snapshot`] at scrape time.
//!
//! Invariant: recording is one or two relaxed atomic adds, never a lock or
//! an allocation. Reading is not atomic across buckets (a snapshot taken
//! while observations land may be off by those few), which monitoring
//! tolerates; the count of a snapshot always equals the sum of its buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in nanoseconds, of the latency buckets: 50 µs to 10 s,
/// roughly 1-2.5-5 per decade, which covers an fsync on NVMe (tens of µs)
/// up to a stalled disk. Anything slower lands in the `+Inf` bucket.
const LATENCY_BOUNDS_NANOS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets: one per bound, plus `+Inf`.
const BUCKETS: usize = LATENCY_BOUNDS_NANOS.len() + 1;

/// A histogram of durations with fixed buckets (see
/// [`LATENCY_BOUNDS_NANOS`]). `observe` costs two relaxed atomic adds: the
/// bucket's count and the sum. Buckets are stored non-cumulative, as the
/// Prometheus encoder wants them.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// A histogram as read at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in this bucket)`, in order,
    /// non-cumulative; the last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations (the sum of the buckets).
    pub count: u64,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        // Saturating: a u64 of nanoseconds is 584 years.
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let at = LATENCY_BOUNDS_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = LATENCY_BOUNDS_NANOS
            .iter()
            .map(|&n| n as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(10)); // <= 50 µs
        h.observe(Duration::from_micros(50)); // on the bound: still <= 50 µs
        h.observe(Duration::from_micros(51)); // <= 100 µs
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets.len(), BUCKETS);
        assert_eq!(s.buckets[0], (0.00005, 2));
        assert_eq!(s.buckets[1], (0.0001, 1));
        assert_eq!(s.buckets[6], (0.005, 1));
        assert_eq!(s.buckets[BUCKETS - 1], (f64::INFINITY, 1));
        let expected = 0.00001 + 0.00005 + 0.000051 + 0.003 + 60.0;
        assert!((s.sum_seconds - expected).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn an_empty_histogram_reads_as_zero() {
        let s = Histogram::new().snapshot();
        assert_eq!(s.count, 0);
        assert_eq!(s.sum_seconds, 0.0);
        assert!(s.buckets.iter().all(|(_, n)| *n == 0));
    }
}
