//! Model replicas on their own threads.
//!
//! One [`Replica`] is a [`SentenceModel`] (weights shared with the others) plus a private
//! rayon pool of `threads_per_worker` threads. burn's CPU kernels parallelise through the
//! rayon pool they are called from, so each replica's passes stay on its own threads and
//! replicas never contend for one global pool. Measured on two cores: two one-thread
//! replicas beat one two-thread replica (docs/BENCHMARKS.md).
//!
//! [`Replicas::embed`] is the batch path (`keel embed`): it tokenizes, plans passes by
//! length and lets every replica pull passes until none are left; results come back in
//! input order.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::model::{BatchLimits, ModelError, SentenceModel, plan};

/// A model replica and the threads it computes on.
pub struct Replica {
    model: SentenceModel,
    threads: rayon::ThreadPool,
}

impl Replica {
    pub fn new(model: SentenceModel, threads: usize) -> Result<Self, ModelError> {
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("keel-embed-{i}"))
            .build()
            .map_err(|e| ModelError::Encode(format!("cannot start embedder threads: {e}")))?;
        Ok(Self { model, threads })
    }

    pub fn model(&self) -> &SentenceModel {
        &self.model
    }

    /// One forward pass on this replica's threads.
    pub fn embed_tokens(&self, rows: &[&[u32]]) -> Vec<f32> {
        self.threads.install(|| self.model.embed_tokens(rows))
    }
}

/// Several replicas of one model.
pub struct Replicas {
    replicas: Vec<Replica>,
}

impl Replicas {
    /// `workers` replicas of `model`, each on `threads_per_worker` threads.
    pub fn new(
        model: SentenceModel,
        workers: usize,
        threads_per_worker: usize,
    ) -> Result<Self, ModelError> {
        let replicas = (0..workers.max(1))
            .map(|_| Replica::new(model.clone(), threads_per_worker))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { replicas })
    }

    pub fn model(&self) -> &SentenceModel {
        self.replicas[0].model()
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Vectors of `texts` in input order, `texts.len() × dim` values.
    pub fn embed(&self, texts: &[&str], limits: BatchLimits) -> Result<Vec<f32>, ModelError> {
        let model = self.model();
        let tokens = texts
            .iter()
            .map(|t| model.tokenize(t))
            .collect::<Result<Vec<_>, _>>()?;
        let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let passes = plan(&lengths, limits);
        let dim = model.dim();
        let out = Mutex::new(vec![0.0f32; texts.len() * dim]);
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for replica in &self.replicas {
                scope.spawn(|| {
                    loop {
                        let p = next.fetch_add(1, Ordering::Relaxed);
                        let Some(pass) = passes.get(p) else { break };
                        let rows: Vec<&[u32]> =
                            pass.iter().map(|&i| tokens[i].as_slice()).collect();
                        let vectors = replica.embed_tokens(&rows);
                        let mut out = out
                            .lock()
                            .expect("no replica panics while holding the lock");
                        for (&i, v) in pass.iter().zip(vectors.chunks_exact(dim)) {
                            out[i * dim..(i + 1) * dim].copy_from_slice(v);
                        }
                    }
                });
            }
        });
        Ok(out.into_inner().expect("all replicas have finished"))
    }
}
