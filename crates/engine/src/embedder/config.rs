//! Configuration of the embedder: which model, where it runs, how passes are sized.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use keel_model::{Backend, BatchLimits, DeviceOptions, ModelDevice, ModelError, SentenceModel};

/// `embedder:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedderConfig {
    /// A sentence-transformers model folder (config.json, model.safetensors, tokenizer.json,
    /// modules.json, 1_Pooling/). `scripts/fetch-model.sh` fills the default one.
    pub model_dir: PathBuf,
    /// Where the model runs: `cpu` (burn's flex backend) or `wgpu` (the GPU, through its
    /// Vulkan/Metal/DX12 driver; binaries built with the `gpu` feature, the default).
    pub backend: Backend,
    /// With `backend: wgpu`, accept a software adapter (Mesa's lavapipe) when no GPU is
    /// found. It runs the GPU code path on the CPU, far slower than `cpu`: for tests.
    pub allow_software_gpu: bool,
    /// Model replicas, each on its own threads; 0 = one per available core.
    pub workers: usize,
    /// rayon threads per replica. On a CPU, one per replica and one replica per core is
    /// fastest (measured); more threads per replica helps single-stream latency.
    pub threads_per_worker: usize,
    /// Most rows in one forward pass.
    pub max_batch_rows: usize,
    /// Most padded tokens (rows × longest row) in one forward pass. Bounds the memory of a
    /// pass: activations are about `max_batch_tokens × 4 × intermediate_size` bytes.
    pub max_batch_tokens: usize,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::from("models/all-MiniLM-L6-v2"),
            backend: Backend::Cpu,
            allow_software_gpu: false,
            workers: 0,
            threads_per_worker: 1,
            max_batch_rows: 64,
            max_batch_tokens: 8192,
        }
    }
}

/// A configuration value that cannot work, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("embedder.{key}: {why}")]
pub struct InvalidEmbedderConfig {
    pub key: &'static str,
    pub why: String,
}

impl EmbedderConfig {
    pub fn validate(&self) -> Result<(), InvalidEmbedderConfig> {
        let bad = |key, why: &str| {
            Err(InvalidEmbedderConfig {
                key,
                why: why.to_string(),
            })
        };
        if self.threads_per_worker == 0 {
            return bad("threads_per_worker", "must be at least 1");
        }
        if self.max_batch_rows == 0 {
            return bad("max_batch_rows", "must be at least 1");
        }
        if self.max_batch_tokens < 2 {
            return bad("max_batch_tokens", "must be at least 2");
        }
        if self.workers > 1024 {
            return bad("workers", "more than 1024 replicas is surely a typo");
        }
        Ok(())
    }

    /// Replicas to start: `workers`, or when 0 one per available core (CPU) or one (GPU:
    /// one device, fed by one worker).
    pub fn effective_workers(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else if self.backend != Backend::Cpu {
            1
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// Opens the backend's device (checking the GPU adapter) and loads the model onto it.
    pub fn load_model(&self) -> Result<SentenceModel, ModelError> {
        let options = DeviceOptions {
            allow_software_gpu: self.allow_software_gpu,
        };
        SentenceModel::load_on(&self.model_dir, ModelDevice::open(self.backend, options)?)
    }

    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_rows: self.max_batch_rows,
            max_tokens: self.max_batch_tokens,
        }
    }
}
