//! Wiring: start every actor in order, serve Flight, shut down in reverse order.
//!
//! Threads: the actix `System` runs on its own thread (cache and supervisor actors);
//! embedder replicas and the sink have dedicated threads; tonic runs on the tokio
//! multi-thread runtime of the caller. Actors talk through `Addr::send` across runtimes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use actix::Actor;
use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use keel_engine::cache::actor::CacheActor;
use keel_engine::embedder::janitor::EmbedderJanitor;
use keel_engine::embedder::workers::EmbedderWorkers;
use keel_engine::ingest::pipeline::{IngestCounters, Pipeline};
use keel_engine::memory::allocator;
use keel_engine::memory::probe::ProcessProbe;
use keel_engine::sink::datasets::Datasets;
use keel_engine::supervisor::actor::SupervisorActor;
use tonic_health::ServingStatus;

use crate::config::Settings;
use crate::flight::auth::Auth;
use crate::flight::service::KeelFlight;
use crate::state::ServerState;

/// A started engine: the shared [`ServerState`] and what must be stopped at the end.
pub struct Running {
    pub engine: Arc<ServerState>,
    /// Who may call: checked by the Flight service on every RPC.
    auth: Arc<Auth>,
    embedder: EmbedderWorkers,
    sink_thread: std::thread::JoinHandle<()>,
    actix: actix::System,
    actix_thread: std::thread::JoinHandle<()>,
    /// The HTTP front's listener, when it is served ([`Running::with_http`]).
    http: Option<tokio::net::TcpListener>,
}

/// xxh3 of the model's weights file: part of every cache key.
fn weights_digest(model_dir: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let path = model_dir.join("model.safetensors");
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:016x}", h.digest()))
}

/// A Redis URL without its password, for the log.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Loads the model and starts the actors, the embedder threads and the sink.
pub fn start(mut settings: Settings) -> anyhow::Result<Running> {
    // Before any worker records a histogram.
    crate::metrics::install();
    // Secrets first: a misconfigured auth section fails before the model loads.
    let auth = Arc::new(Auth::from_config(&settings.auth)?);
    // `backend: auto` becomes what this machine offers before anything reads the backend
    // (worker groups, cache keys).
    let backend = settings.embedder.resolve_backend();
    if backend.configured != backend.picked {
        tracing::info!(
            picked = backend.picked.name(),
            why = %backend.why,
            "embedder backend: auto"
        );
    }
    crate::metrics::backend(&backend);
    settings.validate()?;
    let groups = settings.embedder.load_models().with_context(|| {
        format!(
            "loading the model from {}",
            settings.embedder.model_dir.display()
        )
    })?;
    // The model whose settings shape the cache keys: every group's computes the same
    // vectors (groups come GPU first).
    let model = groups[0].0.clone();
    // Everything that shapes a vector besides its text: the cache keys of both levels
    // carry it, so that no other model, weights or precision is ever served (a fleet
    // shares the second level).
    let spec = model.spec();
    let weights = weights_digest(&settings.embedder.model_dir)?;
    // Named only where they differ from BERT's, so that existing keys stay as they were.
    let mut extra = String::new();
    if spec.lowercase {
        extra.push_str("|lowercase");
    }
    if spec.position_offset > 0 {
        extra.push_str(&format!("|positions_from={}", spec.position_offset));
    }
    let key_settings = format!(
        "{:?}|normalize={}|max_seq={}|weights={weights}|precision={}{extra}",
        spec.pooling,
        spec.normalize,
        spec.max_seq_length,
        settings.embedder.precision_key()
    );
    // The space the vectors live in, whatever precision a pass computes in and wherever
    // texts are cut: what a dataset records of the model that made it.
    let model_identity = format!(
        "weights={weights}|{:?}|normalize={}{extra}",
        spec.pooling, spec.normalize
    );
    let ingest = &settings.ingest;
    if let Some(d) = ingest.default_dimensions
        && d > model.dim()
    {
        anyhow::bail!(
            "ingest.default_dimensions is {d}, but the model's vectors have {} dimensions",
            model.dim()
        );
    }
    // Enough queued jobs for every in-flight micro-batch: the permits are the real bound.
    let queue_jobs = ingest.max_in_flight_rows.div_ceil(ingest.micro_batch_rows) + 1;
    // The janitor returns the pooled memory of every group's device and the buffers of
    // its host replicas (`backend: both` has a GPU's group and the CPU's).
    let janitor_models: Vec<_> = groups.iter().map(|g| g.0.clone()).collect();
    let embedder = EmbedderWorkers::start(groups, queue_jobs)?;

    let m = &settings.memory;
    if let Err(e) = allocator::configure(m.background_thread, m.dirty_decay_ms, m.muzzy_decay_ms) {
        // Not jemalloc (a library user's own allocator): figures stay, purges are no-ops.
        tracing::warn!(error = %e, "could not configure the allocator");
    }

    let (datasets, sink_thread) = Datasets::open(
        &settings.storage.data_dir,
        settings.storage.queue_depth,
        settings.storage.counted_parts,
        settings.storage.index.clone(),
        Some(model_identity),
    )
    .with_context(|| {
        format!(
            "opening storage.data_dir {}",
            settings.storage.data_dir.display()
        )
    })?;

    // The actix system on its own thread; its actors are created inside it.
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    let cache_cfg = settings.cache.clone();
    let supervisor_cfg = settings.supervisor.clone();
    let memory_cfg = settings.memory.clone();
    let counters = Arc::new(IngestCounters::default());
    let cache_bytes = Arc::new(AtomicU64::new(0));
    let probe = Box::new(
        ProcessProbe::new(counters.clone(), cache_bytes.clone())
            .with_device(model.device().clone()),
    );
    let pressure = Arc::new(AtomicBool::new(false));
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
                members.push(EmbedderJanitor::new(janitor_models).start().recipient());
                let supervisor = SupervisorActor::new(
                    supervisor_cfg,
                    memory_cfg,
                    probe,
                    members,
                    supervisor_pressure,
                )
                .start();
                let _ = addrs_tx.send((cache, supervisor, actix::System::current()));
            });
            let _ = system.run();
        })
        .context("starting the actor thread")?;
    let (cache, supervisor, actix) = addrs_rx.recv().context("the actor system did not start")?;

    let shared = keel_engine::cache::shared::SharedCache::new(&settings.cache.shared)
        .map_err(anyhow::Error::msg)?;
    if let Some(url) = &settings.cache.shared.url {
        tracing::info!(url = %redacted(url), "second-level cache in Redis");
    }
    let pipeline = Arc::new(
        Pipeline::new(
            settings.ingest.clone(),
            cache.clone(),
            embedder.handle(),
            key_settings,
            counters,
            pressure,
        )
        .with_shared_cache(shared),
    );
    let engine = Arc::new(ServerState::new(
        settings, backend, pipeline, cache, supervisor, datasets,
    ));
    Ok(Running {
        engine,
        auth,
        embedder,
        sink_thread,
        actix,
        actix_thread,
        http: None,
    })
}

