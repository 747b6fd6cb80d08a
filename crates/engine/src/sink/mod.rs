//! The sink: datasets of embedded rows stored as Parquet files, written atomically.
//!
//! [`datasets::Datasets`] is the facade the server holds: it owns the data directory, the
//! [`store::DatasetStore`] (the file layout, testable alone), the writer thread that
//! serialises every append (so concurrent producers to one dataset never race on a part
//! number, and an acknowledged row is one that is on disk) and the indexes;
//! [`search::nearest`] finds a dataset's rows nearest a query vector, through its
//! [`index::Indexes`] entry (an HNSW graph, grown as rows are appended) or by an exact
//! scan; [`reduce`] fits PCA projections on a dataset.

pub mod config;
pub mod datasets;
pub mod index;
pub mod reduce;
pub mod search;
pub mod store;
