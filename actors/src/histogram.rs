//! A fixed-bucket histogram that threads update without locks (Prometheus-style).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    /// Sum in millionths, so that it fits an atomic integer.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

/// Cumulative counts per upper bound (`le`), as Prometheus exposes them.
#[derive(Debug, Clone, Serialize)]
pub struct HistogramSnapshot {
    pub le: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micro
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                running += b.load(Ordering::Relaxed);
                running
            })
            .collect();
        HistogramSnapshot {
            le: self.bounds.to_vec(),
            cumulative,
            sum: self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_overflow_counts_only_in_total() {
        static BOUNDS: [f64; 3] = [1.0, 10.0, 100.0];
        let h = Histogram::new(&BOUNDS);
        for v in [0.5, 1.0, 5.0, 50.0, 500.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![2, 3, 4]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 556.5).abs() < 1e-6);
    }
}
