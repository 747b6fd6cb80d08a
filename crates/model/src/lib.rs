//! The sentence model: tokenizer, BERT encoder on burn, pooling and normalisation.
//!
//! Pure computation with no actors and no async, so it is unit-testable on its own; the
//! engine's embedder workers (`keel-engine`) run it for the server and `keel embed` alike. [`SentenceModel::load`] reads a
//! sentence-transformers folder; [`SentenceModel::embed_tokens`] runs one forward pass over
//! a batch of any lengths; [`SentenceModel::embed`] tokenizes, plans length-bucketed passes
//! and returns vectors in input order.
//!
//! The backend is picked at run time ([`Backend`]): on the CPU the encoder runs on Keel's
//! own kernels in memory it owns ([`host`]), on a GPU on burn ([`bert`]), which is also the
//! reference the CPU pass is tested against.

mod batching;
mod bert;
mod calibration;
mod convert;
mod device;
mod error;
pub mod gelu;
mod host;
pub mod kernels;
mod spec;
mod tokenize;
mod weights;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

pub use batching::{BatchLimits, LENGTH_BUCKETS, length_bucket, plan};
pub use bert::{LayerPrecision, LinearRole, TokenBatch};
pub use convert::{StoredPrecision, convert_model};
pub use device::{
    AutoBackend, Backend, DeviceMemory, DeviceOptions, ModelDevice, Precision, choose_backend,
};
pub use error::ModelError;
pub use spec::{ModelSpec, Pooling};
pub use tokenize::TextTokenizer;

use bert::Bert;
use host::{HostEncoder, Workspace};
use weights::WeightFile;

/// A loaded sentence model. Cloning shares the weights (a replica for another thread);
/// on the CPU each clone has its own activation buffers.
#[derive(Clone)]
pub struct SentenceModel {
    device: ModelDevice,
    spec: Arc<ModelSpec>,
    tokenizer: TextTokenizer,
    encoder: Encoder,
    model_id: String,
}

/// The encoder: burn on a device, or the host pass with this replica's buffers.
#[derive(Clone)]
enum Encoder {
    Device(Box<Bert>),
    Host(HostReplica),
}

/// The shared host encoder, one replica's workspace, and every replica's workspace (so
/// that a cleanup through any replica releases them all).
struct HostReplica {
    encoder: Arc<HostEncoder>,
    workspace: Arc<Mutex<Workspace>>,
    all: Arc<Mutex<Vec<Weak<Mutex<Workspace>>>>>,
}

impl HostReplica {
    fn new(encoder: HostEncoder) -> Self {
        let workspace = Arc::default();
        Self {
            encoder: Arc::new(encoder),
            all: Arc::new(Mutex::new(vec![Arc::downgrade(&workspace)])),
            workspace,
        }
    }

    /// This replica's buffers (a poisoned lock only means a pass panicked: the buffers
    /// hold no state between passes).
    fn workspace(&self) -> MutexGuard<'_, Workspace> {
        self.workspace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the buffers of every replica not running a pass now; returns the bytes
    /// released.
    fn release(&self) -> usize {
        let mut all = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|w| w.strong_count() > 0);
        all.iter()
            .filter_map(Weak::upgrade)
            .filter_map(|w| w.try_lock().ok().map(|mut w| w.release()))
            .sum()
    }
}

impl Clone for HostReplica {
    /// Shares the weights; a new replica starts with empty buffers of its own.
    fn clone(&self) -> Self {
        let workspace = Arc::default();
        self.all
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&workspace));
        Self {
            encoder: self.encoder.clone(),
            workspace,
            all: self.all.clone(),
        }
    }
}

impl SentenceModel {
    /// Loads a sentence-transformers folder onto `backend`'s device (a software GPU
    /// adapter refused).
    pub fn load(dir: &Path, backend: Backend) -> Result<Self, ModelError> {
        Self::load_on(dir, ModelDevice::open(backend, DeviceOptions::default())?)
    }

    /// Loads a sentence-transformers folder onto an opened device, in the device's
    /// precision.
    pub fn load_on(dir: &Path, device: ModelDevice) -> Result<Self, ModelError> {
        Self::load_with(dir, device, &[])
    }

