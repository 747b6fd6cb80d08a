//! The sink: datasets of embedded rows stored as Parquet files, written atomically.
//!
//! [`store::DatasetStore`] is the file layout (testable alone); [`writer::SinkWriter`]
//! serialises every append through one thread, so concurrent producers to one dataset
//! never race on a part number, and an acknowledged row is one that is on disk;
//! [`search::nearest`] scans a dataset for the rows nearest a query vector.

pub mod config;
pub mod search;
pub mod store;
pub mod writer;
