//! Why a model could not be loaded or run: one error type for the whole crate.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unsupported model: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: not a safetensors file: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {name:?} has dtype {dtype}, expected F32, F16 or BF16")]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tokenizer: {what}")]
    Tokenizer { path: PathBuf, what: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("precision: {0}")]
    Precision(String),
    #[error("fusion: {0}")]
    Fusion(String),
    #[error(
        "backend {backend:?} is not compiled into this binary (build it with `cargo build --release --features {feature}`)"
    )]
    BackendUnavailable {
        backend: &'static str,
        feature: &'static str,
    },
    /// The device cannot run the backend asked for; says what it lacks.
    #[error("{0}")]
    DeviceUnfit(String),
    #[error(
        "no usable GPU adapter (found: {}){}",
        if found.is_empty() { "none: is a Vulkan driver installed (libvulkan1 and the GPU vendor's ICD)?".to_string() } else { found.join("; ") },
        if *software_allowed { "" } else { "; a software adapter runs only with embedder.gpu.allow_software: true" }
    )]
    NoGpu {
        found: Vec<String>,
        software_allowed: bool,
    },
}