    /// Like [`Self::load_on`], with some Linear layers in another precision than the
    /// device's (how per-layer sensitivity is measured). Each override's precision must
    /// run on the device's backend.
    pub fn load_with(
        dir: &Path,
        device: ModelDevice,
        overrides: &[LayerPrecision],
    ) -> Result<Self, ModelError> {
        if !overrides.is_empty() && !device.is_host() {
            return Err(ModelError::Precision(
                "per-layer precisions run on the cpu backend only".into(),
            ));
        }
        if let Some(o) = overrides
            .iter()
            .find(|o| !o.precision.runs_on(device.backend))
        {
            return Err(ModelError::Precision(format!(
                "layer {} {:?}: {} does not run on this backend",
                o.layer,
                o.role,
                o.precision.name()
            )));
        }
        let spec = Arc::new(ModelSpec::from_dir(dir)?);
        let tokenizer = TextTokenizer::load(
            &dir.join("tokenizer.json"),
            spec.max_seq_length,
            spec.vocab_size,
        )?
        .with_lowercase(spec.lowercase);
        let weights_path = dir.join("model.safetensors");
        let mut weights = WeightFile::open(&weights_path)?;
        let calibration = calibration::TEXTS
            .iter()
            .map(|text| tokenizer.encode(text))
            .collect::<Result<Vec<_>, _>>()?;
        let encoder = if device.is_host() {
            Encoder::Host(HostReplica::new(HostEncoder::load(
                spec.clone(),
                &mut weights,
                device.precision,
                overrides,
                &calibration,
            )?))
        } else {
            Encoder::Device(Box::new(Bert::load(
                spec.clone(),
                &mut weights,
                &device.device,
                false,
                device.precision,
            )?))
        };
        let unused = weights.unused()?;
        if !unused.is_empty() {
            tracing::debug!(file = %weights_path.display(), ?unused, "tensors not used by the encoder");
        }
        let model_id = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            device,
            spec,
            tokenizer,
            encoder,
            model_id,
        })
    }

    /// The model in f32 on burn's own CPU backend (`flex`): the reference the host pass
    /// is tested against, and a second opinion when one is in doubt. Slower than the
    /// host pass; not what `backend: cpu` runs.
    pub fn load_burn_reference(dir: &Path) -> Result<Self, ModelError> {
        let mut model = Self::load(dir, Backend::Cpu)?;
        let mut weights = WeightFile::open(&dir.join("model.safetensors"))?;
        let device = burn::tensor::Device::flex();
        model.encoder = Encoder::Device(Box::new(Bert::load(
            model.spec.clone(),
            &mut weights,
            &device,
            true,
            Precision::F32,
        )?));
        model.device.device = device;
        model.device.adapter = "burn flex (reference)".into();
        Ok(model)
    }

    /// Returns the device's pooled memory (GPU backends keep a pool of freed buffers);
    /// live tensors, the weights among them, stay. Returns whether the backend pools: on
    /// the host a pass keeps nothing after it returns, so there is nothing to return.
    pub fn release_pooled_memory(&self) -> bool {
        if self.device.is_host() {
            return false;
        }
        self.device.device.memory_cleanup();
        true
    }

    /// Releases the activation buffers of every replica of this model on the host that is
    /// not running a pass now (they grow back with the next pass); returns the bytes
    /// released. 0 on a device, where [`Self::release_pooled_memory`] applies.
    pub fn release_host_buffers(&self) -> usize {
        match &self.encoder {
            Encoder::Host(host) => host.release(),
            Encoder::Device(_) => 0,
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> &ModelDevice {
        &self.device
    }

    /// The model's tokenizer (clones share its vocabulary).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Bytes of the encoder's Linear weights in the precision they compute in.
    pub fn linear_bytes(&self) -> usize {
        match &self.encoder {
            Encoder::Device(bert) => bert.linear_bytes(),
            Encoder::Host(host) => host.encoder.linear_bytes(),
        }
    }

    /// Bytes of every weight the model holds, in the precision it computes in.
    pub fn weight_bytes(&self) -> usize {
        match &self.encoder {
            Encoder::Device(bert) => bert.weight_bytes(),
            Encoder::Host(host) => host.encoder.weight_bytes(),
        }
    }

    /// Bytes of this replica's activation buffers (host only: they grow to the largest
    /// pass run and are kept).
    pub fn workspace_bytes(&self) -> usize {
        match &self.encoder {
            Encoder::Device(_) => 0,
            Encoder::Host(host) => host.workspace().bytes(),
        }
    }

    /// Width of the sentence vectors.
    pub fn dim(&self) -> usize {
        self.spec.hidden_size
    }

    /// A short name of the model (its folder's name), part of cache keys and reports.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenizer.encode(text)
    }

    /// One forward pass: sentence vectors of `rows` (token ids from [`Self::tokenize`]),
    /// `rows.len() × dim` values, row-major, normalised if the model says so.
    pub fn embed_tokens(&self, rows: &[&[u32]]) -> Vec<f32> {
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let pad_to = self.padded_length(longest);
        let batch = TokenBatch { rows, pad_to };
        let mut out = match &self.encoder {
            Encoder::Device(bert) => bert.forward(&batch),
            Encoder::Host(host) => {
                let mut out = Vec::with_capacity(rows.len() * self.spec.hidden_size);
                host.encoder
                    .forward(&batch, &mut host.workspace(), &mut out);
                out
            }
        };
        if self.spec.normalize {
            for v in out.chunks_exact_mut(self.spec.hidden_size) {
                l2_normalize(v);
            }
        }
        out
    }

    /// The length a pass whose longest row has `longest` tokens is padded to: itself on the
    /// host, the next sequence-length bucket on a device that compiles kernels per shape.
    pub fn padded_length(&self, longest: usize) -> usize {
        if self.device.compiles_per_shape() {
            length_bucket(longest, self.spec.max_seq_length)
        } else {
            longest
        }
    }

    /// Splits tokenized rows into passes within `limits`, counting each pass at its padded
    /// length. Returns row indices per pass.
    pub fn plan(&self, tokens: &[Vec<u32>], limits: BatchLimits) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = tokens.iter().map(|t| self.padded_length(t.len())).collect();
        plan(&lengths, limits)
    }

    /// Tokenizes `texts`, runs them in length-bucketed passes within `limits`, and returns
    /// `texts.len() × dim` values in input order.
    pub fn embed(&self, texts: &[&str], limits: BatchLimits) -> Result<Vec<f32>, ModelError> {
        let tokens = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>, _>>()?;
        let passes = self.plan(&tokens, limits);
        Ok(run_planned(&tokens, &passes, self.dim(), |rows| {
            self.embed_tokens(rows)
        }))
    }

    /// Runs one pass of every shape `limits` allows — each sequence-length bucket up to
    /// `max_seq_length`, at row counts from 1 up to the most the token budget allows, in
    /// powers of two — so that a device that compiles and autotunes kernels per shape
    /// does it now rather than in front of the first requests. Returns the passes run.
    /// On the host it runs one small pass (nothing to compile) and returns 1.
    pub fn warm_up(&self, limits: BatchLimits) -> usize {
        let unk = [0u32; 1];
        if let Encoder::Host(host) = &self.encoder {
            // Buffers for the largest pass now, so that no pass allocates them.
            let tokens = limits.max_tokens.max(self.spec.max_seq_length);
            let rows = limits.max_rows.min(tokens).max(1);
            host.encoder.reserve(&mut host.workspace(), rows, tokens);
        }
        if !self.device.compiles_per_shape() {
            self.embed_tokens(&[&unk]);
            return 1;
        }
        let mut passes = 0;
        for &len in LENGTH_BUCKETS
            .iter()
            .filter(|&&b| b <= self.spec.max_seq_length)
        {
            let row = vec![0u32; len];
            let most = limits.max_rows.min(limits.max_tokens / len).max(1);
            let mut rows = 1;
            loop {
                let batch: Vec<&[u32]> = (0..rows).map(|_| row.as_slice()).collect();
                self.embed_tokens(&batch);
                passes += 1;
                if rows == most {
                    break;
                }
                rows = (rows * 2).min(most);
            }
        }
        passes
    }
}

/// Runs `passes` (row indices into `tokens`) through `forward`, which returns `rows × dim`
/// values, and returns the vectors in input order.
pub fn run_planned(
    tokens: &[Vec<u32>],
    passes: &[Vec<usize>],
    dim: usize,
    mut forward: impl FnMut(&[&[u32]]) -> Vec<f32>,
) -> Vec<f32> {
    let mut out = vec![0.0f32; tokens.len() * dim];
    for pass in passes {
        let rows: Vec<&[u32]> = pass.iter().map(|&i| tokens[i].as_slice()).collect();
        let vectors = forward(&rows);
        for (&i, v) in pass.iter().zip(vectors.chunks_exact(dim)) {
            out[i * dim..(i + 1) * dim].copy_from_slice(v);
        }
    }
    out
}

/// Scales `v` to unit L2 norm, as sentence-transformers' `Normalize` (norm clamped at 1e-12).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    for x in v {
        *x = (*x as f64 / norm) as f32;
    }
}
