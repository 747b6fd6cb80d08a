//! The embedder workers: model replicas on dedicated threads behind one bounded queue.
//!
//! One [`Replica`] is a [`SentenceModel`] (weights shared with the others) plus a private
//! rayon pool of `threads_per_worker` threads. burn's CPU kernels parallelise through the
//! rayon pool they are called from, so each replica's passes stay on its own threads and
//! replicas never contend for one global pool. Measured on two cores: two one-thread
//! replicas beat one two-thread replica (docs/BENCHMARKS.md).
//!
//! Async callers ([`EmbedderHandle::embed`]) put a job — the texts of one micro-batch — on a
//! bounded tokio channel and await a oneshot reply; `send` waits when the queue is full,
//! so the queue is a bound, not a buffer. Each worker thread takes a job, then drains
//! whatever else is queued, up to `max_batch_rows` rows: micro-batches from any streams
//! merge into the same forward passes (dynamic batching), planned by token length so
//! that padding stays near zero. Each job gets its own vectors back, in its row order.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use keel_model::{BatchLimits, DeviceMemory, ModelDevice, ModelError, SentenceModel, run_planned};
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

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<f32>, EmbedError>>,
}

enum Work {
    Job(Job),
    /// One worker finishes its current jobs and exits.
    Stop,
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
    rows: AtomicU64,
    passes: AtomicU64,
    tokens: AtomicU64,
    busy_micros: AtomicU64,
    /// Workers whose device is still running its warm-up passes.
    warming: AtomicUsize,
    warm_up_passes: AtomicU64,
    warm_up_micros: AtomicU64,
}

/// The embedder's figures in `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbedderStats {
    pub workers: usize,
    pub jobs: u64,
    pub rows: u64,
    pub passes: u64,
    pub tokens: u64,
    pub busy_ms: u64,
    pub queue_capacity: usize,
    pub queued_jobs: usize,
    /// The devices the model runs on: `host`, the GPU adapter, or both (`; `-separated).
    pub device: String,
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
    tx: mpsc::Sender<Work>,
    dim: usize,
    model_id: Arc<str>,
    counters: Arc<EmbedderCounters>,
    workers: usize,
    devices: Arc<[ModelDevice]>,
}

impl EmbedderHandle {
    /// Vectors of `texts`, `texts.len() × dim` values in order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<f32>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Work::Job(Job { texts, reply }))
            .await
            .map_err(|_| EmbedError::Closed)?;
        rx.await.map_err(|_| EmbedError::Closed)?
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// While a GPU worker is still running its start-up warm-up (compiling and autotuning
    /// kernels): how far it got. `None` once every worker is warm.
    pub fn warming(&self) -> Option<String> {
        let c = &self.counters;
        let warming = c.warming.load(Ordering::Acquire);
        (warming > 0).then(|| {
            format!(
                "{warming} GPU worker(s) still compiling kernels ({} warm-up passes done)",
                c.warm_up_passes.load(Ordering::Relaxed)
            )
        })
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
            let (reply, rx) = oneshot::channel();
            let job = Job {
                texts: chunk.iter().map(|&i| texts[i].to_string()).collect(),
                reply,
            };
            self.tx
                .blocking_send(Work::Job(job))
                .map_err(|_| EmbedError::Closed)?;
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
            rows: c.rows.load(Ordering::Relaxed),
            passes: c.passes.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            busy_ms: c.busy_micros.load(Ordering::Relaxed) / 1000,
            queue_capacity: self.tx.max_capacity(),
            queued_jobs: self.tx.max_capacity() - self.tx.capacity(),
            device: self
                .devices
                .iter()
                .map(|d| d.adapter.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            device_memory: self.devices.iter().find_map(ModelDevice::memory),
            warming: c.warming.load(Ordering::Acquire) > 0,
            warm_up_passes: c.warm_up_passes.load(Ordering::Relaxed),
            warm_up_ms: c.warm_up_micros.load(Ordering::Relaxed) / 1000,
        }
    }
}

/// The running embedder: its worker threads and the handle that feeds them.
pub struct EmbedderWorkers {
    handle: EmbedderHandle,
    /// Threads that take work from the queue (one per worker); each stops at a `Stop`.
    takers: usize,
    threads: Vec<JoinHandle<()>>,
}

