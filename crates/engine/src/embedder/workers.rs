//! The embedder workers: model replicas on dedicated threads behind one bounded queue.
//!
//! One [`Replica`] is a [`SentenceModel`] (weights shared with the others) plus a private
//! rayon pool of `threads_per_worker` threads. burn's CPU kernels parallelise through the
//! rayon pool they are called from, so each replica's passes stay on its own threads and
//! replicas never contend for one global pool. Measured on two cores: two one-thread
//! replicas beat one two-thread replica (docs/BENCHMARKS.md).
//!
//! The embedder is the engine's worker-actor pool, in the pattern of actix's `SyncArbiter`
//! for CPU-bound work: its mailbox is one `crossbeam-channel` MPMC queue of [`Job`]s
//! (typed messages: the texts of one micro-batch and where to send their vectors), read by
//! every worker. Async callers ([`EmbedderHandle::embed`]) take one of the queue's places
//! (a semaphore of `queue_jobs` permits, so a full queue makes the caller wait: the queue
//! is a bound, not a buffer), send the job and await a oneshot reply. Each worker takes a
//! job, then drains whatever else is queued, up to `max_batch_rows` rows: micro-batches
//! from any streams merge into the same forward passes (dynamic batching), planned by
//! token length so that padding stays near zero. Each job gets its own vectors back, in
//! its row order.
//!
//! Requests of few rows (`ingest.fast_lane_rows`: a single query, a search) go on a second
//! queue, the fast lane, read first: a worker takes fast jobs before bulk ones, and a CPU
//! worker looks at the fast lane between the passes of a batch, so a query waits at most
//! for the pass in progress, not behind the bulk jobs queued before it.
//!
//! A job whose requester is gone (a client that cancelled its stream drops the task that
//! awaited the reply) is skipped before it is tokenized, and a pass whose rows all belong
//! to such jobs is not run: a departed client costs at most the passes already on a
//! worker. Both count in `stats.embedder.dropped_jobs`. Workers stop by `select!` on a
//! closing channel: [`EmbedderWorkers::shutdown`] closes it, and each worker finishes the
//! jobs already queued, then exits.
//!
//! `keel embed` uses the same workers through [`EmbedderHandle::embed_blocking`]: its
//! texts, sorted by length, go in as jobs of `max_batch_rows`, so the command and the
//! server share one scheduler.
//!
//! A GPU worker is two threads: a feeder that takes jobs, tokenizes them in parallel on
//! a pool of host threads and plans the passes, and the device thread that runs them. A
//! bounded hand-over of [`PIPELINE_DEPTH`] planned batches sits between the two, so the
//! device never waits on the tokenizer while work is queued. Passes on the GPU are padded
//! to sequence-length buckets (`keel_model::LENGTH_BUCKETS`), and the device thread first
//! runs one pass of every shape (`embedder.gpu.warm_up`), so kernel compilation and
//! autotuning happen before the first request: [`EmbedderHandle::warming`] says whether
//! that is still going on. CPU workers and GPU workers can serve one queue side by side
//! (`embedder.backend: both`).
//!
//! The model runs inside `catch_unwind`: a bug on one input fails that pass's jobs with
//! an error, and the worker goes on.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, select};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use keel_model::{
    BatchLimits, DeviceMemory, ModelDevice, ModelError, SentenceModel, TextTokenizer,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::WorkerGroup;

/// Why a job got no vectors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    #[error("the embedder is shut down")]
    Closed,
    #[error("embedding failed: {0}")]
    Failed(String),
}

/// The operating system refused a worker thread or its rayon pool.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the embedder's threads: {0}")]
pub struct StartError(String);

/// A worker drains up to this many passes' worth of rows before planning: sorting a
/// larger pool by length leaves less padding in each pass (measured: see
/// docs/BENCHMARKS.md, "keel serve").
const DRAIN_PASSES: usize = 4;

/// Planned batches a GPU worker's feeder may hold ready ahead of its device.
pub const PIPELINE_DEPTH: usize = 2;

/// The embedder's message: one micro-batch's texts and where their vectors go.
struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<f32>, EmbedError>>,
}

impl Job {
    /// Whether whoever asked for this job has gone (its reply would reach no one).
    fn departed(&self) -> bool {
        self.reply.is_closed()
    }
}

/// A job in the queue, holding its place (given back when a worker takes it).
struct Queued {
    job: Job,
    _place: OwnedSemaphorePermit,
}

