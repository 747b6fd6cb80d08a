//! Messages the supervisor answers, and the memory report it gives.

use actix::Message;
use serde::{Deserialize, Serialize};

use crate::cleanup::{CleanupLevel, CleanupRecord};
use crate::memory::probe::MemorySample;

/// Run a cleanup now (the `cleanup` action, or the supervisor's own decision).
#[derive(Debug, Clone, Message)]
#[rtype(result = "CleanupRecord")]
pub struct RunCleanup {
    pub level: CleanupLevel,
    pub reason: String,
}

/// The latest memory figures and the recent cleanups.
#[derive(Debug, Clone, Message)]
#[rtype(result = "MemoryReport")]
pub struct GetMemoryReport;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReport {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub limit_bytes: u64,
    /// Whether ingest admission is tightened (RSS went above hard, not yet below soft).
    pub pressure: bool,
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    pub latest: MemorySample,
    pub samples: usize,
    pub creep: Option<Creep>,
    pub cleanups_total: u64,
    pub cleanups_trim: u64,
    pub cleanups_gentle: u64,
    pub cleanups_full: u64,
    pub recent_cleanups: Vec<CleanupRecord>,
}

/// Memory growth over the settled readings of the creep window, the cache's own (bounded)
/// bytes excluded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Creep {
    /// Allocator `allocated` growth, MB per 1000 ops, and its standard error.
    pub allocated_mb_per_1000_ops: f64,
    pub allocated_stderr: f64,
    /// RSS growth, MB per 1000 ops.
    pub rss_mb_per_1000_ops: f64,
    /// RSS growth per hour of wall time.
    pub rss_mb_per_hour: f64,
    pub window_ops: u64,
    /// Settled readings (nothing in flight, ops standing still) the slope is fitted through.
    pub settled_readings: usize,
    /// When the window's first sample was taken (ms since the supervisor started).
    pub window_from_ms: u64,
}
