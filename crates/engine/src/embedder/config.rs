//! Configuration of the embedder: which model, where it runs, how passes are sized.
//!
//! `backend` says where the model runs: `cpu`, `wgpu` (the GPU), or `both` (GPU workers
//! and CPU workers taking work from one queue). Each device kind has its own block
//! (`cpu:`, `gpu:`) with its own pass sizes, since a GPU wants passes tens of times larger
//! than a CPU core does.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use keel_model::{
    Backend, BatchLimits, DeviceOptions, ModelDevice, ModelError, Precision, SentenceModel,
};

/// Where the embedder's workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backends {
    /// Keel's own forward pass and kernels on the host's cores.
    #[default]
    Cpu,
    /// burn's wgpu backend (WGSL) on the GPU.
    Wgpu,
    /// burn's SPIR-V kernels on the GPU's Vulkan driver, tensor cores where the device has
    /// cooperative matrices (a binary built with the `vulkan` feature).
    Vulkan,
    /// GPU workers (wgpu) and CPU workers side by side, on one queue.
    Both,
    /// Picked at start-up from what the machine and the binary offer: `vulkan` where a
    /// hardware GPU has cooperative matrices (tensor cores) and the binary the `vulkan`
    /// feature, else `wgpu` on a hardware GPU (or a software one with
    /// `gpu.allow_software`), else `cpu`. `stats`, `/metrics`, the log and `keel validate`
    /// say what was picked and why.
    Auto,
}

impl Backends {
    /// The configuration's spelling: `cpu`, `wgpu`, `vulkan`, `both`, `auto`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Vulkan => "vulkan",
            Self::Both => "both",
            Self::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Backends {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "vulkan" => Ok(Self::Vulkan),
            "both" => Ok(Self::Both),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown backend {other:?} (cpu, wgpu, vulkan, both or auto)"
            )),
        }
    }
}

/// `embedder:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedderConfig {
    /// A sentence-transformers model folder (config.json, model.safetensors, tokenizer.json,
    /// modules.json, 1_Pooling/). `scripts/fetch-model.sh` fills the default one.
    pub model_dir: PathBuf,
    /// `cpu`, `wgpu`, `vulkan`, `both` or `auto`.
    pub backend: Backends,
    /// The CPU workers (`backend: cpu` or `both`).
    pub cpu: CpuConfig,
    /// The GPU workers (`backend: wgpu` or `both`).
    pub gpu: GpuConfig,
}

/// `embedder.cpu:`: model replicas on the host's cores.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpuConfig {
    /// Model replicas, each on its own threads; 0 = one per available core.
    pub workers: usize,
    /// rayon threads per replica. One per replica and one replica per core is fastest
    /// (measured); more threads per replica helps single-stream latency.
    pub threads_per_worker: usize,
    /// Most rows in one forward pass.
    pub max_batch_rows: usize,
    /// Most padded tokens (rows × longest row) in one forward pass. Bounds the memory of a
    /// pass: activations are about `max_batch_tokens × 4 × 6 × hidden_size` bytes (the
    /// residual stream, Q·K·V, context and a layer's output; the feed-forward runs a block
    /// of 64 tokens at a time in each thread's buffer). Passes
    /// of ~512–1 024 tokens keep their activations in the core's caches; larger passes were
    /// slower per text in every precision (docs/BENCHMARKS.md, "Pass shape").
    pub max_batch_tokens: usize,
    /// What the Linear layers compute in: `f32` (exact to the float64 reference), `bf16`
    /// (bfloat16 operands, f32 sums) or `int8` (int8 weights per output channel and
    /// activations per token, exact int32 sums). Attention, softmax, GELU, LayerNorm and
    /// pooling stay f32 in every mode. Accuracy and speed of each: docs/BENCHMARKS.md.
    pub precision: Precision,
}

impl Default for CpuConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            threads_per_worker: 1,
            max_batch_rows: 64,
            max_batch_tokens: 768,
            precision: Precision::F32,
        }
    }
}

