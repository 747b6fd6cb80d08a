//! Ingest: from an Arrow record batch to its vectors, under a bound on rows in flight.
//!
//! - [`output`]: the input batch plus its vector columns, in the stream's format;
//! - [`pipeline`]: cache look-ups per slice (both levels), embedder calls per micro-batch
//!   (the op), cache inserts, and the semaphore that bounds in-flight rows;
//! - [`coalesce`]: texts being embedded now, so that concurrent misses compute one once.
//!
//! Which text a row stands for, and the slicing of a stream, are the wire crate's
//! (`keel_wire::slicer`); the Flight service (in the `keel` binary) owns one task per
//! stream and drives these.

pub mod coalesce;
pub mod config;
pub mod output;
pub mod pipeline;

/// Why a stream's rows could not be embedded. Each variant maps to one gRPC status in
/// the binary's error mapping.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A configured limit was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The engine is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A bug: the model or an actor failed where it should not.
    #[error("{0}")]
    Internal(String),
}
