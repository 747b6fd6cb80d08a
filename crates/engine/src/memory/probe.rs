//! What the supervisor samples each tick, behind a trait so tests can inject memory
//! behaviour (a creep) that the real process would take hours to show.
//!
//! [`ProcessProbe`] reads this process: RSS, jemalloc's figures, the ingest counters (ops
//! and rows in flight, so memory can be put against work) and the cache's byte gauge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{allocator, rss_bytes};
use crate::ingest::pipeline::IngestCounters;

/// One sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    /// Milliseconds since the probe started.
    pub at_ms: u64,
    pub ops: u64,
    pub rows: u64,
    pub rss: u64,
    pub allocated: u64,
    pub resident: u64,
    pub in_flight_rows: u64,
    pub cache_bytes: u64,
}

pub trait MemoryProbe: Send + 'static {
    fn sample(&mut self) -> MemorySample;
}

/// The real process: RSS, jemalloc, ingest counters and the cache's byte gauge.
pub struct ProcessProbe {
    started: Instant,
    counters: Arc<IngestCounters>,
    cache_bytes: Arc<AtomicU64>,
}

impl ProcessProbe {
    pub fn new(counters: Arc<IngestCounters>, cache_bytes: Arc<AtomicU64>) -> Self {
        Self {
            started: Instant::now(),
            counters,
            cache_bytes,
        }
    }
}

impl MemoryProbe for ProcessProbe {
    fn sample(&mut self) -> MemorySample {
        let a = allocator::stats();
        MemorySample {
            at_ms: self.started.elapsed().as_millis() as u64,
            ops: self.counters.ops.load(Ordering::Relaxed),
            rows: self.counters.rows.load(Ordering::Relaxed),
            rss: rss_bytes().unwrap_or(0),
            allocated: a.allocated,
            resident: a.resident,
            in_flight_rows: self.counters.in_flight_rows.load(Ordering::Relaxed),
            cache_bytes: self.cache_bytes.load(Ordering::Relaxed),
        }
    }
}
