//! `DoAction`: the action's type and body parsed once into an [`Action`], then one
//! handler each. Bodies are JSON with unknown keys refused.
//!
//! - `stats`: every figure of the engine ([`keel_engine::stats::Stats`]);
//! - `health`: status, model and dimension;
//! - `cleanup`: run one now, `{"level": "gentle"|"full"}` (gentle when empty);
//! - `search`: the rows of a dataset nearest a text, `{"dataset", "text", "k"}` (and
//!   optionally `"mode"`, `"rescore"`, `"expansion"`);
//! - `index`: build a dataset's approximate nearest-neighbour index, `{"dataset", ...}`;
//! - `reduce`: fit a PCA projection on a dataset, `{"dataset", "dimensions", "name"}`;
//! - `heap-profile`: a jemalloc heap profile written to `memory.heap_profile_dir`.

use std::sync::Arc;

use keel_engine::cleanup::{CleanupLevel, CleanupRecord};
use keel_engine::sink::config::Quantization;
use keel_engine::sink::index::{IndexReport, IndexRequest};
use keel_engine::sink::search::{SearchMode, SearchOptions};
use keel_engine::supervisor::messages::RunCleanup;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::error;
use crate::engine::Engine;

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

/// A parsed action.
#[derive(Debug, PartialEq)]
pub enum Action {
    Stats,
    Health,
    Cleanup(CleanupLevel),
    Search(SearchRequest),
    HeapProfile,
    Index(IndexBody),
    Reduce(ReduceRequest),
}

/// The `index` action's body: the dataset and what differs from `storage.index`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexBody {
    pub dataset: String,
    #[serde(default)]
    pub quantization: Option<Quantization>,
    #[serde(default)]
    pub projection: Option<String>,
    #[serde(default)]
    pub connectivity: Option<usize>,
    #[serde(default)]
    pub expansion_add: Option<usize>,
    #[serde(default)]
    pub expansion_search: Option<usize>,
    #[serde(default)]
    pub rescore: Option<usize>,
}

