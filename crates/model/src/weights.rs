//! Reading a model's tensors from `model.safetensors`.
//!
//! Every tensor is looked up by name and checked against the shape the configuration
//! implies before it is used, so a wrong or truncated file fails at load time with the
//! file and the tensor named, never at the first forward pass. Weights stored as f16 or
//! bf16 are widened to f32. Checkpoints saved from `BertModel` name their tensors
//! `embeddings...`; those saved from a task model prefix them with `bert.` (or
//! `roberta.`): the prefix is detected once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::spec::ModelSpec;
use crate::error::ModelError;

/// An opened safetensors file, held in memory until the model is built.
pub struct WeightFile {
    path: PathBuf,
    bytes: Vec<u8>,
    prefix: &'static str,
    used: BTreeSet<String>,
}

impl WeightFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file = Self {
            path: path.to_path_buf(),
            bytes,
            prefix: "",
            used: BTreeSet::new(),
        };
        let names: BTreeSet<String> = file
            .tensors()?
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        file.prefix = ["", "bert.", "roberta."]
            .into_iter()
            .find(|p| names.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: "embeddings.word_embeddings.weight".into(),
            })?;
        Ok(file)
    }

    fn tensors(&self) -> Result<SafeTensors<'_>, ModelError> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| ModelError::Format {
            path: self.path.clone(),
            what: e.to_string(),
        })
    }

    /// The tensor `name` (without the checkpoint's prefix) as f32, row-major, after
    /// checking that its shape is `shape`.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let full = format!("{}{}", self.prefix, name);
        let tensors = self.tensors()?;
        let view = tensors
            .tensor(&full)
            .map_err(|_| ModelError::MissingTensor {
                path: self.path.clone(),
                name: full.clone(),
            })?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                path: self.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let data = view.data();
        let Some(values) = float_values(view.dtype(), data) else {
            return Err(ModelError::TensorDtype {
                path: self.path.clone(),
                name: full,
                dtype: format!("{:?}", view.dtype()),
            });
        };
        self.used.insert(full);
        Ok(values)
    }

    /// A Linear layer's weight, transposed from PyTorch's `[out, in]` to `[in, out]`
    /// so that the forward pass is a plain `x · W`.
    pub fn get_linear_weight(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let w = self.get(name, &[out, inp])?;
        let mut t = vec![0.0f32; w.len()];
        for (o, row) in w.chunks_exact(inp).enumerate() {
            for (i, v) in row.iter().enumerate() {
                t[i * out + o] = *v;
            }
        }
        Ok(t)
    }

    /// Names in the file that the model did not use (pooler heads, position-id buffers).
    pub fn unused(&self) -> Result<Vec<String>, ModelError> {
        Ok(self
            .tensors()?
            .names()
            .into_iter()
            .filter(|n| !self.used.contains(*n))
            .map(String::from)
            .collect())
    }
}

/// A Linear layer's weight (`inputs × outputs`, row-major: `y = x · W + b`) and bias.
pub struct LinearWeights {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

/// A LayerNorm's scale and shift.
pub struct NormWeights {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// The embedding layer: the word table, the position table with the token-type-0
/// embedding added to every row (single-segment input), and the LayerNorm after them.
pub struct EmbeddingWeights {
    /// `vocab_size × hidden`.
    pub words: Vec<f32>,
    /// `(max_position_embeddings - position_offset) × hidden`: row p is the p-th
    /// token's position (with token type 0 added).
    pub positions: Vec<f32>,
    pub norm: NormWeights,
}

/// One encoder block's weights, in Hugging Face's `BertLayer` order.
pub struct BlockWeights {
    /// Q, K and V stacked into one `hidden × 3·hidden` layer.
    pub qkv: LinearWeights,
    pub attn_out: LinearWeights,
    pub attn_norm: NormWeights,
    pub up: LinearWeights,
    pub down: LinearWeights,
    pub out_norm: NormWeights,
}

impl WeightFile {
    /// The embedding layer of a model shaped as `spec` says.
    pub fn embeddings(&mut self, spec: &ModelSpec) -> Result<EmbeddingWeights, ModelError> {
        let h = spec.hidden_size;
        let words = self.get("embeddings.word_embeddings.weight", &[spec.vocab_size, h])?;
        let mut positions = self.get(
            "embeddings.position_embeddings.weight",
            &[spec.max_position_embeddings, h],
        )?;
        let types = self.get(
            "embeddings.token_type_embeddings.weight",
            &[spec.type_vocab_size, h],
        )?;
        for row in positions.chunks_exact_mut(h) {
            for (p, t) in row.iter_mut().zip(&types[..h]) {
                *p += *t;
            }
        }
        // Row 0 of the table is then the first token's (RoBERTa's start after padding).
        positions.drain(..spec.position_offset * h);
        let norm = self.norm("embeddings.LayerNorm", h)?;
        Ok(EmbeddingWeights {
            words,
            positions,
            norm,
        })
    }

    /// Encoder block `layer` of a model shaped as `spec` says.
    pub fn block(&mut self, spec: &ModelSpec, layer: usize) -> Result<BlockWeights, ModelError> {
        let (h, i) = (spec.hidden_size, spec.intermediate_size);
        let p = format!("encoder.layer.{layer}");
        let mut weight = vec![0.0f32; h * 3 * h];
        let mut bias = Vec::with_capacity(3 * h);
        for (part, name) in ["query", "key", "value"].into_iter().enumerate() {
            let name = format!("{p}.attention.self.{name}");
            let wt = self.get_linear_weight(&format!("{name}.weight"), h, h)?;
            for r in 0..h {
                weight[r * 3 * h + part * h..r * 3 * h + (part + 1) * h]
                    .copy_from_slice(&wt[r * h..(r + 1) * h]);
            }
            bias.extend(self.get(&format!("{name}.bias"), &[h])?);
        }
        let qkv = LinearWeights {
            weight,
            bias,
            inputs: h,
            outputs: 3 * h,
        };
        Ok(BlockWeights {
            qkv,
            attn_out: self.linear(&format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: self.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
            up: self.linear(&format!("{p}.intermediate.dense"), h, i)?,
            down: self.linear(&format!("{p}.output.dense"), i, h)?,
            out_norm: self.norm(&format!("{p}.output.LayerNorm"), h)?,
        })
    }

    fn linear(
        &mut self,
        name: &str,
        inputs: usize,
        outputs: usize,
    ) -> Result<LinearWeights, ModelError> {
        Ok(LinearWeights {
            weight: self.get_linear_weight(&format!("{name}.weight"), outputs, inputs)?,
            bias: self.get(&format!("{name}.bias"), &[outputs])?,
            inputs,
            outputs,
        })
    }

    fn norm(&mut self, name: &str, width: usize) -> Result<NormWeights, ModelError> {
        Ok(NormWeights {
            gamma: self.get(&format!("{name}.weight"), &[width])?,
            beta: self.get(&format!("{name}.bias"), &[width])?,
        })
    }
}

/// A float tensor's values as f32 (F32, F16 or BF16, little-endian, as safetensors stores
/// them); `None` for any other dtype.
pub(crate) fn float_values(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let half = |decode: fn(u16) -> f32| {
        data.chunks_exact(2)
            .map(|b| decode(u16::from_le_bytes([b[0], b[1]])))
            .collect()
    };
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => half(|bits| f16::from_bits(bits).to_f32()),
        Dtype::BF16 => half(|bits| bf16::from_bits(bits).to_f32()),
        _ => return None,
    })
}
