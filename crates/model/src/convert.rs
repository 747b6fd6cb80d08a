//! Writing a copy of a model folder with its weights stored in f16 or bf16.
//!
//! Half-precision files are half the size (MiniLM: 91 MB → 45 MB), which is how many
//! published models ship and what fits where bytes are scarce (a container layer, a
//! transfer to a GPU machine). Keel loads such files as it loads f32 ones (widening on
//! load, [`crate::weights`]); this writes them. Every floating-point tensor is rounded to
//! nearest even; other tensors (integer position-id buffers) are copied as they are, and
//! every other file of the folder is copied unchanged.

use std::path::Path;

use burn::tensor::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::ModelError;

/// How a converted copy stores its floating-point weights.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    strum::EnumString,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = String,
    parse_err_fn = unknown_stored_precision
)]
pub enum StoredPrecision {
    F32,
    F16,
    Bf16,
}

fn unknown_stored_precision(other: &str) -> String {
    use strum::VariantNames;
    format!(
        "unknown precision {other:?} ({})",
        StoredPrecision::VARIANTS.join(", ")
    )
}

/// Copies the model folder `src` to `dst` (created if missing; must not be `src`), with
/// `model.safetensors` rewritten in `precision`. Returns the new weight file's size.
pub fn convert_model(
    src: &Path,
    dst: &Path,
    precision: StoredPrecision,
) -> Result<u64, ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    // Refuse to write over the source: the weights are read in full first, but a half-copied
    // folder over the original would still be a loss.
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize())
        && a == b
    {
        return Err(ModelError::Unsupported {
            path: dst.to_path_buf(),
            what: "the converted copy must go to another folder".into(),
        });
    }
    // The spec check first: a folder Keel cannot load is refused before anything is written.
    crate::spec::ModelSpec::from_dir(src)?;
    copy_dir(src, dst, &|p| {
        p.file_name() == Some("model.safetensors".as_ref())
    })?;

    let weights_path = src.join("model.safetensors");
    let bytes = std::fs::read(&weights_path).map_err(io(&weights_path))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
        path: weights_path.clone(),
        what: e.to_string(),
    })?;
    let mut converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        let (dtype, data) = convert_tensor(view.dtype(), view.data(), precision);
        converted.push((name, dtype, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView<'_>)> = converted
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Format {
                    path: weights_path.clone(),
                    what: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    let out = dst.join("model.safetensors");
    // Written beside, then renamed: a crash leaves the old file or the new one, never half.
    let tmp = dst.join(".model.safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| ModelError::Format {
        path: tmp.clone(),
        what: e.to_string(),
    })?;
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    Ok(std::fs::metadata(&out).map_err(io(&out))?.len())
}

/// A tensor's bytes in `precision`; non-float tensors are returned unchanged.
fn convert_tensor(dtype: Dtype, data: &[u8], precision: StoredPrecision) -> (Dtype, Vec<u8>) {
    let Some(values) = crate::weights::float_values(dtype, data) else {
        return (dtype, data.to_vec());
    };
    match precision {
        StoredPrecision::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        StoredPrecision::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        ),
        StoredPrecision::Bf16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        ),
    }
}

/// Copies the files under `src` into `dst` (recursively), except those `skip` names.
fn copy_dir(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for entry in std::fs::read_dir(src).map_err(io(src))? {
        let entry = entry.map_err(io(src))?;
        let from = entry.path();
        if skip(&from) {
            continue;
        }
        let to = dst.join(entry.file_name());
        if entry.file_type().map_err(io(&from))?.is_dir() {
            copy_dir(&from, &to, skip)?;
        } else {
            std::fs::copy(&from, &to).map_err(io(&from))?;
        }
    }
    Ok(())
}