impl IndexBody {
    fn request(&self) -> IndexRequest {
        IndexRequest {
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceRequest {
    pub dataset: String,
    pub dimensions: usize,
    /// The projection's name (default `pcaN`).
    #[serde(default)]
    pub name: Option<String>,
}

/// The `reduce` action's answer.
#[derive(Debug, Serialize, Deserialize)]
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

/// The `search` action's body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    #[serde(default)]
    pub rescore: Option<usize>,
    /// The graph's search breadth (default: the index's `expansion_search`).
    #[serde(default)]
    pub expansion: Option<usize>,
}

fn default_k() -> usize {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CleanupBody {
    #[serde(default)]
    level: Option<CleanupLevel>,
}

/// The `health` action's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `shutting_down` after SIGTERM.
    pub status: String,
    pub model: String,
    pub dim: usize,
}

/// The `search` action's answer.
#[derive(Debug, Serialize, Deserialize)]
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

fn empty(body: &[u8]) -> bool {
    body.iter().all(|b| b.is_ascii_whitespace())
}

impl Action {
    /// Parses an action; `max_k` bounds a search's `k` (`server.search_max_k`).
    pub fn parse(kind: &str, body: &[u8], max_k: usize) -> Result<Self, Status> {
        match kind {
            "stats" => Ok(Action::Stats),
            "health" => Ok(Action::Health),
            "cleanup" if empty(body) => Ok(Action::Cleanup(CleanupLevel::Gentle)),
            "cleanup" => serde_json::from_slice::<CleanupBody>(body)
                .map(|b| Action::Cleanup(b.level.unwrap_or(CleanupLevel::Gentle)))
                .map_err(|e| Status::invalid_argument(format!("bad cleanup body: {e}"))),
            "search" => {
                let request: SearchRequest = serde_json::from_slice(body).map_err(|e| {
                    Status::invalid_argument(format!(
                        "bad search body ({e}); send {{\"dataset\": NAME, \"text\": \"...\", \"k\": 10}}"
                    ))
                })?;
                if request.k == 0 || request.k > max_k {
                    return Err(Status::invalid_argument(format!(
                        "search: k must be within 1..={max_k} (server.search_max_k), got {}",
                        request.k
                    )));
                }
                if request.rescore.is_some_and(|r| r > 100_000)
                    || request.expansion.is_some_and(|e| e == 0 || e > 100_000)
                {
                    return Err(Status::invalid_argument(
                        "search: rescore must be within 0..=100000 and expansion within 1..=100000",
                    ));
                }
                keel_wire::descriptor::checked_dataset_name(&request.dataset)?;
                Ok(Action::Search(request))
            }
            "index" => {
                let body: IndexBody = serde_json::from_slice(body).map_err(|e| {
                    Status::invalid_argument(format!(
                        "bad index body ({e}); send {{\"dataset\": NAME}} and optionally \
                         quantization (f32|f16|int8|binary), projection, connectivity, \
                         expansion_add, expansion_search, rescore"
                    ))
                })?;
                keel_wire::descriptor::checked_dataset_name(&body.dataset)?;
                Ok(Action::Index(body))
            }
            "reduce" => {
                let body: ReduceRequest = serde_json::from_slice(body).map_err(|e| {
                    Status::invalid_argument(format!(
                        "bad reduce body ({e}); send {{\"dataset\": NAME, \"dimensions\": 128}} \
                         and optionally \"name\""
                    ))
                })?;
                keel_wire::descriptor::checked_dataset_name(&body.dataset)?;
                Ok(Action::Reduce(body))
            }
            "heap-profile" if empty(body) => Ok(Action::HeapProfile),
            "heap-profile" => Err(Status::invalid_argument(
                "heap-profile takes no body (the folder is memory.heap_profile_dir)",
            )),
            other => Err(Status::invalid_argument(format!(
                "unknown action {other:?}; actions: stats, cleanup, health, search, \
                 heap-profile, index, reduce"
            ))),
        }
    }

    /// Runs the action; the answer is JSON.
    pub async fn run(self, engine: &Arc<Engine>) -> Result<Vec<u8>, Status> {
        let json = match self {
            Action::Stats => serde_json::to_vec(&engine.stats().await.map_err(error::engine)?),
            Action::Health => serde_json::to_vec(&health(engine)?),
            Action::Cleanup(level) => serde_json::to_vec(&cleanup(engine, level).await?),
            Action::Search(request) => serde_json::to_vec(&search(engine, request).await?),
            Action::HeapProfile => serde_json::to_vec(&heap_profile(engine)?),
            Action::Index(body) => serde_json::to_vec(&index(engine, body).await?),
            Action::Reduce(body) => serde_json::to_vec(&reduce(engine, body).await?),
        };
        json.map_err(|e| Status::internal(format!("encoding the answer: {e}")))
    }
}

/// `Unavailable` while a GPU worker is still compiling its kernels: a readiness probe
/// sends traffic only to a warm engine.
fn health(engine: &Engine) -> Result<Health, Status> {
    if let Some(progress) = engine.pipeline.embedder().warming() {
        return Err(Status::unavailable(format!("warming up: {progress}")));
    }
    Ok(Health {
        status: if engine.is_closing() {
            "shutting_down"
        } else {
            "ok"
        }
        .into(),
        model: engine.pipeline.embedder().model_id().into(),
        dim: engine.pipeline.dim(),
    })
}

/// Writes `keel.PID.SEQ.heap` into `memory.heap_profile_dir`.
fn heap_profile(engine: &Engine) -> Result<serde_json::Value, Status> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = &engine.settings.memory.heap_profile_dir else {
        return Err(Status::failed_precondition(
            "heap profiles are off: set memory.heap_profile_dir (and start keel with \
             _RJEM_MALLOC_CONF=prof:true)",
        ));
    };
    if !keel_engine::memory::allocator::profiling() {
        return Err(Status::failed_precondition(
            "heap profiling is off in this process: start keel with _RJEM_MALLOC_CONF=prof:true",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        Status::internal(format!("creating heap_profile_dir {}: {e}", dir.display()))
    })?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("keel.{}.{seq}.heap", std::process::id()));
    keel_engine::memory::allocator::dump_profile(&path).map_err(Status::internal)?;
    Ok(serde_json::json!({ "path": path }))
}

async fn cleanup(engine: &Engine, level: CleanupLevel) -> Result<CleanupRecord, Status> {
    engine
        .supervisor
        .send(RunCleanup {
            level,
            reason: "requested by the cleanup action".into(),
        })
        .await
        .map_err(|e| Status::unavailable(format!("supervisor unavailable: {e}")))
}

/// Embeds the query text (through the cache, like any row), then scans the dataset on a
/// blocking thread for the `k` nearest rows by cosine.
async fn search(engine: &Engine, request: SearchRequest) -> Result<SearchResponse, Status> {
    let pipeline = &engine.pipeline;
    let vector = {
        let _in_flight = pipeline.admit(1).await.map_err(error::ingest)?;
        pipeline
            .embed(vec![Some(request.text.clone())])
            .await
            .map_err(error::ingest)?
            .0
    };
    let store = engine.sink.store().clone();
    let indexes = engine.sink.indexes().clone();
    let (dataset, k) = (request.dataset.clone(), request.k);
    let options = SearchOptions {
        mode: request.mode,
        rescore: request.rescore,
        expansion: request.expansion,
    };
    let found = tokio::task::spawn_blocking(move || {
        keel_engine::sink::search::nearest(&store, Some(&indexes), &dataset, &vector, k, options)
    })
    .await
    .map_err(|e| Status::internal(format!("search task failed: {e}")))?
    .map_err(error::sink)?;
    let mut writer = arrow_json::ArrayWriter::new(Vec::new());
    writer
        .write(&found.batch)
        .and_then(|()| writer.finish())
        .map_err(|e| Status::internal(format!("encoding search results: {e}")))?;
    let json = writer.into_inner();
    let results = if json.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice(&json).map_err(|e| Status::internal(e.to_string()))?
    };
    Ok(SearchResponse {
        dataset: request.dataset,
        text: request.text,
        k: request.k,
        mode: found.mode,
        scanned_rows: found.scanned_rows,
        indexed_rows: found.indexed_rows,
        candidates: found.candidates,
        results,
    })
}

