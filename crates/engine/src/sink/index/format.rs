//! An index on disk: its manifest (`index.json`), what reports say of it, and the graph's
//! parameters and memory as the manifest fixes them.

use std::path::Path;

use keel_wire::vectors::VectorPrecision;
use serde::{Deserialize, Serialize};
use usearch::{MetricKind, ScalarKind};

use crate::sink::config::Quantization;
use crate::sink::store::SinkError;

pub(super) const MANIFEST: &str = "index.json";
pub(super) const VECTORS: &str = "index.vectors";

/// What is kept about an index (`index.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub quantization: Quantization,
    pub projection: Option<String>,
    pub connectivity: usize,
    pub expansion_add: usize,
    pub expansion_search: usize,
    pub rescore: usize,
    /// Dimensions of the graph's vectors.
    pub dimensions: usize,
    /// The dataset's vectors (the layout of `index.vectors`).
    pub precision: VectorPrecision,
    pub dataset_dimensions: usize,
    /// Dataset rows the saved graph covers (null rows included: they have no key).
    pub rows: u64,
    /// The graph file, `index-GENERATION.usearch`.
    pub graph: String,
    pub build_seconds: f64,
}

/// What `stats`, `GetFlightInfo` and the `index` action say about an index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexReport {
    pub dataset: String,
    pub quantization: Quantization,
    pub projection: Option<String>,
    pub dimensions: usize,
    pub connectivity: usize,
    pub rescore: usize,
    /// Dataset rows covered (later rows are scanned exactly until added).
    pub rows: u64,
    /// Vectors in the graph (rows less null ones).
    pub vectors: u64,
    /// Memory the graph and its vectors hold (USearch's count).
    pub memory_bytes: u64,
    /// Bytes per vector in the graph.
    pub vector_bytes: usize,
    /// Bytes per row of `index.vectors`, on disk.
    pub rescore_bytes: usize,
    pub build_seconds: f64,
    /// Whether it stopped growing at `storage.index.max_bytes`.
    pub full: bool,
    /// Whether it is in memory now (loaded on first search).
    pub loaded: bool,
}

/// USearch's parameters for the graph `m` describes.
pub(super) fn graph_options(m: &Manifest) -> usearch::IndexOptions {
    usearch::IndexOptions {
        dimensions: m.dimensions,
        metric: if m.quantization == Quantization::Binary {
            MetricKind::Hamming
        } else {
            MetricKind::Cos
        },
        quantization: match m.quantization {
            Quantization::F32 => ScalarKind::F32,
            Quantization::F16 => ScalarKind::F16,
            Quantization::Int8 => ScalarKind::I8,
            Quantization::Binary => ScalarKind::B1,
        },
        connectivity: m.connectivity,
        expansion_add: m.expansion_add,
        expansion_search: m.expansion_search,
        multi: false,
    }
}

/// Memory one row takes in a graph, about: its vector, its level-0 links, bookkeeping.
pub(super) fn per_row_bytes(m: &Manifest) -> u64 {
    (m.quantization.vector_bytes(m.dimensions) + 2 * m.connectivity * 4 + 48) as u64
}

pub(super) fn invalid_data(path: &Path, e: impl std::fmt::Display) -> SinkError {
    SinkError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    }
}
