//! Wiring: start every actor in order, serve Flight, shut down in reverse order.
//!
//! Threads: the actix `System` runs on its own thread (cache and supervisor actors);
//! embedder replicas and the sink have dedicated threads; tonic runs on the tokio
//! multi-thread runtime of the caller. Actors talk through `Addr::send` across runtimes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use actix::{Actor, Addr};
use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use keel_actors::cache::actor::CacheActor;
use keel_actors::cache::messages::GetCacheStats;
use keel_actors::embedding::actor::EmbedderJanitor;
use keel_actors::embedding::model::SentenceModel;
use keel_actors::embedding::service::EmbedderService;
use keel_actors::ingest::pipeline::{IngestCounters, Pipeline};
use keel_actors::memory::allocator;
use keel_actors::sink::actor::SinkHandle;
use keel_actors::sink::store::DatasetStore;
use keel_actors::supervisor::actor::SupervisorActor;
use keel_actors::supervisor::messages::GetMemoryReport;
use keel_actors::supervisor::probe::ProcessProbe;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::config::Settings;
use crate::flight::service::KeelFlight;

/// Everything a Flight handler needs; shared by all streams.
pub struct Engine {
    pub settings: Settings,
    pub pipeline: Arc<Pipeline>,
    pub cache: Option<Addr<CacheActor>>,
    pub supervisor: Addr<SupervisorActor>,
    pub sink: SinkHandle,
    pub auth: Arc<crate::flight::auth::Auth>,
    streams: Arc<Semaphore>,
    closing: AtomicBool,
    started: Instant,
}

impl Engine {
    /// A stream slot, or `ResourceExhausted` when `server.max_streams` are open.
    pub fn admit_stream(&self) -> Result<StreamSlot, Status> {
        if self.is_closing() {
            return Err(Status::unavailable("the server is shutting down"));
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} streams are open (server.max_streams); retry later",
                self.settings.server.max_streams
            ))
        })?;
        let counters = self.pipeline.counters().clone();
        counters.streams_open.fetch_add(1, Ordering::Relaxed);
        counters.streams_total.fetch_add(1, Ordering::Relaxed);
        Ok(StreamSlot {
            _permit: permit,
            counters,
        })
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    pub async fn stats(&self) -> Result<serde_json::Value, Status> {
        let memory = self
            .supervisor
            .send(GetMemoryReport)
            .await
            .map_err(|e| Status::unavailable(format!("supervisor unavailable: {e}")))?;
        let cache = match &self.cache {
            Some(c) => Some(
                c.send(GetCacheStats)
                    .await
                    .map_err(|e| Status::unavailable(format!("cache unavailable: {e}")))?,
            ),
            None => None,
        };
        let c = self.pipeline.counters();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let hit_rate = cache
            .map(|s| {
                if s.hits + s.misses > 0 {
                    s.hits as f64 / (s.hits + s.misses) as f64
                } else {
                    0.0
                }
            })
            .unwrap_or(0.0);
        Ok(serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "rss_bytes": memory.rss_bytes,
            "peak_rss_bytes": memory.peak_rss_bytes,
            "memory": {
                "limit_bytes": memory.limit_bytes,
                "pressure": memory.pressure,
                "soft_bytes": memory.soft_bytes,
                "hard_bytes": memory.hard_bytes,
                "allocated_bytes": memory.latest.allocated,
                "resident_bytes": memory.latest.resident,
                "samples": memory.samples,
                "creep": memory.creep,
            },
            "admit_wait_s": load(&c.admit_wait_micros) as f64 / 1e6,
            "ops": load(&c.ops),
            "rows": load(&c.rows),
            "null_rows": load(&c.null_rows),
            "embedded_rows": load(&c.embedded_rows),
            "in_flight_rows": load(&c.in_flight_rows),
            "max_in_flight_rows": self.pipeline.config().max_in_flight_rows,
            "max_in_flight_rows_seen": load(&c.max_in_flight_rows_seen),
            "streams": {
                "open": load(&c.streams_open),
                "total": load(&c.streams_total),
                "failed": load(&c.streams_failed),
                "rejected": load(&c.rejected_streams),
                "max": self.settings.server.max_streams,
            },
            "cache": cache.map(|s| serde_json::json!({
                "hits": s.hits, "misses": s.misses, "hit_rate": hit_rate, "entries": s.entries,
                "bytes": s.bytes, "max_bytes": s.max_bytes, "insertions": s.insertions,
                "evictions": s.evictions,
            })).unwrap_or_else(|| serde_json::json!({
                "hits": 0, "misses": 0, "hit_rate": 0.0, "entries": 0, "bytes": 0, "max_bytes": 0,
                "insertions": 0, "evictions": 0,
            })),
            "embedder": self.pipeline.embedder().stats(),
            "cleanups": {
                "total": memory.cleanups_total,
                "gentle": memory.cleanups_gentle,
                "full": memory.cleanups_full,
                "recent": memory.recent_cleanups,
            },
        }))
    }
}

/// One open stream; dropping it frees the slot.
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    counters: Arc<keel_actors::ingest::pipeline::IngestCounters>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.counters.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A started engine: the shared [`Engine`] and what must be stopped at the end.
pub struct Running {
    pub engine: Arc<Engine>,
    embedder: EmbedderService,
    sink_thread: std::thread::JoinHandle<()>,
    actix: actix::System,
    actix_thread: std::thread::JoinHandle<()>,
}

