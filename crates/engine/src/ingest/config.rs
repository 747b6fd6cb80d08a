//! `ingest:` section.

use keel_wire::vectors::VectorPrecision;
use serde::{Deserialize, Serialize};

/// What a new stream meets when the rows in flight are at their bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: HTTP/2 flow control pushes back on the producer.
    #[default]
    Block,
    /// Refuse the stream at once with `ResourceExhausted` (its first rows found no room);
    /// a stream already admitted still waits for room for its later rows, so no stream
    /// is cut off midway.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Rows per micro-batch: the unit of work sent to the embedder (one op). The caches
    /// are asked once per slice.
    pub micro_batch_rows: usize,
    /// Rows read off all streams whose vectors are not yet handed back or stored. When
    /// none are left, streams stop reading and HTTP/2 flow control pushes back.
    pub max_in_flight_rows: usize,
    /// Input batches are processed in slices of at most this many rows, each holding its
    /// permits until its rows are sent or stored. Must not exceed `max_in_flight_rows`.
    pub slice_rows: usize,
    /// Text column used when the command names none.
    pub default_text_column: String,
    /// Slices of one stream being embedded at once (order is kept on output).
    pub stream_parallelism: usize,
    /// A request of at most this many rows (a one-row exchange, a search's query) goes
    /// to the embedder's fast lane: ahead of queued bulk work, at the next pass boundary.
    /// 0 turns the fast lane off.
    pub fast_lane_rows: usize,
    /// Fast-lane requests in flight at once, admitted beyond `max_in_flight_rows` through
    /// a reserve of their own (`fast_lane_rows` rows each); more wait for one to finish.
    pub fast_lane_requests: usize,
    /// A new stream that finds no room: wait (`block`) or `ResourceExhausted` (`reject`).
    pub when_full: WhenFull,
    /// The vectors' number type when the command names none.
    pub default_precision: VectorPrecision,
    /// The vectors' dimensions when the command names none; `None`: the model's.
    pub default_dimensions: Option<usize>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            micro_batch_rows: 25,
            max_in_flight_rows: 8192,
            slice_rows: 1024,
            default_text_column: "text".into(),
            stream_parallelism: 8,
            fast_lane_rows: 8,
            fast_lane_requests: 32,
            when_full: WhenFull::Block,
            default_precision: VectorPrecision::F32,
            default_dimensions: None,
        }
    }
}

impl IngestConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.micro_batch_rows == 0 {
            return Err("ingest.micro_batch_rows: must be at least 1".into());
        }
        if self.slice_rows == 0 || self.slice_rows > self.max_in_flight_rows {
            return Err(format!(
                "ingest.slice_rows: {} must be within 1..=ingest.max_in_flight_rows ({})",
                self.slice_rows, self.max_in_flight_rows
            ));
        }
        if self.max_in_flight_rows > u32::MAX as usize {
            return Err("ingest.max_in_flight_rows: at most 4294967295".into());
        }
        if self.fast_lane_rows > 0 && self.fast_lane_requests == 0 {
            return Err(
                "ingest.fast_lane_requests: must be at least 1 while fast_lane_rows is on".into(),
            );
        }
        if self.stream_parallelism == 0 {
            return Err("ingest.stream_parallelism: must be at least 1".into());
        }
        if self.default_dimensions == Some(0) {
            return Err("ingest.default_dimensions: must be at least 1 (or null)".into());
        }
        if self.default_text_column.is_empty() {
            return Err("ingest.default_text_column: must not be empty".into());
        }
        Ok(())
    }
}