/// `embedder.gpu:`: one device, fed by workers that tokenize ahead of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Workers feeding the device, each with its own pass in flight. 1 keeps the device
    /// busy when tokenizing runs ahead (it does); 2 overlaps one pass's host work (the
    /// embedding gather, the copy back) with the other's kernels.
    pub workers: usize,
    /// `f32` (within 1e-4 of the float64 reference) or `f16` (matrix products, attention
    /// and GELU in half precision; LayerNorm and the residual stream in f32).
    pub precision: Precision,
    /// Most rows in one forward pass.
    pub max_batch_rows: usize,
    /// Most padded tokens (rows × padded length) in one forward pass; bounds the device
    /// memory of a pass (about `max_batch_tokens × 4 × intermediate_size` bytes of
    /// activations in f32, and the attention scores).
    pub max_batch_tokens: usize,
    /// Host threads that tokenize ahead of the device; 0 = one per available core.
    pub tokenizer_threads: usize,
    /// Run one pass of every shape at start-up, so kernel compilation and autotuning are
    /// paid before the first request (`health` answers only after). Off, the first
    /// requests of each shape pay it.
    pub warm_up: bool,
    /// Fuse chains of operations into fewer kernels (burn's fusion: fewer launches and
    /// memory round trips). Off, every operation runs as its own kernel: the escape hatch
    /// should fusion ever compute wrong results on a driver (the tests check both).
    pub fusion: bool,
    /// Accept a software adapter (Mesa's lavapipe) when no GPU is found. It runs the GPU
    /// code path on the CPU, far slower than the cpu backend: for tests.
    pub allow_software: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            precision: Precision::F32,
            max_batch_rows: 256,
            max_batch_tokens: 32_768,
            tokenizer_threads: 0,
            warm_up: true,
            fusion: true,
            allow_software: false,
        }
    }
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::from("models/all-MiniLM-L6-v2"),
            backend: Backends::Cpu,
            cpu: CpuConfig::default(),
            gpu: GpuConfig::default(),
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

/// The backend the embedder runs on, as configured and as resolved on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendChoice {
    /// `embedder.backend` as configured (`auto`, `cpu`, ...).
    pub configured: Backends,
    /// What runs: the configured backend, or what `auto` picked.
    pub picked: Backends,
    /// Why (`auto`: the adapter and what it offers, or why each faster backend was passed
    /// over); "configured" otherwise.
    pub why: String,
}

