//! Keel's actors and the pure parts they drive.
//!
//! - [`ingest`]: from a record batch to its vectors: text sources, micro-batches (ops), the
//!   in-flight bound, the output column.
//! - [`cache`]: the byte-budgeted LRU of vectors and the actix actor that owns it.
//! - [`supervisor`]: memory sampling, bounded history, cleanup broadcast (actix actor).
//! - [`sink`]: datasets as atomically written Parquet parts, behind one writer thread.
//! - [`embedding`]: the BERT sentence model on burn ([`embedding::model`]) and the pool of
//!   worker threads that run its replicas ([`embedding::pool`]).
//! - [`memory`]: readings of this process's memory, the allocator, creep, the budget.
//! - [`histogram`]: lock-free fixed-bucket histograms for metrics.
//! - [`template`]: `{field}` templates that turn a row into the text to embed.
//! - [`variants`]: annotated VCF records (VEP `CSQ`, snpEff `ANN`) as template fields.

pub mod cache;
pub mod embedding;
pub mod histogram;
pub mod ingest;
pub mod memory;
pub mod sink;
pub mod supervisor;
pub mod template;
pub mod variants;
