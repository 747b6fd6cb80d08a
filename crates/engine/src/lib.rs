//! Keel's engine: the actors that take a stream's rows to their vectors and keep memory
//! flat (docs/ARCHITECTURE.md names each actor, its mailbox and its messages). The model is `keel-model`; what a client sends, and the text of each row, is
//! `keel-wire`; the Flight service and the wiring are the `keel` binary's.
//!
//! - [`ingest`]: micro-batches (ops), cache look-ups, embedder calls, and the in-flight
//!   bound (a semaphore of rows) that backpressure comes from; the output column;
//! - [`cache`]: the byte-budgeted LRU of vectors and the actix actor that owns it;
//! - [`embedder`]: the worker actors (model replicas on their own threads) reading one
//!   `crossbeam-channel` queue (dynamic batching), and their member of the cleanup protocol;
//! - [`sink`]: datasets as atomically written Parquet parts, behind one writer thread;
//!   search over them (exact, or through an HNSW index), PCA projections;
//! - [`supervisor`]: memory sampling, the thermostat's decisions, cleanup broadcasts;
//! - [`cleanup`]: the cleanup protocol every member speaks (depends on nothing else here);
//! - [`memory`]: readings of this process's memory, the allocator, samples, creep fits;
//! - [`stats`]: every figure of a running engine as one typed value.

pub mod cache;
pub mod cleanup;
pub mod embedder;
pub mod ingest;
pub mod memory;
pub mod sink;
pub mod stats;
pub mod supervisor;
