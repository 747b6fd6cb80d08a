//! `DoAction`: the action's type and body parsed once into an [`Action`], then one
//! handler each. Bodies are JSON with unknown keys refused.
//!
//! - `stats`: every figure of the engine ([`keel_engine::stats::Stats`]);
//! - `health`: status, model and dimension;
//! - `cleanup`: run one now, `{"level": "gentle"|"full"}` (gentle when empty);
//! - `search`: the rows of a dataset nearest a text, `{"dataset", "text", "k"}`;
//! - `heap-profile`: a jemalloc heap profile written to `memory.heap_profile_dir`.

use std::sync::Arc;

use keel_engine::cleanup::{CleanupLevel, CleanupRecord};
use keel_engine::supervisor::messages::RunCleanup;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::error;
use crate::engine::Engine;

/// Every action, with its description for `ListActions`.
pub const ACTIONS: [(&str, &str); 5] = [
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
];

/// A parsed action.
#[derive(Debug, PartialEq)]
pub enum Action {
    Stats,
    Health,
    Cleanup(CleanupLevel),
    Search(SearchRequest),
    HeapProfile,
}

/// The `search` action's body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub dataset: String,
    pub text: String,
    #[serde(default = "default_k")]
    pub k: usize,
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
    pub scanned_rows: u64,
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
                keel_wire::descriptor::checked_dataset_name(&request.dataset)?;
                Ok(Action::Search(request))
            }
            "heap-profile" if empty(body) => Ok(Action::HeapProfile),
            "heap-profile" => Err(Status::invalid_argument(
                "heap-profile takes no body (the folder is memory.heap_profile_dir)",
            )),
            other => Err(Status::invalid_argument(format!(
                "unknown action {other:?}; actions: stats, cleanup, health, search, heap-profile"
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
    let (dataset, k) = (request.dataset.clone(), request.k);
    let found = tokio::task::spawn_blocking(move || {
        keel_engine::sink::search::nearest(&store, &dataset, &vector, k)
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
        scanned_rows: found.scanned_rows,
        results,
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