impl Running {
    /// Also serves the HTTP front (OpenAI's embeddings API, TEI's `/embed`) on `listener`,
    /// over TLS with Flight's certificate where `server.tls` is set.
    pub fn with_http(mut self, listener: tokio::net::TcpListener) -> Self {
        self.http = Some(listener);
        self
    }

    /// Serves Flight on `listener` until `shutdown` resolves, then drains: no new streams,
    /// open streams get `server.shutdown_grace_ms` to finish, then everything stops.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        metrics: Option<tokio::net::TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let engine = self.engine.clone();
        let metrics_task = metrics.map(|l| tokio::spawn(crate::metrics::serve(l, engine.clone())));
        let service = FlightServiceServer::new(KeelFlight::new(engine.clone(), self.auth.clone()))
            .max_decoding_message_size(engine.settings.server.max_message_bytes)
            .max_encoding_message_size(engine.settings.server.max_message_bytes);
        // Nagle's algorithm off on every accepted socket: tonic sets TCP_NODELAY only on
        // sockets it accepts itself, and an answer written in more than one piece would
        // otherwise wait ~40 ms for the peer's delayed ACK.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |socket| {
                socket.inspect(|s| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted socket");
                    }
                })
            },
        );
        let grace = std::time::Duration::from_millis(engine.settings.server.shutdown_grace_ms);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // Fired a grace period after the server stopped accepting: connections still open
        // then (a client holding a stream open and silent) are dropped, not waited for.
        let (drop_tx, drop_rx) = tokio::sync::oneshot::channel::<()>();
        // The HTTP front drains with Flight (its /health says 503 meanwhile), then stops.
        let (http_stop, mut http_stopping) = tokio::sync::watch::channel(false);
        let http_task = self.http.take().map(|l| {
            let stopped = async move {
                let _ = http_stopping.wait_for(|&stop| stop).await;
            };
            tokio::spawn(crate::http::serve(
                l,
                engine.clone(),
                self.auth.clone(),
                stopped,
            ))
        });
        // The standard gRPC health service (grpc.health.v1) on the same port, for
        // Kubernetes' gRPC probes: SERVING once the model is loaded and warm, NOT_SERVING
        // before and while draining. It needs no credentials (probes carry none).
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        let warming_engine = engine.clone();
        let warm_reporter = health.clone();
        tokio::spawn(async move {
            warming_engine.pipeline.embedder().warm().await;
            if !warming_engine.is_closing() {
                set_health(&warm_reporter, ServingStatus::Serving).await;
                // A SIGTERM that came in between wins.
                if warming_engine.is_closing() {
                    set_health(&warm_reporter, ServingStatus::NotServing).await;
                }
            }
        });
        let closing_engine = engine.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: no new streams");
            closing_engine.close();
            set_health(&health, ServingStatus::NotServing).await;
            // Give open streams their grace period, then stop the server.
            let _ = tokio::time::timeout(grace, closing_engine.streams_ended()).await;
            let _ = http_stop.send(true);
            let _ = stop_tx.send(());
            tokio::time::sleep(grace).await;
            let _ = drop_tx.send(());
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
        let serving = builder
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tokio::select! {
            served = serving => served.context("the Flight server failed")?,
            Ok(()) = drop_rx => tracing::warn!(
                "Flight connections still open {} ms after the server stopped accepting \
                 (server.shutdown_grace_ms); dropped",
                grace.as_millis()
            ),
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = http_task {
            match t.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP front failed"),
                Err(e) => tracing::warn!(error = %e, "the HTTP front's task failed"),
                Ok(Ok(())) => {}
            }
        }
        // Stopping joins threads: do it off the async workers.
        tokio::task::spawn_blocking(move || self.stop())
            .await
            .context("stopping the engine")?;
        Ok(())
    }

    /// Stops in reverse order of start: ingest, embedder, sink, actors.
    fn stop(self) {
        let Running {
            engine,
            auth: _,
            embedder,
            sink_thread,
            actix,
            actix_thread,
            http: _,
        } = self;
        engine.pipeline.close();
        embedder.shutdown(std::time::Duration::from_secs(5));
        engine.datasets.stop();
        let _ = sink_thread.join();
        drop(engine);
        actix.stop();
        let _ = actix_thread.join();
        tracing::info!("stopped");
    }
}

/// The whole server's status (service "") and the Flight service's, together.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <FlightServiceServer<KeelFlight> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}
