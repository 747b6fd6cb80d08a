//! The sink: datasets of embedded rows stored as Parquet files, written atomically.
//!
//! [`store::DatasetStore`] is the file layout (testable alone); [`writer::SinkWriter`]
//! serialises every append through one thread, so concurrent producers to one dataset
//! never race on a part number, and an acknowledged row is one that is on disk;
//! [`search::nearest`] finds a dataset's rows nearest a query vector, through its
//! [`index::Indexes`] entry (an HNSW graph, grown as rows are appended) or by an exact
//! scan; [`reduce`] fits PCA projections on a dataset.

pub mod config;
pub mod index;
pub mod reduce;
pub mod search;
pub mod store;
pub mod writer;
