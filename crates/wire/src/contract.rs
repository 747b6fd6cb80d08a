//! The client contract: every request and answer a Flight client exchanges with Keel
//! besides the record batches themselves. Stream descriptors ([`embed_descriptor`],
//! [`dataset_descriptor`]), the actions' names ([`ACTIONS`]), bodies and answers, and the
//! `DoPut` acknowledgement ([`PutAck`]). The server parses and writes these types; the
//! CLI and the soak driver build and read the same ones; `python/keel_client` mirrors them
//! (docs/FLIGHT.md is the reference for both).
//!
//! Bodies are JSON with unknown keys refused, so a misspelt option is an error, not a
//! silently ignored wish.

use arrow_flight::FlightDescriptor;
use serde::{Deserialize, Serialize};

use crate::text::EmbedCommand;

/// A `DoExchange` that sends rows back with their vectors: path `["embed"]`, with the
/// command (when it is not all defaults) as the descriptor's `cmd`.
pub fn embed_descriptor(command: &EmbedCommand) -> FlightDescriptor {
    let mut d = FlightDescriptor::new_path(vec!["embed".into()]);
    if *command != EmbedCommand::default() {
        d.cmd = command.to_json().into();
    }
    d
}

/// A `DoPut` into dataset `name` (and `GetFlightInfo` of it): path `["datasets", NAME]`,
/// with the command (when it is not all defaults) as the descriptor's `cmd`.
pub fn dataset_descriptor(name: &str, command: &EmbedCommand) -> FlightDescriptor {
    let mut d = FlightDescriptor::new_path(vec!["datasets".into(), name.into()]);
    if *command != EmbedCommand::default() {
        d.cmd = command.to_json().into();
    }
    d
}

/// Every action, with its description for `ListActions`.
pub const ACTIONS: [(&str, &str); 7] = [
    (
        "stats",
        "JSON: memory, cache, embedder, ops, rows, in-flight rows, recent cleanups",
    ),
    (
        "cleanup",
        "Run a cleanup now; body {\"level\": \"trim\"|\"gentle\"|\"full\"}; returns each actor's duration",
    ),
    ("health", "JSON: status, model, dimension"),
    (
        "search",
        "Nearest rows of a dataset by cosine; body {\"dataset\": NAME, \"text\": \"...\", \"k\": 10}",
    ),
    (
        "heap-profile",
        "Write a jemalloc heap profile to memory.heap_profile_dir; returns {\"path\": ...}",
    ),
    (
        "index",
        "Build a dataset's HNSW index; body {\"dataset\": NAME, \"quantization\": \"int8\", \"projection\": null, \"rescore\": 50, ...}",
    ),
    (
        "reduce",
        "Fit a PCA projection on a dataset; body {\"dataset\": NAME, \"dimensions\": 128, \"name\": \"pca128\"}",
    ),
];

/// The `app_metadata` of each `PutResult` a `DoPut` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutAck {
    /// Rows of this stream on disk so far.
    pub acknowledged_rows: u64,
    /// Rows of the dataset on disk.
    pub dataset_rows: u64,
}

/// How hard a cleanup goes (the `cleanup` action's `level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupLevel {
    /// Return memory that nothing holds: allocator pages and pooled device memory. Evicts
    /// nothing (the idle cleanup: a lull must not cost the cache its working set).
    Trim,
    /// What trim does, and the cache down to its low watermark (memory pressure).
    Gentle,
    /// Everything gentle does, and empty what may be emptied.
    Full,
}

/// The `cleanup` action's body (empty: gentle).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupRequest {
    #[serde(default)]
    pub level: Option<CleanupLevel>,
}

/// The `health` action's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `shutting_down` after SIGTERM.
    pub status: String,
    pub model: String,
    pub dim: usize,
}

/// Whether a search uses the dataset's index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// The index when the dataset has one, else an exact scan.
    #[default]
    Auto,
    /// Every row scored (the reference ranking).
    Exact,
    /// The index; a dataset without one is an error.
    Index,
}

