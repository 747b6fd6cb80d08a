//! `storage:` section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Datasets live in `data_dir/NAME/part-NNNNNNNNNN.parquet`.
    pub data_dir: PathBuf,
    /// A DoPut stream writes (and acknowledges) a part file every this many rows, and at
    /// its end. Smaller: acks sooner, more files. Larger: fewer files, more rows held.
    pub flush_rows: usize,
    /// Appends waiting for the sink thread; producers wait when it is full.
    pub queue_depth: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/datasets"),
            flush_rows: 10_000,
            queue_depth: 16,
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
        Ok(())
    }
}
