//! `keel convert`: a copy of a model folder with its weights stored in f16 or bf16.
//!
//! Half the bytes on disk and in transfers (MiniLM: 91 MB → 45 MB); Keel loads the copy
//! like the original, widening to f32 (`embedder.precision` says what the GPU computes
//! in). The vectors move by the rounding of the weights: docs/OPERATIONS.md gives the
//! measured distance to the float64 reference.

use std::path::PathBuf;

use anyhow::Context;
use keel_model::{StoredPrecision, convert_model};

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The sentence-transformers model folder to read.
    src: PathBuf,
    /// The folder to write (created; must not be the source).
    dst: PathBuf,
    /// How the copy stores its weights: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    precision: StoredPrecision,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let bytes = convert_model(&args.src, &args.dst, args.precision).with_context(|| {
        format!(
            "converting {} into {}",
            args.src.display(),
            args.dst.display()
        )
    })?;
    eprintln!(
        "keel convert: {} written ({:.1} MB, {:?})",
        args.dst.join("model.safetensors").display(),
        bytes as f64 / 1e6,
        args.precision
    );
    Ok(())
}
