//! `storage:` section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Datasets live in `data_dir/NAME/part-NNNNNNNNNN.parquet`.
    pub data_dir: PathBuf,
    /// A DoPut stream writes (and acknowledges) a part file every this many rows, and at
    /// its end. Smaller: acks sooner, more files. Larger: fewer files, more rows held.
    pub flush_rows: usize,
    /// Appends waiting for the sink thread; producers wait when it is full.
    pub queue_depth: usize,
    /// Parts whose row counts are remembered (about 100 bytes each), so that a dataset's
    /// row count does not reopen every part; past it, the counts are read again.
    pub counted_parts: usize,
    /// Approximate nearest-neighbour indexes of datasets (the `index` action).
    pub index: IndexConfig,
}

/// `storage.index:` the indexes' memory bound and the `index` action's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Most bytes all loaded indexes hold together (graphs and their vectors). A build
    /// that would pass it is refused; an index that reaches it stops growing (its later
    /// rows are searched by an exact scan).
    pub max_bytes: u64,
    /// How a graph keeps its vectors: f32, f16, int8 or binary.
    pub quantization: Quantization,
    /// Links per node (HNSW's M): more is better recall, more memory, slower builds.
    pub connectivity: usize,
    /// Candidates kept while adding a row (efConstruction).
    pub expansion_add: usize,
    /// Candidates kept while searching (ef), at least the search's k and rescore.
    pub expansion_search: usize,
    /// Candidates rescored against the stored vectors per search; 0 = the graph's own
    /// scores (needed for good recall with binary).
    pub rescore: usize,
    /// A grown index is saved after this many new rows (and at shutdown); after a crash
    /// the rows since are added again from the dataset.
    pub save_every_rows: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            max_bytes: 2 << 30,
            quantization: Quantization::Int8,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
            rescore: 50,
            save_every_rows: 100_000,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/datasets"),
            flush_rows: 10_000,
            queue_depth: 16,
            counted_parts: 100_000,
            index: IndexConfig::default(),
        }
    }
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.flush_rows == 0 {
            return Err("storage.flush_rows: must be at least 1".into());
        }
        if self.queue_depth == 0 {
            return Err("storage.queue_depth: must be at least 1".into());
        }
        if self.counted_parts > 10_000_000 {
            return Err("storage.counted_parts: must be at most 10000000".into());
        }
        let i = &self.index;
        if !(2..=256).contains(&i.connectivity) {
            return Err("storage.index.connectivity: must be within 2..=256".into());
        }
        let most = super::index::MAX_CANDIDATES;
        if [i.expansion_add, i.expansion_search]
            .iter()
            .any(|&e| e == 0 || e > most)
        {
            return Err(format!(
                "storage.index.expansion_add/expansion_search: must be within 1..={most}"
            ));
        }
        if i.rescore > most {
            return Err(format!("storage.index.rescore: must be at most {most}"));
        }
        if i.save_every_rows == 0 {
            return Err("storage.index.save_every_rows: must be at least 1".into());
        }
        Ok(())
    }
}

/// How the graph keeps its vectors: part of the client contract (the `index` action).
pub use keel_wire::contract::Quantization;