/// The `search` action's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub dataset: String,
    pub text: String,
    #[serde(default = "default_k")]
    pub k: usize,
    /// `auto` (the index when the dataset has one), `exact` or `index`.
    #[serde(default)]
    pub mode: SearchMode,
    /// Candidates rescored against the stored vectors (default: the index's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescore: Option<usize>,
    /// The graph's search breadth (default: the index's `expansion_search`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion: Option<usize>,
}

fn default_k() -> usize {
    10
}

/// The `search` action's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchResponse {
    pub dataset: String,
    pub text: String,
    pub k: usize,
    /// `exact` or `index`: how the rows were found.
    #[serde(default)]
    pub mode: SearchMode,
    /// Rows scored exactly: all of them for `exact`; for `index`, the rows appended
    /// since the index last grew.
    pub scanned_rows: u64,
    /// Rows the index covered, and the candidates it gave (0 for `exact`).
    #[serde(default)]
    pub indexed_rows: u64,
    #[serde(default)]
    pub candidates: u64,
    /// The rows found, best first: every stored column but `embedding`, plus `score`.
    pub results: Vec<serde_json::Value>,
}

/// How an index's graph keeps its vectors (and so how it compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Quantization {
    F32,
    F16,
    /// Symmetric per vector, as Keel's int8 output (the scale cancels out of a cosine).
    Int8,
    /// Sign bits compared by Hamming distance: 32× smaller than f32, rescoring needed.
    Binary,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Bytes of one vector of `d` dimensions in the graph.
    pub fn vector_bytes(self, d: usize) -> usize {
        match self {
            Self::F32 => 4 * d,
            Self::F16 => 2 * d,
            Self::Int8 => d,
            Self::Binary => d.div_ceil(8),
        }
    }
}

/// How to build an index: every field optional, the rest from `storage.index`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// A PCA projection of the dataset (`keel reduce`): the graph holds projected vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion_add: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion_search: Option<usize>,
    /// Candidates rescored against the stored vectors per search (0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescore: Option<usize>,
}

/// The `index` action's body: the dataset and what differs from `storage.index` (the
/// fields of [`IndexOptions`], spelt out: serde cannot refuse unknown keys through a
/// flattened struct).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRequest {
    pub dataset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectivity: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion_add: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expansion_search: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescore: Option<usize>,
}

impl IndexRequest {
    /// How to build the index.
    pub fn options(&self) -> IndexOptions {
        IndexOptions {
            quantization: self.quantization,
            projection: self.projection.clone(),
            connectivity: self.connectivity,
            expansion_add: self.expansion_add,
            expansion_search: self.expansion_search,
            rescore: self.rescore,
        }
    }
}

/// The `reduce` action's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceRequest {
    pub dataset: String,
    pub dimensions: usize,
    /// The projection's name (default `pcaN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The `reduce` action's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReduceResponse {
    pub dataset: String,
    pub name: String,
    pub input_dimensions: usize,
    pub dimensions: usize,
    pub rows: u64,
    /// Share of the variance the kept components hold.
    pub variance_kept: f64,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Target;

    #[test]
    fn the_descriptors_built_here_parse_as_what_they_ask_for() {
        let plain = embed_descriptor(&EmbedCommand::default());
        assert!(plain.cmd.is_empty());
        assert!(matches!(
            Target::parse(Some(&plain), "text").unwrap(),
            Target::Embed(_)
        ));
        let command = EmbedCommand {
            template: Some("{gene} {pos}".into()),
            dimensions: Some(128),
            ..Default::default()
        };
        match Target::parse(Some(&dataset_descriptor("cohort", &command)), "text").unwrap() {
            Target::Dataset(name, request) => {
                assert_eq!(name, "cohort");
                assert_eq!(request.dimensions, Some(128));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_index_body_refuses_unknown_keys() {
        let ok: IndexRequest =
            serde_json::from_str(r#"{"dataset": "d", "quantization": "int8"}"#).unwrap();
        assert_eq!(ok.options().quantization, Some(Quantization::Int8));
        let err =
            serde_json::from_str::<IndexRequest>(r#"{"dataset": "d", "quantisation": "int8"}"#)
                .unwrap_err();
        assert!(err.to_string().contains("quantisation"), "{err}");
    }
}
