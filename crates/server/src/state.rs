//! The [`ServerState`]: what every Flight handler and the metrics endpoint share — the
//! settings, the ingest pipeline, the actors' addresses, the datasets, and the bound on open
//! streams. [`crate::app`] builds it; [`crate::flight`] and
//! [`crate::metrics`] use it; it imports neither, so the three do not form a circle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use actix::Addr;
use keel_engine::cache::actor::CacheActor;
use keel_engine::cache::messages::GetCacheStats;
use keel_engine::embedder::config::BackendChoice;
use keel_engine::embedder::workers::EmbedderStats;
use keel_engine::ingest::pipeline::{IngestCounters, Pipeline};
use keel_engine::sink::datasets::Datasets;
use keel_engine::sink::reduce::Projection;
use keel_engine::sink::store::{DatasetInfo, SinkError};
use keel_engine::stats::{CleanupStats, MemoryStats, Stats, StreamStats};
use keel_engine::supervisor::actor::SupervisorActor;
use keel_engine::supervisor::messages::GetMemoryReport;
use keel_wire::descriptor::Request;
use keel_wire::vectors::VectorFormat;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Settings;

/// Why the engine could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `server.max_streams` streams are open.
    #[error("{0} streams are open (server.max_streams); retry later")]
    TooManyStreams(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// An actor did not answer (it stopped: shutting down, or a bug).
    #[error("{0} unavailable: {1}")]
    ActorGone(&'static str, String),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("a blocking task failed: {0}")]
    Task(String),
    /// A request that cannot be met as asked.
    #[error("{0}")]
    Invalid(String),
}

/// How a stream's vectors are written: their format, and the projection (by its
/// `"DATASET/NAME"`) they go through first, if any.
#[derive(Clone)]
pub struct Shape {
    pub format: VectorFormat,
    pub projection: Option<(String, Arc<Projection>)>,
}

impl Shape {
    /// The model's vectors (`rows × dim`) as this shape's values (`rows × dimensions`):
    /// projected, or as they are (the format cuts them).
    pub fn apply(&self, vectors: Vec<f32>, dim: usize) -> (Vec<f32>, usize) {
        match &self.projection {
            None => (vectors, dim),
            Some((_, p)) => (
                vectors
                    .chunks_exact(dim)
                    .flat_map(|v| p.project_model(v))
                    .collect(),
                p.dimensions,
            ),
        }
    }
}

/// Everything a Flight handler needs; shared by all streams.
pub struct ServerState {
    /// The settings it runs with (`embedder.backend` resolved: never `auto`).
    pub settings: Settings,
    /// The embedder's backend as configured, as picked, and why.
    pub backend: BackendChoice,
    pub pipeline: Arc<Pipeline>,
    pub cache: Option<Addr<CacheActor>>,
    pub supervisor: Addr<SupervisorActor>,
    pub datasets: Datasets,
    /// Embedded rows waiting in `DoPut` streams' write buffers, all streams together:
    /// bounded by `ingest.max_in_flight_rows` (a stream over it flushes at once).
    pub put_buffered_rows: std::sync::atomic::AtomicUsize,
    streams: Arc<Semaphore>,
    closing: AtomicBool,
    started: Instant,
}

impl ServerState {
    pub fn new(
        settings: Settings,
        backend: BackendChoice,
        pipeline: Arc<Pipeline>,
        cache: Option<Addr<CacheActor>>,
        supervisor: Addr<SupervisorActor>,
        datasets: Datasets,
    ) -> Self {
        Self {
            streams: Arc::new(Semaphore::new(settings.server.max_streams)),
            put_buffered_rows: std::sync::atomic::AtomicUsize::new(0),
            settings,
            backend,
            pipeline,
            cache,
            supervisor,
            datasets,
            closing: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// A stream slot, or an error when `server.max_streams` are open or the server is
    /// shutting down.
    pub fn admit_stream(&self) -> Result<StreamSlot, ServerError> {
        if self.is_closing() {
            return Err(ServerError::ShuttingDown);
        }
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServerError::TooManyStreams(self.settings.server.max_streams))?;
        let counters = self.pipeline.counters().clone();
        counters.streams_open.fetch_add(1, Ordering::Relaxed);
        counters.streams_total.fetch_add(1, Ordering::Relaxed);
        Ok(StreamSlot {
            _permit: permit,
            counters,
        })
    }

    /// Resolves once no stream is open (every slot is free again).
    pub async fn streams_ended(&self) {
        let slots = self.settings.server.max_streams as u32;
        // The semaphore is never closed; holding every slot for an instant is the signal.
        let _ = self.streams.acquire_many(slots).await;
    }

    /// No new streams from now on (SIGTERM); open ones may finish.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// How a stream's vectors are written: its command's precision and dimensions, else
    /// `ingest.default_precision` / `default_dimensions`. `InvalidArgument` for
    /// dimensions the model does not have.
    pub fn vector_format(&self, request: &Request) -> Result<VectorFormat, ServerError> {
        let ingest = self.pipeline.config();
        let dim = self.pipeline.dim();
        let default = VectorFormat {
            precision: ingest.default_precision,
            dimensions: ingest.default_dimensions.unwrap_or(dim),
        };
        VectorFormat::resolve(request.precision, request.dimensions, default, dim)
            .map_err(|e| ServerError::Invalid(e.to_string()))
    }

    /// [`ServerState::vector_format`] plus the command's projection (loaded from the data
    /// folder): with one, the vectors are projected to its dimensions. `NotFound` for an
    /// unknown projection, `InvalidArgument` for one of another model's dimensions.
    pub fn vector_shape(&self, request: &Request) -> Result<Shape, ServerError> {
        let Some(name) = &request.projection else {
            return Ok(Shape {
                format: self.vector_format(request)?,
                projection: None,
            });
        };
        let projection = Projection::load_named(self.datasets.root(), name)?;
        let dim = self.pipeline.dim();
        if projection.input_dimensions > dim {
            return Err(ServerError::Invalid(format!(
                "projection {name:?} takes {} dimensions, the model gives {dim}",
                projection.input_dimensions
            )));
        }
        let format = VectorFormat::resolve(
            request.precision,
            None,
            VectorFormat {
                precision: self.pipeline.config().default_precision,
                dimensions: projection.dimensions,
            },
            projection.dimensions,
        )
        .map_err(|e| ServerError::Invalid(e.to_string()))?;
        Ok(Shape {
            format,
            projection: Some((name.clone(), Arc::new(projection))),
        })
    }

    /// A dataset's description, read off the async workers.
    pub async fn dataset(&self, name: String) -> Result<DatasetInfo, ServerError> {
        let store = self.datasets.store().clone();
        tokio::task::spawn_blocking(move || store.info(&name))
            .await
            .map_err(|e| ServerError::Task(e.to_string()))?
            .map_err(ServerError::from)
    }

    /// Every figure of the engine now.
    pub async fn stats(&self) -> Result<Stats, ServerError> {
        let memory = self
            .supervisor
            .send(GetMemoryReport)
            .await
            .map_err(|e| ServerError::ActorGone("supervisor", e.to_string()))?;
        let cache = match &self.cache {
            Some(c) => c
                .send(GetCacheStats)
                .await
                .map_err(|e| ServerError::ActorGone("cache", e.to_string()))?,
            None => Default::default(),
        };
        let c = self.pipeline.counters();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Stats {
            uptime_s: self.started.elapsed().as_secs_f64(),
            rss_bytes: memory.rss_bytes,
            peak_rss_bytes: memory.peak_rss_bytes,
            memory: MemoryStats::from_report(&memory),
            admit_wait_s: load(&c.admit_wait_micros) as f64 / 1e6,
            ops: load(&c.ops),
            rows: load(&c.rows),
            null_rows: load(&c.null_rows),
            embedded_rows: load(&c.embedded_rows),
            coalesced_rows: load(&c.coalesced_rows),
            in_flight_rows: load(&c.in_flight_rows),
            max_in_flight_rows: self.pipeline.config().max_in_flight_rows as u64,
            max_in_flight_rows_seen: load(&c.max_in_flight_rows_seen),
            streams: StreamStats {
                open: load(&c.streams_open),
                total: load(&c.streams_total),
                failed: load(&c.streams_failed),
                rejected: load(&c.rejected_streams),
                max: self.settings.server.max_streams as u64,
            },
            cache: keel_engine::stats::CacheFigures {
                shared: self.pipeline.shared_cache().map(|s| s.stats()),
                ..cache.into()
            },
            embedder: EmbedderStats {
                backend: self.backend.picked.name().to_string(),
                backend_why: self.backend.why.clone(),
                ..self.pipeline.embedder().stats()
            },
            cleanups: CleanupStats::from_report(&memory),
            indexes: self.datasets.indexes().reports(),
        })
    }
}

/// One open stream; dropping it frees the slot.
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    counters: Arc<IngestCounters>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.counters.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}
