//! Approximate nearest-neighbour indexes of stored datasets: USearch's HNSW graph over
//! the dataset's vectors (f32, f16, int8 or binary, optionally through a PCA projection),
//! with the candidates it finds rescored against the stored vectors.
//!
//! Files, beside the dataset's parts (`data_dir/NAME/`):
//! - `index.json`: the manifest (parameters, rows covered, the graph file's name). It is
//!   written last, by a rename: a crash leaves the previous index whole;
//! - `index-GENERATION.usearch`: the graph and its vectors (keys = dataset row numbers);
//! - `index.vectors`: every covered row's stored vector, packed at a fixed width (row `r`
//!   at `r × width`), read by position to rescore candidates. On disk, not in memory.
//!
//! An index covers the dataset's first `rows` rows. Rows appended later (DoPut) are added
//! by the indexer thread; until they are, a search scans them exactly, so a search never
//! misses a stored row. Indexes are loaded on first use; their memory (USearch's own
//! count) is reported, and all of them together stay under `storage.index.max_bytes`: a
//! build that would pass it is refused, and an index that reaches it stops growing (its
//! later rows are scanned exactly).

mod format;
mod graph;
mod registry;

pub use format::{IndexReport, Manifest};
pub use graph::{DatasetIndex, IndexHits, Scored};
pub use registry::Indexes;

/// Most candidates a search may ask the graph for, and the most `rescore`,
/// `expansion_add` and `expansion_search` may be (each search reserves that many).
pub const MAX_CANDIDATES: usize = 100_000;

/// How to build an index (the `index` action's options): part of the client contract.
pub use keel_wire::contract::IndexOptions;
