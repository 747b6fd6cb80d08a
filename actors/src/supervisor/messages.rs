//! Messages of the supervisor and the cleanup protocol every actor speaks.

use std::time::Duration;

use actix::Message;
use serde::Serialize;

/// How hard a cleanup goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupLevel {
    /// Shrink caches to their low watermark, drop scratch buffers, purge the allocator.
    Gentle,
    /// Everything gentle does, and empty what may be emptied.
    Full,
}

/// Broadcast to every registered actor; each answers with what it did and how long it took.
#[derive(Debug, Clone, Message)]
#[rtype(result = "CleanupAck")]
pub struct Cleanup {
    pub level: CleanupLevel,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CleanupAck {
    pub actor: &'static str,
    pub freed_bytes: u64,
    pub detail: String,
    #[serde(serialize_with = "as_micros")]
    pub duration: Duration,
}

fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

/// One finished cleanup: its reason, every actor's acknowledgement and the total time
/// from broadcast to last ack.
#[derive(Debug, Clone, Serialize)]
pub struct CleanupRecord {
    pub level: CleanupLevel,
    pub reason: String,
    pub acks: Vec<CleanupAck>,
    pub total_micros: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

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

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub limit_bytes: u64,
    /// Whether ingest admission is tightened (RSS went above hard, not yet below soft).
    pub pressure: bool,
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    pub latest: crate::supervisor::probe::MemorySample,
    pub samples: usize,
    pub creep: Option<Creep>,
    pub cleanups_total: u64,
    pub cleanups_gentle: u64,
    pub cleanups_full: u64,
    pub recent_cleanups: Vec<CleanupRecord>,
}

/// Memory growth over the creep window, the cache's own (bounded) bytes excluded.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Creep {
    /// Allocator `allocated` growth, MB per 1000 ops, and its standard error.
    pub allocated_mb_per_1000_ops: f64,
    pub allocated_stderr: f64,
    /// RSS growth, MB per 1000 ops.
    pub rss_mb_per_1000_ops: f64,
    /// RSS growth per hour of wall time.
    pub rss_mb_per_hour: f64,
    pub window_ops: u64,
    /// When the window's first sample was taken (ms since the supervisor started).
    pub window_from_ms: u64,
}