/// Which queue a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Micro-batches of streams: taken in arrival order, batched into passes.
    Bulk,
    /// Requests of few rows: taken before any bulk job, and between the passes of a batch.
    Fast,
}

/// What every worker reads: the two queues, and the channel whose closing stops them.
#[derive(Clone)]
struct Mailbox {
    jobs: Receiver<Queued>,
    fast: Receiver<Queued>,
    /// Never sent on: [`EmbedderWorkers::shutdown`] drops its sender.
    closing: Receiver<()>,
}

/// Token ids per row (rows of every job, in job order) and the passes (row indices).
struct Tokenized {
    rows: Vec<Vec<u32>>,
    passes: Vec<Vec<usize>>,
}

/// Jobs taken together, tokenized and planned into passes (or why they could not be).
struct Planned {
    jobs: Vec<Job>,
    tokens: Result<Tokenized, ModelError>,
}

/// Counters of the embedder, read by `stats`.
#[derive(Default)]
struct EmbedderCounters {
    jobs: AtomicU64,
    /// Jobs that came through the fast lane.
    fast_jobs: AtomicU64,
    /// Jobs whose requester had gone before their vectors were computed.
    dropped_jobs: AtomicU64,
    rows: AtomicU64,
    passes: AtomicU64,
    tokens: AtomicU64,
    busy_micros: AtomicU64,
    /// Workers whose device is still running its warm-up passes.
    warming: Warming,
    warm_up_passes: AtomicU64,
    warm_up_micros: AtomicU64,
}

/// How many workers are still warming up, watched by whoever waits for them.
struct Warming(watch::Sender<usize>);

impl Default for Warming {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl Warming {
    fn count(&self) -> usize {
        *self.0.borrow()
    }
}

/// The embedder's figures in `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbedderStats {
    pub workers: usize,
    pub jobs: u64,
    /// Jobs that came through the fast lane (requests of at most `ingest.fast_lane_rows`).
    #[serde(default)]
    pub fast_jobs: u64,
    /// Jobs skipped (before tokenizing, or pass by pass) because whoever asked for them
    /// had gone: a client that cancelled its stream.
    #[serde(default)]
    pub dropped_jobs: u64,
    /// Rows through forward passes.
    pub rows: u64,
    pub passes: u64,
    pub tokens: u64,
    pub busy_ms: u64,
    pub queue_capacity: usize,
    pub queued_jobs: usize,
    /// The devices the model runs on: `host`, the GPU adapter, or both (`; `-separated).
    pub device: String,
    /// The backend that runs (`cpu`, `wgpu`, `vulkan`, `both`); with `backend: auto`,
    /// what it picked.
    #[serde(default)]
    pub backend: String,
    /// Why that backend: "configured", or what `backend: auto` found (the adapter and
    /// what it offers, or why each faster backend was passed over).
    #[serde(default)]
    pub backend_why: String,
    /// The device memory pool (GPU backends); `None` on the host.
    pub device_memory: Option<DeviceMemory>,
    /// Whether a GPU worker is still compiling its kernels (start-up warm-up).
    #[serde(default)]
    pub warming: bool,
    /// Warm-up passes run so far, and the longest time a worker's warm-up took.
    #[serde(default)]
    pub warm_up_passes: u64,
    #[serde(default)]
    pub warm_up_ms: u64,
}

/// A model replica and the threads it computes on.
struct Replica {
    model: SentenceModel,
    threads: rayon::ThreadPool,
}

impl Replica {
    fn new(model: SentenceModel, threads: usize) -> Result<Self, StartError> {
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("keel-embed-{i}"))
            .build()
            .map_err(|e| StartError(e.to_string()))?;
        Ok(Self { model, threads })
    }

    /// One forward pass on this replica's threads.
    fn embed_tokens(&self, rows: &[&[u32]]) -> Vec<f32> {
        self.threads.install(|| self.model.embed_tokens(rows))
    }
}

/// Sends work to the embedder. Cheap to clone.
#[derive(Clone)]
pub struct EmbedderHandle {
    tx: Sender<Queued>,
    fast_tx: Sender<Queued>,
    /// The queue's places: a job takes one before it is sent.
    places: Arc<Semaphore>,
    /// The fast lane's places, apart: bulk jobs never hold up a query's place.
    fast_places: Arc<Semaphore>,
    capacity: usize,
    dim: usize,
    model_id: Arc<str>,
    /// The model's tokenizer, for token counts outside the workers (the HTTP front).
    tokenizer: TextTokenizer,
    counters: Arc<EmbedderCounters>,
    workers: usize,
    devices: Arc<[ModelDevice]>,
}

