//! `stats`: every figure of a running engine in one typed value.
//!
//! The `stats` action sends it as JSON, `/metrics` exports it, and the soak, `keel produce`
//! and the tests read it back with `serde_json::from_slice::<Stats>`: a field renamed here
//! is renamed for every reader at once (or fails to compile), never read as 0.

use serde::{Deserialize, Serialize};

use crate::cache::store::CacheStats;
use crate::cleanup::CleanupRecord;
use crate::embedder::workers::EmbedderStats;
use crate::supervisor::messages::{Creep, MemoryReport};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub uptime_s: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub memory: MemoryStats,
    /// Time streams waited for in-flight permits (backpressure), in seconds.
    pub admit_wait_s: f64,
    /// Micro-batches (ops) done.
    pub ops: u64,
    pub rows: u64,
    pub null_rows: u64,
    /// Rows computed by the model (cache misses).
    pub embedded_rows: u64,
    /// Rows that missed the cache while another micro-batch was embedding the same text,
    /// and took its vector.
    #[serde(default)]
    pub coalesced_rows: u64,
    pub in_flight_rows: u64,
    pub max_in_flight_rows: u64,
    pub max_in_flight_rows_seen: u64,
    pub streams: StreamStats,
    /// Zeros when the cache is off.
    pub cache: CacheFigures,
    pub embedder: EmbedderStats,
    pub cleanups: CleanupStats,
    /// The loaded dataset indexes (memory, rows covered), by dataset.
    #[serde(default)]
    pub indexes: Vec<crate::sink::index::IndexReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub limit_bytes: u64,
    /// Whether ingest admission is tightened (RSS went above hard, not yet below soft).
    pub pressure: bool,
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    /// jemalloc `stats.allocated`: what the program holds.
    pub allocated_bytes: u64,
    /// jemalloc `stats.resident`.
    pub resident_bytes: u64,
    /// Samples in the supervisor's history.
    pub samples: usize,
    pub creep: Option<Creep>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    pub open: u64,
    pub total: u64,
    pub failed: u64,
    /// Refused because the in-flight bound was reached (`ingest.when_full: reject`).
    pub rejected: u64,
    /// `server.max_streams`.
    pub max: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFigures {
    #[serde(flatten)]
    pub counts: CacheStats,
    /// hits / (hits + misses); 0 before the first look-up.
    pub hit_rate: f64,
    /// The second level (Redis, `cache.shared`); absent when it is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<crate::cache::shared::SharedCacheStats>,
}

impl From<CacheStats> for CacheFigures {
    fn from(counts: CacheStats) -> Self {
        let looked_up = counts.hits + counts.misses;
        Self {
            counts,
            hit_rate: if looked_up > 0 {
                counts.hits as f64 / looked_up as f64
            } else {
                0.0
            },
            shared: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CleanupStats {
    pub total: u64,
    #[serde(default)]
    pub trim: u64,
    pub gentle: u64,
    pub full: u64,
    /// The last `supervisor.cleanup_history` cleanups, oldest first.
    pub recent: Vec<CleanupRecord>,
}

impl MemoryStats {
    /// The memory part of the supervisor's report.
    pub fn from_report(m: &MemoryReport) -> Self {
        Self {
            limit_bytes: m.limit_bytes,
            pressure: m.pressure,
            soft_bytes: m.soft_bytes,
            hard_bytes: m.hard_bytes,
            allocated_bytes: m.latest.allocated,
            resident_bytes: m.latest.resident,
            samples: m.samples,
            creep: m.creep,
        }
    }
}

impl CleanupStats {
    pub fn from_report(m: &MemoryReport) -> Self {
        Self {
            total: m.cleanups_total,
            trim: m.cleanups_trim,
            gentle: m.cleanups_gentle,
            full: m.cleanups_full,
            recent: m.recent_cleanups.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_round_trip_through_json_with_the_documented_keys() {
        let mut s = Stats {
            ops: 7,
            rows: 175,
            cache: CacheStats {
                hits: 3,
                misses: 1,
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        s.streams.open = 2;
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["cache"]["hits"], 3);
        assert_eq!(json["cache"]["hit_rate"], 0.75);
        assert_eq!(json["streams"]["open"], 2);
        assert_eq!(json["memory"]["creep"], serde_json::Value::Null);
        let back: Stats = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }
}