/// Loads the model and starts the actors, the embedder threads and the sink.
pub fn start(settings: Settings) -> anyhow::Result<Running> {
    // Secrets first: a misconfigured auth section fails before the model loads.
    let auth = Arc::new(crate::flight::auth::Auth::from_config(&settings.auth)?);
    let model = SentenceModel::load(&settings.embedder.model_dir, settings.embedder.backend)
        .with_context(|| {
            format!(
                "loading the model from {}",
                settings.embedder.model_dir.display()
            )
        })?;
    let key_settings = format!(
        "{:?}|normalize={}|max_seq={}",
        model.spec().pooling,
        model.spec().normalize,
        model.spec().max_seq_length
    );
    let ingest = &settings.ingest;
    // Enough queued jobs for every in-flight micro-batch: the permits are the real bound.
    let queue_jobs = ingest.max_in_flight_rows.div_ceil(ingest.micro_batch_rows) + 1;
    let device = settings.embedder.backend.device()?;
    let pooled_device_memory = !settings.embedder.backend.is_host();
    let embedder = EmbedderService::start(model, &settings.embedder, queue_jobs)?;

    let m = &settings.memory;
    if let Err(e) = allocator::configure(m.background_thread, m.dirty_decay_ms, m.muzzy_decay_ms) {
        // Not jemalloc (a library user's own allocator): figures stay, purges are no-ops.
        tracing::warn!(error = %e, "could not configure the allocator");
    }

    let store = DatasetStore::open(&settings.storage.data_dir).with_context(|| {
        format!(
            "opening storage.data_dir {}",
            settings.storage.data_dir.display()
        )
    })?;
    let (sink, sink_thread) = SinkHandle::start(store, settings.storage.queue_depth);

    // The actix system on its own thread; its actors are created inside it.
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    let cache_cfg = settings.cache.clone();
    let supervisor_cfg = settings.supervisor.clone();
    let memory_cfg = settings.memory.clone();
    let counters = Arc::new(IngestCounters::default());
    let cache_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let probe = Box::new(ProcessProbe::new(counters.clone(), cache_bytes.clone()));
    let pressure = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let supervisor_pressure = pressure.clone();
    let actix_thread = std::thread::Builder::new()
        .name("keel-actors".into())
        .spawn(move || {
            let system = actix::System::new();
            system.block_on(async move {
                let cache = (cache_cfg.max_bytes > 0)
                    .then(|| CacheActor::new(cache_cfg, cache_bytes).start());
                let mut members = Vec::new();
                if let Some(c) = &cache {
                    members.push(c.clone().recipient());
                }
                members.push(
                    EmbedderJanitor::new(device, pooled_device_memory)
                        .start()
                        .recipient(),
                );
                let supervisor = SupervisorActor::new(supervisor_cfg, memory_cfg, probe, members)
                    .with_pressure_flag(supervisor_pressure)
                    .start();
                let _ = addrs_tx.send((cache, supervisor, actix::System::current()));
            });
            let _ = system.run();
        })
        .context("starting the actor thread")?;
    let (cache, supervisor, actix) = addrs_rx.recv().context("the actor system did not start")?;

    let pipeline = Arc::new(Pipeline::new(
        settings.ingest.clone(),
        cache.clone(),
        embedder.handle(),
        key_settings,
        counters,
        pressure,
    ));
    let engine = Arc::new(Engine {
        streams: Arc::new(Semaphore::new(settings.server.max_streams)),
        settings,
        pipeline,
        cache,
        supervisor,
        sink,
        auth,
        closing: AtomicBool::new(false),
        started: Instant::now(),
    });
    Ok(Running {
        engine,
        embedder,
        sink_thread,
        actix,
        actix_thread,
    })
}

impl Running {
    /// Serves Flight on `listener` until `shutdown` resolves, then drains: no new streams,
    /// open streams get `server.shutdown_grace_ms` to finish, then everything stops.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        metrics: Option<tokio::net::TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let engine = self.engine.clone();
        let metrics_task = metrics.map(|l| tokio::spawn(crate::metrics::serve(l, engine.clone())));
        let service = FlightServiceServer::new(KeelFlight::new(engine.clone()))
            .max_decoding_message_size(engine.settings.server.max_message_bytes)
            .max_encoding_message_size(engine.settings.server.max_message_bytes);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let grace = std::time::Duration::from_millis(engine.settings.server.shutdown_grace_ms);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let closing_engine = engine.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: no new streams");
            closing_engine.closing.store(true, Ordering::Relaxed);
            // Give open streams their grace period, then stop the server.
            let deadline = tokio::time::Instant::now() + grace;
            while closing_engine
                .pipeline
                .counters()
                .streams_open
                .load(Ordering::Relaxed)
                > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let _ = stop_tx.send(());
        });
        let mut builder = tonic::transport::Server::builder();
        let tls = &engine.settings.server.tls;
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            let read = |p: &std::path::PathBuf, what: &str| {
                std::fs::read(p).with_context(|| format!("server.tls.{what}: {}", p.display()))
            };
            let identity =
                tonic::transport::Identity::from_pem(read(cert, "cert")?, read(key, "key")?);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .context("server.tls: the certificate or key is not usable")?;
        }
        builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
            .context("the Flight server failed")?;
        if let Some(t) = metrics_task {
            t.abort();
        }
        // Stopping joins threads: do it off the async workers.
        tokio::task::spawn_blocking(move || self.stop())
            .await
            .context("stopping the engine")?;
        Ok(())
    }

    /// Stops in reverse order of start: ingest, embedder, sink, actors.
    pub fn stop(self) {
        let Running {
            engine,
            embedder,
            sink_thread,
            actix,
            actix_thread,
        } = self;
        engine.pipeline.close();
        embedder.shutdown(std::time::Duration::from_secs(5));
        engine.sink.stop();
        let _ = sink_thread.join();
        drop(engine);
        actix.stop();
        let _ = actix_thread.join();
        tracing::info!("stopped");
    }
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}