/// What every worker thread shares.
#[derive(Clone)]
struct Shared {
    rx: Arc<Mutex<mpsc::Receiver<Work>>>,
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
        let (tx, rx) = mpsc::channel::<Work>(queue_jobs.max(1));
        let workers: usize = groups.iter().map(|(_, g)| g.workers).sum();
        let shared = Shared {
            rx: Arc::new(Mutex::new(rx)),
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
                dim,
                model_id,
                counters: shared.counters,
                workers,
                devices: devices.into(),
            },
            takers: workers,
            threads,
        })
    }

    pub fn handle(&self) -> EmbedderHandle {
        self.handle.clone()
    }

    /// Tells every worker to stop after the jobs queued so far, and waits for them at
    /// most `wait` (then leaves them to the process's exit).
    pub fn shutdown(self, wait: std::time::Duration) {
        for _ in 0..self.takers {
            if self.handle.tx.blocking_send(Work::Stop).is_err() {
                break;
            }
        }
        drop(self.handle);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let threads = self.threads;
        std::thread::spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(wait).is_err() {
            tracing::warn!("embedder workers still busy at shutdown; not waiting longer");
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
    loop {
        let (jobs, stopping) = take_jobs(&shared, limits);
        if !jobs.is_empty() {
            let planned = plan_jobs(&replica.model, jobs, limits, None);
            compute(&replica, planned, &shared.counters);
        }
        if stopping {
            return;
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
        counters.warming.fetch_add(1, Ordering::AcqRel);
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
            counters.warming.fetch_sub(1, Ordering::AcqRel);
        }
        let _ = warm_tx.send(());
        for planned in planned_rx {
            compute(&replica, planned, &counters);
        }
    })?;
    let feeder = spawn(format!("keel-feeder-{index}"), move || {
        // Jobs wait in the queue (for other workers to take) until this device is warm.
        if warm_rx.recv().is_err() {
            return;
        }
        loop {
            let (jobs, stopping) = take_jobs(&shared, limits);
            if !jobs.is_empty() {
                let planned = plan_jobs(&model, jobs, limits, Some(&tokenizers));
                if planned_tx.send(planned).is_err() {
                    return;
                }
            }
            if stopping {
                return;
            }
        }
    })?;
    Ok([feeder, device])
}

/// Waits for a job, then drains what else is queued, up to [`DRAIN_PASSES`] passes' worth
/// of rows and a fair share of the queue. Returns the jobs and whether a `Stop` (or the
/// queue's end) was seen.
fn take_jobs(shared: &Shared, limits: BatchLimits) -> (Vec<Job>, bool) {
    let mut jobs = Vec::new();
    // One worker waits at a time; the others are computing.
    let Ok(mut rx) = shared.rx.lock() else {
        return (jobs, true);
    };
    match rx.blocking_recv() {
        Some(Work::Job(job)) => jobs.push(job),
        Some(Work::Stop) | None => return (jobs, true),
    }
    // A fair share of what is queued, so that a deep queue (`keel embed` sends a whole
    // chunk at once) is split between the workers rather than left to the first one
    // while the others idle at the end.
    let share = rx.len().div_ceil(shared.workers.max(1));
    let mut rows = jobs[0].texts.len();
    while rows < limits.max_rows * DRAIN_PASSES && jobs.len() <= share {
        match rx.try_recv() {
            Ok(Work::Job(job)) => {
                rows += job.texts.len();
                jobs.push(job);
            }
            Ok(Work::Stop) => return (jobs, true),
            Err(_) => break,
        }
    }
    (jobs, false)
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

/// Runs a planned batch's passes and replies to its jobs, each with its own vectors.
fn compute(replica: &Replica, planned: Planned, counters: &EmbedderCounters) {
    let Planned { jobs, tokens } = planned;
    let dim = replica.model.dim();
    let started = std::time::Instant::now();
    let outcome = match tokens {
        Err(e) => Err(EmbedError::Failed(e.to_string())),
        Ok(Tokenized {
            rows: tokens,
            passes,
        }) => {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run_planned(&tokens, &passes, dim, |rows| {
                    let started = std::time::Instant::now();
                    let vectors = replica.embed_tokens(rows);
                    metrics::histogram!("keel_embed_pass_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("keel_embed_pass_rows").record(rows.len() as f64);
                    vectors
                })
            }));
            match result {
                Ok(vectors) => {
                    counters
                        .passes
                        .fetch_add(passes.len() as u64, Ordering::Relaxed);
                    let token_count = tokens.iter().map(Vec::len).sum::<usize>() as u64;
                    counters.tokens.fetch_add(token_count, Ordering::Relaxed);
                    Ok(vectors)
                }
                Err(_) => Err(EmbedError::Failed(
                    "the model panicked on this batch".into(),
                )),
            }
        }
    };
    counters
        .busy_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    counters
        .jobs
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    match outcome {
        Ok(vectors) => {
            let mut offset = 0;
            for job in jobs {
                let n = job.texts.len();
                counters.rows.fetch_add(n as u64, Ordering::Relaxed);
                let _ = job
                    .reply
                    .send(Ok(vectors[offset * dim..(offset + n) * dim].to_vec()));
                offset += n;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, jobs = jobs.len(), "embedding pass failed");
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}
