//! What the supervisor samples each tick, behind a trait so tests can inject memory
//! behaviour (a creep) that the real process would take hours to show.
//!
//! [`ProcessProbe`] reads this process: RSS and the system's available memory (sysinfo),
//! jemalloc's figures, the ingest counters (ops
//! and rows in flight, so memory can be put against work), the cache's byte gauge and,
//! with a GPU, its memory pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{MemoryReader, allocator};
use crate::ingest::pipeline::IngestCounters;

/// One sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    /// Milliseconds since the probe started.
    pub at_ms: u64,
    pub ops: u64,
    pub rows: u64,
    pub rss: u64,
    /// Memory the system has available (sysinfo), 0 where it does not say.
    #[serde(default)]
    pub system_available: u64,
    pub allocated: u64,
    pub resident: u64,
    pub in_flight_rows: u64,
    pub cache_bytes: u64,
    /// Bytes the GPU's memory pool has reserved from the driver (0 without a GPU).
    #[serde(default)]
    pub device_reserved: u64,
    /// Bytes of live allocations in the GPU's pool (0 without a GPU).
    #[serde(default)]
    pub device_in_use: u64,
}

pub trait MemoryProbe: Send + 'static {
    fn sample(&mut self) -> MemorySample;
}

/// The real process: RSS, jemalloc, ingest counters and the cache's byte gauge.
pub struct ProcessProbe {
    started: Instant,
    counters: Arc<IngestCounters>,
    cache_bytes: Arc<AtomicU64>,
    device: Option<keel_model::ModelDevice>,
    reader: MemoryReader,
}

impl ProcessProbe {
    pub fn new(counters: Arc<IngestCounters>, cache_bytes: Arc<AtomicU64>) -> Self {
        Self {
            started: Instant::now(),
            counters,
            cache_bytes,
            device: None,
            reader: MemoryReader::default(),
        }
    }

    /// Also samples the memory pool of `device` (a GPU; the host has none).
    pub fn with_device(mut self, device: keel_model::ModelDevice) -> Self {
        self.device = (!device.is_host()).then_some(device);
        self
    }
}

impl MemoryProbe for ProcessProbe {
    fn sample(&mut self) -> MemorySample {
        let a = allocator::stats();
        let device = self
            .device
            .as_ref()
            .and_then(|d| d.memory())
            .unwrap_or_default();
        MemorySample {
            at_ms: self.started.elapsed().as_millis() as u64,
            ops: self.counters.ops.load(Ordering::Relaxed),
            rows: self.counters.rows.load(Ordering::Relaxed),
            rss: self.reader.rss_bytes().unwrap_or(0),
            system_available: self.reader.system().available,
            allocated: a.allocated,
            resident: a.resident,
            in_flight_rows: self.counters.in_flight_rows.load(Ordering::Relaxed),
            cache_bytes: self.cache_bytes.load(Ordering::Relaxed),
            device_reserved: device.reserved_bytes,
            device_in_use: device.in_use_bytes,
        }
    }
}