/// Builds a dataset's index on a blocking thread (minutes for millions of rows).
async fn index(engine: &Engine, body: IndexBody) -> Result<IndexReport, Status> {
    let indexes = engine.sink.indexes().clone();
    tokio::task::spawn_blocking(move || indexes.build(&body.dataset, &body.request()))
        .await
        .map_err(|e| Status::internal(format!("index task failed: {e}")))?
        .map_err(error::sink)
}

/// Fits a PCA projection on a dataset on a blocking thread.
async fn reduce(engine: &Engine, body: ReduceRequest) -> Result<ReduceResponse, Status> {
    let store = engine.sink.store().clone();
    let root = engine.settings.storage.data_dir.clone();
    let started = std::time::Instant::now();
    let name = body
        .name
        .clone()
        .unwrap_or_else(|| format!("pca{}", body.dimensions));
    let dataset = body.dataset.clone();
    let projection = tokio::task::spawn_blocking(move || {
        keel_engine::sink::reduce::reduce_dataset(&store, &root, &dataset, body.dimensions, &name)
    })
    .await
    .map_err(|e| Status::internal(format!("reduce task failed: {e}")))?
    .map_err(error::sink)?;
    Ok(ReduceResponse {
        dataset: body.dataset,
        name: projection.name,
        input_dimensions: projection.input_dimensions,
        dimensions: projection.dimensions,
        rows: projection.rows,
        variance_kept: projection.variance_kept,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_once_with_defaults_and_bounds() {
        assert_eq!(Action::parse("stats", b"", 10).unwrap(), Action::Stats);
        assert_eq!(
            Action::parse("cleanup", b"  ", 10).unwrap(),
            Action::Cleanup(CleanupLevel::Gentle)
        );
        assert_eq!(
            Action::parse("cleanup", br#"{"level":"full"}"#, 10).unwrap(),
            Action::Cleanup(CleanupLevel::Full)
        );
        let search = Action::parse("search", br#"{"dataset":"d","text":"BRAF"}"#, 10).unwrap();
        assert!(matches!(
            search,
            Action::Search(SearchRequest { k: 10, .. })
        ));
    }

    #[test]
    fn bad_actions_are_invalid_arguments_that_say_why() {
        let err = |kind: &str, body: &[u8]| Action::parse(kind, body, 10).unwrap_err();
        for (kind, body, says) in [
            ("nope", &b""[..], "unknown action"),
            ("cleanup", br#"{"level":"hard"}"#, "bad cleanup body"),
            ("search", br#"{"dataset":"d"}"#, "bad search body"),
            (
                "search",
                br#"{"dataset":"d","text":"t","k":11}"#,
                "k must be within 1..=10",
            ),
            (
                "search",
                br#"{"dataset":"../x","text":"t"}"#,
                "invalid dataset name",
            ),
        ] {
            let status = err(kind, body);
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{kind} {status:?}"
            );
            assert!(
                status.message().contains(says),
                "{kind}: {}",
                status.message()
            );
        }
    }
}