/// One kind of worker the embedder starts: on which device, how many, how passes are
/// sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerGroup {
    pub backend: Backend,
    pub workers: usize,
    /// rayon threads per worker (CPU); GPU workers compute on the device.
    pub threads_per_worker: usize,
    pub limits: BatchLimits,
    /// Host threads tokenizing ahead of the device; `None`: each worker tokenizes inline
    /// (CPU workers, for which tokenizing is under 1 % of a pass).
    pub tokenizer_threads: Option<usize>,
    pub warm_up: bool,
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl EmbedderConfig {
    /// Replaces `auto` by the backend this machine and binary run the model best on
    /// ([`keel_model::choose_backend`]); any other value is kept. Call it before the
    /// worker groups, cache keys or precisions are read.
    pub fn resolve_backend(&mut self) -> BackendChoice {
        let configured = self.backend;
        if configured != Backends::Auto {
            return BackendChoice {
                configured,
                picked: configured,
                why: "configured".into(),
            };
        }
        let auto = keel_model::choose_backend(self.gpu.allow_software);
        self.backend = match auto.backend {
            Backend::Cpu => Backends::Cpu,
            Backend::Wgpu => Backends::Wgpu,
            Backend::Vulkan => Backends::Vulkan,
        };
        BackendChoice {
            configured,
            picked: self.backend,
            why: auto.why,
        }
    }

    pub fn validate(&self) -> Result<(), InvalidEmbedderConfig> {
        let bad = |key, why: &str| {
            Err(InvalidEmbedderConfig {
                key,
                why: why.to_string(),
            })
        };
        let (cpu, gpu) = (&self.cpu, &self.gpu);
        if cpu.threads_per_worker == 0 {
            return bad("cpu.threads_per_worker", "must be at least 1");
        }
        if cpu.max_batch_rows == 0 {
            return bad("cpu.max_batch_rows", "must be at least 1");
        }
        if cpu.max_batch_tokens < 2 {
            return bad("cpu.max_batch_tokens", "must be at least 2");
        }
        if !cpu.precision.runs_on(Backend::Cpu) {
            return bad(
                "cpu.precision",
                &format!(
                    "{} does not run on the CPU (f32, bf16 or int8)",
                    cpu.precision.name()
                ),
            );
        }
        if !gpu.precision.runs_on(self.gpu_backend()) {
            return bad(
                "gpu.precision",
                &format!(
                    "{} does not run on the GPU (f32 or f16)",
                    gpu.precision.name()
                ),
            );
        }
        if cpu.workers > 1024 {
            return bad("cpu.workers", "more than 1024 replicas is surely a typo");
        }
        if gpu.workers == 0 {
            return bad("gpu.workers", "must be at least 1");
        }
        if gpu.workers > 64 {
            return bad(
                "gpu.workers",
                "more than 64 workers on one device is surely a typo",
            );
        }
        if gpu.max_batch_rows == 0 {
            return bad("gpu.max_batch_rows", "must be at least 1");
        }
        if gpu.max_batch_tokens < 8 {
            return bad(
                "gpu.max_batch_tokens",
                "must be at least 8 (one row of the shortest sequence bucket)",
            );
        }
        Ok(())
    }

    /// The arithmetic of each backend in use, for cache keys: `cpu=f32`, `wgpu=f16,cpu=f32`.
    pub fn precision_key(&self) -> String {
        let mut parts = Vec::new();
        if self.uses_gpu() {
            parts.push(format!(
                "{}={:?}",
                self.gpu_backend().name(),
                self.gpu.precision
            ));
        }
        if self.uses_cpu() {
            parts.push(format!("cpu={:?}", self.cpu.precision));
        }
        parts.join(",")
    }

    /// Whether a worker group runs on the GPU (`auto` unresolved: not known, so no).
    pub fn uses_gpu(&self) -> bool {
        matches!(
            self.backend,
            Backends::Wgpu | Backends::Vulkan | Backends::Both
        )
    }

    /// Whether a worker group runs on the host's cores (`auto` unresolved: yes, its
    /// fallback).
    pub fn uses_cpu(&self) -> bool {
        matches!(
            self.backend,
            Backends::Cpu | Backends::Both | Backends::Auto
        )
    }

    /// The GPU workers' backend: `vulkan` where asked for, else `wgpu`.
    pub fn gpu_backend(&self) -> Backend {
        if self.backend == Backends::Vulkan {
            Backend::Vulkan
        } else {
            Backend::Wgpu
        }
    }

    /// The worker groups to start, GPU first. `auto` must be resolved first
    /// ([`Self::resolve_backend`]); unresolved, it starts the CPU workers.
    pub fn groups(&self) -> Vec<WorkerGroup> {
        debug_assert!(self.backend != Backends::Auto, "resolve_backend() first");
        let mut groups = Vec::new();
        if self.uses_gpu() {
            let g = &self.gpu;
            groups.push(WorkerGroup {
                backend: self.gpu_backend(),
                workers: g.workers,
                threads_per_worker: 1,
                limits: BatchLimits {
                    max_rows: g.max_batch_rows,
                    max_tokens: g.max_batch_tokens,
                },
                tokenizer_threads: Some(if g.tokenizer_threads == 0 {
                    cores()
                } else {
                    g.tokenizer_threads
                }),
                warm_up: g.warm_up,
            });
        }
        if self.uses_cpu() {
            let c = &self.cpu;
            groups.push(WorkerGroup {
                backend: Backend::Cpu,
                workers: if c.workers == 0 { cores() } else { c.workers },
                threads_per_worker: c.threads_per_worker,
                limits: BatchLimits {
                    max_rows: c.max_batch_rows,
                    max_tokens: c.max_batch_tokens,
                },
                tokenizer_threads: None,
                warm_up: false,
            });
        }
        groups
    }

    /// Workers across all groups.
    pub fn effective_workers(&self) -> usize {
        self.groups().iter().map(|g| g.workers).sum()
    }

    /// Opens each group's device (checking the GPU adapter) and loads the model onto it.
    pub fn load_models(&self) -> Result<Vec<(SentenceModel, WorkerGroup)>, ModelError> {
        self.groups()
            .into_iter()
            .map(|group| {
                let options = match group.backend {
                    Backend::Cpu => DeviceOptions {
                        precision: self.cpu.precision,
                        ..DeviceOptions::default()
                    },
                    Backend::Wgpu | Backend::Vulkan => DeviceOptions {
                        allow_software_gpu: self.gpu.allow_software,
                        precision: self.gpu.precision,
                        fusion: self.gpu.fusion,
                    },
                };
                let device = ModelDevice::open(group.backend, options)?;
                Ok((SentenceModel::load_on(&self.model_dir, device)?, group))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vulkan_runs_gpu_workers_only_and_keys_its_cache_apart() {
        let mut c = EmbedderConfig {
            backend: "vulkan".parse().unwrap(),
            ..EmbedderConfig::default()
        };
        c.gpu.precision = Precision::F16;
        let groups = c.groups();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].backend, Backend::Vulkan);
        assert!(c.uses_gpu() && !c.uses_cpu());
        assert_eq!(c.precision_key(), "vulkan=F16");
        c.validate().unwrap();
        // The keys of the other backends are what they were (caches written before).
        c.backend = Backends::Wgpu;
        assert_eq!(c.precision_key(), "wgpu=F16");
        c.backend = Backends::Both;
        assert_eq!(c.precision_key(), "wgpu=F16,cpu=F32");
        assert_eq!(c.groups()[0].backend, Backend::Wgpu);
        let err = "cuda".parse::<Backends>().unwrap_err();
        assert!(err.contains("vulkan"), "{err}");
    }
}
