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

use keel_engine::cleanup::CleanupRecord;
use keel_engine::sink::index::IndexReport;
use keel_engine::sink::search::SearchOptions;
use keel_engine::supervisor::messages::RunCleanup;
use keel_wire::contract::{
    CleanupLevel, CleanupRequest, Health, IndexRequest, ReduceRequest, ReduceResponse,
    SearchRequest, SearchResponse,
};
use tonic::Status;

use super::error;
use crate::state::ServerState;

/// A parsed action (the bodies and answers are the client contract's,
/// `keel_wire::contract`).
#[derive(Debug, PartialEq)]
pub enum Action {
    Stats,
    Health,
    Cleanup(CleanupLevel),
    Search(SearchRequest),
    HeapProfile,
    Index(IndexRequest),
    Reduce(ReduceRequest),
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
            "cleanup" => serde_json::from_slice::<CleanupRequest>(body)
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
                let body: IndexRequest = serde_json::from_slice(body).map_err(|e| {
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
    pub async fn run(self, engine: &Arc<ServerState>) -> Result<Vec<u8>, Status> {
        let json = match self {
            Action::Stats => serde_json::to_vec(&engine.stats().await.map_err(error::server)?),
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
fn health(engine: &ServerState) -> Result<Health, Status> {
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
fn heap_profile(engine: &ServerState) -> Result<serde_json::Value, Status> {
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

async fn cleanup(engine: &ServerState, level: CleanupLevel) -> Result<CleanupRecord, Status> {
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
async fn search(engine: &ServerState, request: SearchRequest) -> Result<SearchResponse, Status> {
    let pipeline = &engine.pipeline;
    let vector = {
        let _in_flight = pipeline.admit(1).await.map_err(error::ingest)?;
        pipeline
            .embed(vec![Some(request.text.clone())])
            .await
            .map_err(error::ingest)?
            .0
    };
    let store = engine.datasets.store().clone();
    let indexes = engine.datasets.indexes().clone();
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
async fn index(engine: &ServerState, body: IndexRequest) -> Result<IndexReport, Status> {
    let indexes = engine.datasets.indexes().clone();
    tokio::task::spawn_blocking(move || indexes.build(&body.dataset, &body.options()))
        .await
        .map_err(|e| Status::internal(format!("index task failed: {e}")))?
        .map_err(error::sink)
}

/// Fits a PCA projection on a dataset on a blocking thread.
async fn reduce(engine: &ServerState, body: ReduceRequest) -> Result<ReduceResponse, Status> {
    let store = engine.datasets.store().clone();
    let root = engine.datasets.root().to_path_buf();
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
