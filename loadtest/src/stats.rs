//! Latency histograms (HDR, nanosecond values) and per-second counters.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly (larger values are clamped): one minute.
const MAX_NS: u64 = 60_000_000_000;

/// An HDR histogram of latencies in nanoseconds, 3 significant digits.
pub struct LatencyHist(Histogram<u64>);

impl Default for LatencyHist {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, MAX_NS, 3).expect("static histogram bounds are valid"))
    }
}

impl LatencyHist {
    /// Records one latency (clamped to 1 ns..1 min).
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, MAX_NS));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Value at percentile `p` (0..=100) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        self.0.value_at_percentile(p) as f64 / 1000.0
    }

    /// Summary for reports; `None` without samples.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.count() == 0 {
            return None;
        }
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        Some(LatencySummary {
            count: self.count(),
            min_us: r(self.0.min() as f64 / 1000.0),
            mean_us: r(self.0.mean() / 1000.0),
            p50_us: r(self.percentile_us(50.0)),
            p90_us: r(self.percentile_us(90.0)),
            p99_us: r(self.percentile_us(99.0)),
            p999_us: r(self.percentile_us(99.9)),
            max_us: r(self.0.max() as f64 / 1000.0),
        })
    }

    /// (percentile, µs) points for a distribution chart.
    pub fn distribution(&self) -> Vec<(f64, f64)> {
        const PS: [f64; 15] =
            [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 100.0];
        PS.iter().map(|&p| (p, self.percentile_us(p))).collect()
    }
}

/// Latency percentiles in microseconds (the `latency_us` JSON object).
#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    /// samples
    pub count: u64,
    /// minimum
    pub min_us: f64,
    /// mean
    pub mean_us: f64,
    /// median
    pub p50_us: f64,
    /// 90th percentile
    pub p90_us: f64,
    /// 99th percentile
    pub p99_us: f64,
    /// 99.9th percentile
    pub p999_us: f64,
    /// maximum
    pub max_us: f64,
}

/// Events per one-second bucket since the start of the run (for throughput-over-time charts).
pub struct Timeline {
    buckets: Vec<AtomicU64>,
}

impl Timeline {
    /// Room for `secs` seconds (later events go to the last bucket).
    pub fn new(secs: usize) -> Self {
        Self { buckets: (0..secs.max(1)).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Adds `n` events at `ns` since the start.
    pub fn add(&self, ns: u64, n: u64) {
        let i = ((ns / 1_000_000_000) as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts per second, trailing empty seconds dropped.
    pub fn counts(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merge() {
        let mut a = LatencyHist::default();
        let mut b = LatencyHist::default();
        for i in 1..=100u64 {
            a.record_ns(i * 1000);
        }
        b.record_ns(1_000_000);
        a.merge(&b);
        let s = a.summary().unwrap();
        assert_eq!(s.count, 101);
        assert!((s.p50_us - 51.0).abs() < 0.1, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
        assert!(LatencyHist::default().summary().is_none());
    }

    #[test]
    fn timeline_buckets() {
        let t = Timeline::new(3);
        t.add(500_000_000, 2);
        t.add(1_500_000_000, 3);
        t.add(99_000_000_000, 1);
        assert_eq!(t.counts(), vec![2, 3, 1]);
    }
}
