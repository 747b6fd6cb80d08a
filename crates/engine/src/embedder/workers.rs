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
//! The model runs inside `catch_unwind`: a bug on one input fails that pass's jobs with
//! an error, and the worker goes on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use keel_model::{BatchLimits, DeviceMemory, ModelDevice, ModelError, SentenceModel, run_planned};
use serde::{Deserialize, Serialize};

use super::config::EmbedderConfig;

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

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<f32>, EmbedError>>,
}

enum Work {
    Job(Job),
    /// One worker finishes its current jobs and exits.
    Stop,
}

/// Counters of the embedder, read by `stats`.
#[derive(Default)]
struct EmbedderCounters {
    jobs: AtomicU64,
    rows: AtomicU64,
    passes: AtomicU64,
    tokens: AtomicU64,
    busy_micros: AtomicU64,
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
    /// The device the model runs on: `host`, or the GPU adapter.
    pub device: String,
    /// The device memory pool (GPU backends); `None` on the host.
    pub device_memory: Option<DeviceMemory>,
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
    device: ModelDevice,
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
            device: self.device.adapter.clone(),
            device_memory: self.device.memory(),
        }
    }
}

/// The running embedder: its worker threads and the handle that feeds them.
pub struct EmbedderWorkers {
    handle: EmbedderHandle,
    threads: Vec<JoinHandle<()>>,
}

impl EmbedderWorkers {
    /// Starts `cfg.effective_workers()` replicas of `model`. `queue_jobs` bounds the queue.
    pub fn start(
        model: SentenceModel,
        cfg: &EmbedderConfig,
        queue_jobs: usize,
    ) -> Result<Self, StartError> {
        let (tx, rx) = mpsc::channel::<Work>(queue_jobs.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let counters = Arc::new(EmbedderCounters::default());
        let workers = cfg.effective_workers();
        let limits = cfg.limits();
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let replica = Replica::new(model.clone(), cfg.threads_per_worker)?;
            let rx = rx.clone();
            let counters = counters.clone();
            let thread = std::thread::Builder::new()
                .name(format!("keel-embedder-{i}"))
                .spawn(move || worker(replica, rx, limits, workers, counters))
                .map_err(|e| StartError(e.to_string()))?;
            threads.push(thread);
        }
        Ok(Self {
            handle: EmbedderHandle {
                tx,
                dim: model.dim(),
                model_id: model.model_id().into(),
                counters,
                workers,
                device: model.device().clone(),
            },
            threads,
        })
    }

    pub fn handle(&self) -> EmbedderHandle {
        self.handle.clone()
    }

    /// Tells every worker to stop after the jobs queued so far, and waits for them at
    /// most `wait` (then leaves them to the process's exit).
    pub fn shutdown(self, wait: std::time::Duration) {
        for _ in 0..self.threads.len() {
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

fn worker(
    replica: Replica,
    rx: Arc<Mutex<mpsc::Receiver<Work>>>,
    limits: BatchLimits,
    workers: usize,
    counters: Arc<EmbedderCounters>,
) {
    let model = replica.model.clone();
    let dim = model.dim();
    let mut stopping = false;
    while !stopping {
        let mut jobs = Vec::new();
        {
            // One worker waits at a time; the others are computing.
            let Ok(mut rx) = rx.lock() else { return };
            match rx.blocking_recv() {
                Some(Work::Job(job)) => jobs.push(job),
                Some(Work::Stop) | None => return,
            }
            // A fair share of what is queued, so that a deep queue (`keel embed` sends a
            // whole chunk at once) is split between the workers rather than left to the
            // first one while the others idle at the end.
            let share = rx.len().div_ceil(workers.max(1));
            let mut rows = jobs[0].texts.len();
            while rows < limits.max_rows * DRAIN_PASSES && jobs.len() <= share {
                match rx.try_recv() {
                    Ok(Work::Job(job)) => {
                        rows += job.texts.len();
                        jobs.push(job);
                    }
                    Ok(Work::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let started = std::time::Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_jobs(&replica, &model, &jobs, limits)
        }));
        let outcome = match result {
            Ok(Ok((vectors, passes, tokens))) => {
                counters.passes.fetch_add(passes, Ordering::Relaxed);
                counters.tokens.fetch_add(tokens, Ordering::Relaxed);
                Ok(vectors)
            }
            Ok(Err(e)) => Err(EmbedError::Failed(e.to_string())),
            Err(_) => Err(EmbedError::Failed(
                "the model panicked on this batch".into(),
            )),
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
}

/// Vectors of every job's texts, concatenated in job order.
fn run_jobs(
    replica: &Replica,
    model: &SentenceModel,
    jobs: &[Job],
    limits: BatchLimits,
) -> Result<(Vec<f32>, u64, u64), ModelError> {
    let texts: Vec<&str> = jobs
        .iter()
        .flat_map(|j| j.texts.iter().map(String::as_str))
        .collect();
    let tokens = texts
        .iter()
        .map(|t| model.tokenize(t))
        .collect::<Result<Vec<_>, _>>()?;
    let token_count = tokens.iter().map(Vec::len).sum::<usize>() as u64;
    let (out, passes) = run_planned(&tokens, model.dim(), limits, |rows| {
        let started = std::time::Instant::now();
        let vectors = replica.embed_tokens(rows);
        metrics::histogram!("keel_embed_pass_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("keel_embed_pass_rows").record(rows.len() as f64);
        vectors
    });
    Ok((out, passes as u64, token_count))
}
