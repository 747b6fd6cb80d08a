//! The embedder: model replicas on dedicated threads, fed micro-batches through one
//! bounded queue, for the server and for `keel embed` alike.
//!
//! - [`workers`]: the worker threads (one model replica each, on its own rayon pool) and
//!   the [`workers::EmbedderHandle`] that feeds them: dynamic batching of micro-batches
//!   from any streams into length-planned forward passes;
//! - [`janitor`]: the embedder's member of the cleanup protocol (pooled device memory);
//! - [`config`]: the `embedder:` section.
//!
//! The model itself is the `keel-model` crate.

pub mod config;
pub mod janitor;
pub mod workers;