impl EmbedderHandle {
    /// Vectors of `texts`, `texts.len() × dim` values in order (the bulk lane).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<f32>, EmbedError> {
        self.embed_in(Lane::Bulk, texts).await
    }

    /// Vectors of `texts` through `lane`.
    pub async fn embed_in(&self, lane: Lane, texts: Vec<String>) -> Result<Vec<f32>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let places = match lane {
            Lane::Bulk => &self.places,
            Lane::Fast => &self.fast_places,
        };
        let place = places
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EmbedError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.send(lane, Job { texts, reply }, place)?;
        rx.await.map_err(|_| EmbedError::Closed)?
    }

    /// Puts a job that holds its place on its queue (never waits: the places bound it).
    fn send(&self, lane: Lane, job: Job, place: OwnedSemaphorePermit) -> Result<(), EmbedError> {
        let tx = match lane {
            Lane::Bulk => &self.tx,
            Lane::Fast => {
                self.counters.fast_jobs.fetch_add(1, Ordering::Relaxed);
                &self.fast_tx
            }
        };
        tx.send(Queued { job, _place: place })
            .map_err(|_| EmbedError::Closed)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The model's tokenizer (shared with the workers).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// While a GPU worker is still running its start-up warm-up (compiling and autotuning
    /// kernels): how far it got. `None` once every worker is warm.
    pub fn warming(&self) -> Option<String> {
        let c = &self.counters;
        let warming = c.warming.count();
        (warming > 0).then(|| {
            format!(
                "{warming} GPU worker(s) still compiling kernels ({} warm-up passes done)",
                c.warm_up_passes.load(Ordering::Relaxed)
            )
        })
    }

    /// Resolves once every worker is warm (at once for CPU workers and without warm-up).
    pub async fn warm(&self) {
        let mut warming = self.counters.warming.0.subscribe();
        // The sender lives as long as the counters this handle holds.
        let _ = warming.wait_for(|&n| n == 0).await;
    }

    /// Waits, on a thread outside any async runtime, until every worker is warm.
    pub fn wait_warm_blocking(&self) {
        futures::executor::block_on(self.warm());
    }

    /// Vectors of `texts` from a thread outside any async runtime (`keel embed`), in
    /// input order. The texts are sorted by length (longest first) and sent as jobs of
    /// `rows_per_job`, so each pass the workers plan holds texts of similar lengths.
    pub fn embed_blocking(
        &self,
        texts: &[&str],
        rows_per_job: usize,
    ) -> Result<Vec<f32>, EmbedError> {
        // Longest first: the last jobs, which may leave a worker idle, are the short ones.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut replies = Vec::new();
        for chunk in order.chunks(rows_per_job.max(1)) {
            let place = futures::executor::block_on(self.places.clone().acquire_owned())
                .map_err(|_| EmbedError::Closed)?;
            let (reply, rx) = oneshot::channel();
            let job = Job {
                texts: chunk.iter().map(|&i| texts[i].to_string()).collect(),
                reply,
            };
            self.send(Lane::Bulk, job, place)?;
            replies.push((chunk, rx));
        }
        let dim = self.dim;
        let mut out = vec![0.0f32; texts.len() * dim];
        for (chunk, rx) in replies {
            let vectors = rx.blocking_recv().map_err(|_| EmbedError::Closed)??;
            for (&i, v) in chunk.iter().zip(vectors.chunks_exact(dim)) {
                out[i * dim..(i + 1) * dim].copy_from_slice(v);
            }
        }
        Ok(out)
    }

    pub fn stats(&self) -> EmbedderStats {
        let c = &self.counters;
        EmbedderStats {
            workers: self.workers,
            jobs: c.jobs.load(Ordering::Relaxed),
            fast_jobs: c.fast_jobs.load(Ordering::Relaxed),
            dropped_jobs: c.dropped_jobs.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            passes: c.passes.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            busy_ms: c.busy_micros.load(Ordering::Relaxed) / 1000,
            queue_capacity: self.capacity,
            queued_jobs: self.tx.len() + self.fast_tx.len(),
            device: self
                .devices
                .iter()
                .map(|d| d.adapter.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            device_memory: self.devices.iter().find_map(ModelDevice::memory),
            backend: {
                let mut names: Vec<&str> = self.devices.iter().map(|d| d.backend.name()).collect();
                names.dedup();
                names.join("+")
            },
            backend_why: String::new(),
            warming: c.warming.count() > 0,
            warm_up_passes: c.warm_up_passes.load(Ordering::Relaxed),
            warm_up_ms: c.warm_up_micros.load(Ordering::Relaxed) / 1000,
        }
    }
}

/// The running embedder: its worker threads and the handle that feeds them.
pub struct EmbedderWorkers {
    handle: EmbedderHandle,
    /// Dropped by `shutdown`: the workers' `closing` channel closes.
    closing: Sender<()>,
    /// The queues, for answering what is left in them once the workers are gone.
    jobs: Receiver<Queued>,
    fast: Receiver<Queued>,
    threads: Vec<JoinHandle<()>>,
}

/// What every worker thread shares.
#[derive(Clone)]
struct Shared {
    mailbox: Mailbox,
    counters: Arc<EmbedderCounters>,
    /// Workers across all groups: the fair share of a deep queue.
    workers: usize,
}

impl EmbedderWorkers {
    /// Starts every group's workers on its model (loaded on the group's device), all
    /// taking jobs from one queue of at most `queue_jobs`.
    pub fn start(
        groups: Vec<(SentenceModel, WorkerGroup)>,
        queue_jobs: usize,
    ) -> Result<Self, StartError> {
        let Some((first, _)) = groups.first() else {
            return Err(StartError("no embedder workers configured".into()));
        };
        let (dim, model_id) = (first.dim(), Arc::<str>::from(first.model_id()));
        let tokenizer = first.tokenizer().clone();
        let capacity = queue_jobs.max(1);
        let (tx, jobs) = crossbeam_channel::unbounded::<Queued>();
        let (fast_tx, fast) = crossbeam_channel::unbounded::<Queued>();
        let (closing_tx, closing) = crossbeam_channel::bounded::<()>(0);
        let workers: usize = groups.iter().map(|(_, g)| g.workers).sum();
        let shared = Shared {
            mailbox: Mailbox {
                jobs: jobs.clone(),
                fast: fast.clone(),
                closing,
            },
            counters: Arc::new(EmbedderCounters::default()),
            workers,
        };
        let mut threads = Vec::new();
        let mut devices = Vec::new();
        for (model, group) in groups {
            devices.push(model.device().clone());
            match group.tokenizer_threads {
                None => {
                    for _ in 0..group.workers {
                        let replica = Replica::new(model.clone(), group.threads_per_worker)?;
                        let (shared, limits) = (shared.clone(), group.limits);
                        threads.push(spawn(
                            format!("keel-embedder-{}", threads.len()),
                            move || inline_worker(replica, shared, limits),
                        )?);
                    }
                }
                Some(tokenizer_threads) => {
                    let tokenizers = Arc::new(
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(tokenizer_threads.max(1))
                            .thread_name(|i| format!("keel-tokenize-{i}"))
                            .build()
                            .map_err(|e| StartError(e.to_string()))?,
                    );
                    for _ in 0..group.workers {
                        threads.extend(start_pipelined(
                            Replica::new(model.clone(), group.threads_per_worker)?,
                            &group,
                            shared.clone(),
                            tokenizers.clone(),
                            threads.len(),
                        )?);
                    }
                }
            }
        }
        Ok(Self {
            handle: EmbedderHandle {
                tx,
                fast_tx,
                places: Arc::new(Semaphore::new(capacity)),
                fast_places: Arc::new(Semaphore::new(capacity)),
                capacity,
                dim,
                model_id,
                tokenizer,
                counters: shared.counters,
                workers,
                devices: devices.into(),
            },
            closing: closing_tx,
            jobs,
            fast,
            threads,
        })
    }

    pub fn handle(&self) -> EmbedderHandle {
        self.handle.clone()
    }

    /// Refuses new jobs, tells every worker to stop after the jobs queued so far, and
    /// waits for them at most `wait` (then leaves them to the process's exit).
    pub fn shutdown(self, wait: std::time::Duration) {
        let Self {
            handle,
            closing,
            jobs,
            fast,
            threads,
        } = self;
        handle.places.close();
        handle.fast_places.close();
        drop(closing);
        drop(handle);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        std::thread::spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(wait).is_err() {
            tracing::warn!("embedder workers still busy at shutdown; not waiting longer");
            return;
        }
        // A job sent as the last worker left gets an answer rather than none.
        for queued in fast.try_iter().chain(jobs.try_iter()) {
            let _ = queued.job.reply.send(Err(EmbedError::Closed));
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| StartError(e.to_string()))
}

/// A CPU worker: takes jobs, tokenizes them, runs the passes, replies; one thread.
fn inline_worker(replica: Replica, shared: Shared, limits: BatchLimits) {
    while let Some(jobs) = take_jobs(&shared, limits) {
        if !jobs.is_empty() {
            let planned = plan_jobs(&replica.model, jobs, limits, None);
            let fast_lane = FastLane {
                shared: &shared,
                limits,
            };
            compute(&replica, planned, &shared.counters, Some(fast_lane));
        }
    }
}

/// A GPU worker: the device thread (warm-up first, then the passes it is handed) and its
/// feeder (takes jobs once the device is warm, tokenizes on `tokenizers`, plans).
fn start_pipelined(
    replica: Replica,
    group: &WorkerGroup,
    shared: Shared,
    tokenizers: Arc<rayon::ThreadPool>,
    index: usize,
) -> Result<[JoinHandle<()>; 2], StartError> {
    let (planned_tx, planned_rx) = std::sync::mpsc::sync_channel::<Planned>(PIPELINE_DEPTH);
    let (warm_tx, warm_rx) = std::sync::mpsc::channel::<()>();
    let (limits, warm_up) = (group.limits, group.warm_up);
    let model = replica.model.clone();
    let counters = shared.counters.clone();
    if warm_up {
        counters.warming.0.send_modify(|n| *n += 1);
    }
    let device = spawn(format!("keel-device-{index}"), move || {
        if warm_up {
            let started = std::time::Instant::now();
            let passes = std::panic::catch_unwind(AssertUnwindSafe(|| {
                replica.threads.install(|| replica.model.warm_up(limits))
            }));
            let elapsed = started.elapsed();
            match passes {
                Ok(passes) => {
                    counters
                        .warm_up_passes
                        .fetch_add(passes as u64, Ordering::Relaxed);
                    tracing::info!(
                        passes,
                        seconds = elapsed.as_secs_f64(),
                        device = %replica.model.device().adapter,
                        "GPU warm-up done: kernels compiled for every pass shape"
                    );
                }
                Err(_) => tracing::error!("GPU warm-up panicked; serving cold"),
            }
            counters
                .warm_up_micros
                .fetch_max(elapsed.as_micros() as u64, Ordering::Relaxed);
            counters.warming.0.send_modify(|n| *n -= 1);
        }
        let _ = warm_tx.send(());
        for planned in planned_rx {
            compute(&replica, planned, &counters, None);
        }
    })?;
    let feeder = spawn(format!("keel-feeder-{index}"), move || {
        // Jobs wait in the queue (for other workers to take) until this device is warm.
        if warm_rx.recv().is_err() {
            return;
        }
        while let Some(jobs) = take_jobs(&shared, limits) {
            if !jobs.is_empty() {
                let planned = plan_jobs(&model, jobs, limits, Some(&tokenizers));
                if planned_tx.send(planned).is_err() {
                    return;
                }
            }
        }
    })?;
    Ok([feeder, device])
}

/// Waits for a job, then drains what else is queued, up to [`DRAIN_PASSES`] passes' worth
/// of rows and a fair share of the queue; jobs whose requester has gone are dropped here,
/// before they are tokenized. `None` once the embedder is closing and the queue is empty.
fn take_jobs(shared: &Shared, limits: BatchLimits) -> Option<Vec<Job>> {
    let Mailbox {
        jobs: queue,
        fast,
        closing,
    } = &shared.mailbox;
    // The fast lane first; then whichever queue has work (a disconnected queue reads as
    // closing). Closing: finish what is queued, then stop.
    let either = || {
        fast.try_recv()
            .map(|q| (q, Lane::Fast))
            .or_else(|_| queue.try_recv().map(|q| (q, Lane::Bulk)))
            .ok()
    };
    let (first, lane) = match fast.try_recv() {
        Ok(queued) => (queued, Lane::Fast),
        Err(_) => select! {
            recv(fast) -> queued => queued.ok().map(|q| (q, Lane::Fast)).or_else(either),
            recv(queue) -> queued => queued.ok().map(|q| (q, Lane::Bulk)).or_else(either),
            recv(closing) -> _ => either(),
        }?,
    };
    let mut jobs = vec![first.job];
    let mut rows = jobs[0].texts.len();
    // Every fast job waiting goes in this batch (a few rows each).
    while rows < limits.max_rows * DRAIN_PASSES {
        let Ok(queued) = fast.try_recv() else {
            break;
        };
        rows += queued.job.texts.len();
        jobs.push(queued.job);
    }
    // A batch of fast jobs is theirs alone: a batch answers its jobs when its last pass
    // is done, so bulk rows beside them would hold the queries for the whole batch.
    // A fair share of what is queued, so that a deep queue (`keel embed` sends a whole
    // chunk at once) is split between the workers rather than left to the first one
    // while the others idle at the end: half of an equal split, so that the batches
    // shrink as the queue does (guided scheduling) and the last ones, which may leave a
    // worker waiting for another, are small. An equal split let the first worker take
    // half of a chunk of long texts while the other finished the short half early.
    let share = match lane {
        Lane::Fast => 0,
        Lane::Bulk => queue.len().div_ceil(2 * shared.workers.max(1)),
    };
    while rows < limits.max_rows * DRAIN_PASSES && jobs.len() <= share {
        let Ok(queued) = queue.try_recv() else {
            break;
        };
        rows += queued.job.texts.len();
        jobs.push(queued.job);
    }
    let taken = jobs.len();
    jobs.retain(|job| !job.departed());
    shared
        .counters
        .dropped_jobs
        .fetch_add((taken - jobs.len()) as u64, Ordering::Relaxed);
    Some(jobs)
}

/// Tokenizes every job's texts (in parallel on `tokenizers`, else on this thread) and
/// plans the passes.
fn plan_jobs(
    model: &SentenceModel,
    jobs: Vec<Job>,
    limits: BatchLimits,
    tokenizers: Option<&rayon::ThreadPool>,
) -> Planned {
    let texts: Vec<&str> = jobs
        .iter()
        .flat_map(|j| j.texts.iter().map(String::as_str))
        .collect();
    let tokenize = || -> Result<Vec<Vec<u32>>, ModelError> {
        match tokenizers {
            Some(pool) => pool.install(|| texts.par_iter().map(|t| model.tokenize(t)).collect()),
            None => texts.iter().map(|t| model.tokenize(t)).collect(),
        }
    };
    let tokens = std::panic::catch_unwind(AssertUnwindSafe(tokenize))
        .unwrap_or_else(|_| Err(ModelError::Encode("the tokenizer panicked".into())))
        .map(|rows| {
            let passes = model.plan(&rows, limits);
            Tokenized { rows, passes }
        });
    Planned { jobs, tokens }
}

/// Where a CPU worker looks between passes for jobs that may not wait for the batch.
#[derive(Clone, Copy)]
struct FastLane<'a> {
    shared: &'a Shared,
    limits: BatchLimits,
}

impl FastLane<'_> {
    /// Runs the fast jobs waiting now (a pass or so), replies to them, and says how long
    /// that took.
    fn serve(self, replica: &Replica) -> std::time::Duration {
        let started = std::time::Instant::now();
        let mut jobs = Vec::new();
        let mut rows = 0;
        while rows < self.limits.max_rows {
            let Ok(queued) = self.shared.mailbox.fast.try_recv() else {
                break;
            };
            if queued.job.departed() {
                self.shared
                    .counters
                    .dropped_jobs
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            rows += queued.job.texts.len();
            jobs.push(queued.job);
        }
        if !jobs.is_empty() {
            let planned = plan_jobs(&replica.model, jobs, self.limits, None);
            compute(replica, planned, &self.shared.counters, None);
        }
        started.elapsed()
    }
}

/// Runs a planned batch's passes and replies to its jobs, each with its own vectors. A
/// pass whose rows all belong to jobs whose requesters have gone is not run. With a
/// `fast_lane`, the fast jobs waiting are served at each pass boundary.
fn compute(
    replica: &Replica,
    planned: Planned,
    counters: &EmbedderCounters,
    fast_lane: Option<FastLane<'_>>,
) {
    let Planned { jobs, tokens } = planned;
    let dim = replica.model.dim();
    let started = std::time::Instant::now();
    let mut served = std::time::Duration::ZERO;
    let outcome = match tokens {
        Err(e) => Err(EmbedError::Failed(e.to_string())),
        Ok(Tokenized { rows, passes }) => {
            // The job each row belongs to.
            let owner: Vec<usize> = jobs
                .iter()
                .enumerate()
                .flat_map(|(j, job)| std::iter::repeat_n(j, job.texts.len()))
                .collect();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut out = vec![0.0f32; rows.len() * dim];
                for (i, pass) in passes.iter().enumerate() {
                    if let Some(lane) = fast_lane.filter(|_| i > 0) {
                        // Counted as busy by the fast jobs' own batch.
                        served += lane.serve(replica);
                    }
                    if pass.iter().all(|&r| jobs[owner[r]].departed()) {
                        continue;
                    }
                    let tokens: Vec<&[u32]> = pass.iter().map(|&r| rows[r].as_slice()).collect();
                    let started = std::time::Instant::now();
                    let vectors = replica.embed_tokens(&tokens);
                    metrics::histogram!("keel_embed_pass_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("keel_embed_pass_rows").record(pass.len() as f64);
                    counters.passes.fetch_add(1, Ordering::Relaxed);
                    counters
                        .rows
                        .fetch_add(pass.len() as u64, Ordering::Relaxed);
                    let token_count = tokens.iter().map(|t| t.len()).sum::<usize>() as u64;
                    counters.tokens.fetch_add(token_count, Ordering::Relaxed);
                    for (&r, v) in pass.iter().zip(vectors.chunks_exact(dim)) {
                        out[r * dim..(r + 1) * dim].copy_from_slice(v);
                    }
                }
                out
            }));
            result.map_err(|_| EmbedError::Failed("the model panicked on this batch".into()))
        }
    };
    let busy = started.elapsed().saturating_sub(served);
    counters
        .busy_micros
        .fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
    match outcome {
        Ok(vectors) => {
            let mut offset = 0;
            for job in jobs {
                let n = job.texts.len();
                let counter = if job.departed() {
                    &counters.dropped_jobs
                } else {
                    &counters.jobs
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = job
                    .reply
                    .send(Ok(vectors[offset * dim..(offset + n) * dim].to_vec()));
                offset += n;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, jobs = jobs.len(), "embedding pass failed");
            counters
                .jobs
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deep bulk queue (what `keel embed` sends) is taken in shrinking batches: the
    /// first worker takes about half of an equal share, not all of it, and the batches
    /// get smaller as the queue drains, so the last ones, which may leave a worker
    /// waiting for another, are small; every job is taken exactly once.
    #[test]
    fn a_deep_queue_is_taken_in_shrinking_shares() {
        let (tx, jobs) = crossbeam_channel::unbounded();
        let (_fast_tx, fast) = crossbeam_channel::unbounded::<Queued>();
        let (_closing_tx, closing) = crossbeam_channel::unbounded::<()>();
        let places = Arc::new(Semaphore::new(64));
        let mut replies = Vec::new();
        for _ in 0..32 {
            let (reply, rx) = oneshot::channel();
            replies.push(rx);
            let job = Job {
                texts: vec!["a text".to_string(); 4],
                reply,
            };
            let place = places.clone().try_acquire_owned().unwrap();
            tx.send(Queued { job, _place: place }).unwrap();
        }
        drop(tx);
        let shared = Shared {
            mailbox: Mailbox {
                jobs,
                fast,
                closing,
            },
            counters: Arc::default(),
            workers: 2,
        };
        // Rows are no bound here: 32 jobs of 4 rows, 1 000 rows a pass.
        let limits = BatchLimits {
            max_rows: 1000,
            max_tokens: 100_000,
        };
        let mut sizes = Vec::new();
        while let Some(jobs) = take_jobs(&shared, limits) {
            sizes.push(jobs.len());
            if shared.mailbox.jobs.is_empty() {
                break;
            }
        }
        assert_eq!(sizes.iter().sum::<usize>(), 32, "{sizes:?}");
        // The first job, then a quarter of the 31 left (8: half of an equal share of two
        // workers; an equal share took 17 of the 32).
        assert_eq!(sizes[0], 9, "{sizes:?}");
        assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "{sizes:?}");
        assert!(*sizes.last().unwrap() <= 2, "{sizes:?}");
    }
}
