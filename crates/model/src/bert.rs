//! The BERT encoder and pooling, on burn tensors: the GPU path, and the CPU reference.
//!
//! The layout is Hugging Face's `BertModel`: embeddings (word + position + token type,
//! LayerNorm), then `num_layers` post-norm blocks of multi-head self-attention and a GELU
//! feed-forward layer. Shapes come from [`ModelSpec`]; nothing is hard-coded for MiniLM.
//!
//! Choices made for speed, each measured (docs/BENCHMARKS.md):
//! - the word/position/type embedding lookup is a host-side gather: it is a copy, and a
//!   copy is cheaper done once in Rust than as three device gathers and two adds;
//! - Q, K and V are one `[hidden, 3·hidden]` matmul; every Linear runs on a 2-D view;
//! - attention is burn's fused `attention` op with a boolean key-padding mask, so padded
//!   positions contribute exactly zero and a text's vector does not depend on its batch;
//! - on burn's CPU backend (the reference the host pass, [`crate::host`], is tested
//!   against) GELU is [`super::gelu`]'s vectorised exact-erf kernel; GPU backends use
//!   burn's `gelu`.
//!
//! Tensors are reference-counted: cloning a [`Bert`] shares its weights, which is how
//! several worker threads each get a replica without copying 90 MB.

use std::sync::Arc;

use burn::tensor::activation;
use burn::tensor::module::{attention, layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, FloatDType, Tensor, TensorData};

use super::device::Precision;
use super::gelu;
use super::spec::{ModelSpec, Pooling};
use super::weights::{LinearWeights, NormWeights, WeightFile};
use crate::error::ModelError;

/// A float tensor on `device`, stored in `dtype`.
fn on_device<const D: usize>(data: TensorData, device: &Device, dtype: FloatDType) -> Tensor<D> {
    Tensor::<D>::from_data(data, device).cast(dtype)
}

/// The four Linear layers of an encoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearRole {
    /// Q, K and V, fused: `[hidden, 3·hidden]`.
    Qkv,
    /// Attention output: `[hidden, hidden]`.
    AttnOut,
    /// Feed-forward up-projection: `[hidden, intermediate]`.
    Up,
    /// Feed-forward down-projection: `[intermediate, hidden]`.
    Down,
}

impl LinearRole {
    pub const ALL: [LinearRole; 4] = [Self::Qkv, Self::AttnOut, Self::Up, Self::Down];

    /// Its place in [`Self::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Input channels of an int8 Linear layer to compute in f32 beside the int8 product
/// (`crate::host`): the channels that reached the largest magnitudes over the calibration
/// texts. MiniLM's
/// LayerNorm outputs carry four channels up to 16× the typical channel's maximum; eight
/// cover them and the GELU outputs' largest. On the 2 000 variant texts of
/// `scripts/bench-model.sh` eight lift int8's neighbour recall@10 from 0.93 to 0.96, for
/// about 2 % of a layer's multiplies in f32 (docs/BENCHMARKS.md).
/// The `count` channels of `maxima` with the largest values (fewer if the layer is
/// narrow: at most an eighth of its inputs).
pub(crate) fn outlier_channels(maxima: &[f32], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..maxima.len()).collect();
    order.sort_by(|&a, &b| maxima[b].total_cmp(&maxima[a]).then(a.cmp(&b)));
    order.truncate(count.min(maxima.len() / 8));
    order.sort_unstable();
    order
}

/// One Linear layer computing in another precision than the model's (measurements of
/// per-layer sensitivity; a reduced-precision model keeping a layer in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPrecision {
    pub layer: usize,
    pub role: LinearRole,
    pub precision: Precision,
}

/// A Linear layer on the device: `[in, out]` weight and bias in the compute dtype.
#[derive(Clone)]
struct Linear {
    weight: Tensor<2>,
    bias: Tensor<1>,
}

impl Linear {
    fn new(w: LinearWeights, device: &Device, dtype: FloatDType) -> Self {
        Self {
            weight: on_device(
                TensorData::new(w.weight, [w.inputs, w.outputs]),
                device,
                dtype,
            ),
            bias: on_device(TensorData::new(w.bias, [w.outputs]), device, dtype),
        }
    }

    /// `x · W + b`, in the weights' dtype (`x` in it already).
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        linear(x, self.weight.clone(), Some(self.bias.clone()))
    }

    /// Bytes of weights and biases.
    fn bytes(&self) -> usize {
        let elem = self.weight.dtype().size();
        (self.weight.shape().num_elements() + self.bias.shape().num_elements()) * elem
    }
}

fn dtype_of(precision: Precision) -> FloatDType {
    match precision {
        Precision::F16 => FloatDType::F16,
        _ => FloatDType::F32,
    }
}

#[derive(Clone)]
struct LayerNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    fn new(w: NormWeights, eps: f64, device: &Device) -> Self {
        let width = w.gamma.len();
        Self {
            gamma: Tensor::from_data(TensorData::new(w.gamma, [width]), device),
            beta: Tensor::from_data(TensorData::new(w.beta, [width]), device),
            eps,
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        layer_norm(x, self.gamma.clone(), Some(self.beta.clone()), self.eps)
    }
}

#[derive(Clone)]
struct Block {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// The word-embedding table (30 522 × 384 for MiniLM: 47 MB in f32, the largest tensor).
/// An int8 model keeps it in int8 with one scale per 32 values of a row (13 MB; one scale
/// per row lost a measurable 0.003 of min cosine on the reference texts): a row is
/// dequantized when gathered, before the embedding LayerNorm.
pub(crate) enum WordTable {
    F32(Vec<f32>),
    Int8 { values: Vec<i8>, scales: Vec<f32> },
}

/// Values of a word-table row sharing one int8 scale.
const WORD_GROUP: usize = 32;

impl WordTable {
    pub(crate) fn int8(table: &[f32], width: usize) -> Self {
        let mut values = vec![0i8; table.len()];
        let mut scales = Vec::with_capacity(table.len().div_ceil(WORD_GROUP));
        for (row, q) in table
            .chunks_exact(width)
            .zip(values.chunks_exact_mut(width))
        {
            for (group, q) in row.chunks(WORD_GROUP).zip(q.chunks_mut(WORD_GROUP)) {
                let max = group.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                for (q, v) in q.iter_mut().zip(group) {
                    *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
                scales.push(max / 127.0);
            }
        }
        Self::Int8 { values, scales }
    }

    /// `out = table[id] + pos`.
    pub(crate) fn add_row(&self, id: usize, pos: &[f32], out: &mut [f32]) {
        let w = pos.len();
        match self {
            Self::F32(t) => {
                for ((o, x), p) in out.iter_mut().zip(&t[id * w..(id + 1) * w]).zip(pos) {
                    *o = x + p;
                }
            }
            Self::Int8 { values, scales } => {
                let groups = w.div_ceil(WORD_GROUP);
                let row = &values[id * w..(id + 1) * w];
                let row_scales = &scales[id * groups..(id + 1) * groups];
                for (i, ((o, q), p)) in out.iter_mut().zip(row).zip(pos).enumerate() {
                    *o = *q as f32 * row_scales[i / WORD_GROUP] + p;
                }
            }
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::F32(t) => t.len() * 4,
            Self::Int8 { values, scales } => values.len() + scales.len() * 4,
        }
    }
}

/// One tokenized batch, padded to its longest row (or further, to `pad_to`).
pub struct TokenBatch<'a> {
    /// Token ids of each row, unpadded; every row is non-empty.
    pub rows: &'a [&'a [u32]],
    /// Pad every row to at least this many positions (a sequence-length bucket, so that a
    /// GPU compiles its kernels once per bucket); padding is masked, so it changes no
    /// vector.
    pub pad_to: usize,
}

/// A BERT encoder with its pooling, ready to run on one device.
#[derive(Clone)]
pub struct Bert {
    spec: Arc<ModelSpec>,
    device: Device,
    /// `[vocab, hidden]`, host memory: the embedding lookup is a gather on the host.
    word_embeddings: Arc<WordTable>,
    /// `[max_positions, hidden]`: position embedding plus the token-type-0 embedding.
    position_embeddings: Arc<Vec<f32>>,
    embed_norm: LayerNorm,
    blocks: Vec<Block>,
    /// Run GELU on the host with the vectorised kernel (burn's CPU backend).
    host_gelu: bool,
    /// What the Linear layers, attention and GELU compute in; the residual stream,
    /// LayerNorm and pooling stay f32.
    compute: FloatDType,
}

impl Bert {
    /// Loads the encoder onto `device` with its Linear layers in `precision` (`f32`, or
    /// `f16` on a GPU).
    pub fn load(
        spec: Arc<ModelSpec>,
        weights: &mut WeightFile,
        device: &Device,
        host_gelu: bool,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let compute = dtype_of(precision);
        let eps = spec.layer_norm_eps;
        let embeddings = weights.embeddings(&spec)?;
        let mut blocks = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let w = weights.block(&spec, l)?;
            blocks.push(Block {
                qkv: Linear::new(w.qkv, device, compute),
                attn_out: Linear::new(w.attn_out, device, compute),
                attn_norm: LayerNorm::new(w.attn_norm, eps, device),
                up: Linear::new(w.up, device, compute),
                down: Linear::new(w.down, device, compute),
                out_norm: LayerNorm::new(w.out_norm, eps, device),
            });
        }
        Ok(Self {
            spec,
            device: device.clone(),
            word_embeddings: Arc::new(WordTable::F32(embeddings.words)),
            position_embeddings: Arc::new(embeddings.positions),
            embed_norm: LayerNorm::new(embeddings.norm, eps, device),
            blocks,
            host_gelu,
            compute,
        })
    }

    /// Bytes of the Linear layers' weights and biases (what a reduced precision shrinks).
    pub fn linear_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.qkv.bytes() + b.attn_out.bytes() + b.up.bytes() + b.down.bytes())
            .sum()
    }

    /// Bytes of every weight the encoder holds: the word and position tables, the Linear
    /// layers, the LayerNorms.
    pub fn weight_bytes(&self) -> usize {
        let norms = (1 + 2 * self.blocks.len()) * 2 * self.spec.hidden_size * 4;
        self.word_embeddings.bytes()
            + self.position_embeddings.len() * 4
            + self.linear_bytes()
            + norms
    }

    /// Pooled, not yet normalised sentence vectors of a batch: `rows × hidden`, row-major.
    ///
    /// Rows may have different lengths; each is padded to the longest and the padding is
    /// masked out of attention and pooling. Every id must be below `vocab_size` and every
    /// row at most `max_seq_length` long (the tokenizer guarantees both).
    pub fn forward(&self, batch: &TokenBatch<'_>) -> Vec<f32> {
        let spec = &*self.spec;
        let (h, heads, dh) = (spec.hidden_size, spec.num_heads, spec.head_dim());
        let b = batch.rows.len();
        let longest = batch.rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if b == 0 || longest == 0 {
            return Vec::new();
        }
        let t = longest
            .max(batch.pad_to)
            .min(self.position_embeddings.len() / h);
        let n = b * t;

        // Embeddings, gathered on the host. Padded positions get the position embedding
        // only; they are masked everywhere that matters.
        let mut x0 = vec![0.0f32; n * h];
        for (r, ids) in batch.rows.iter().enumerate() {
            for (p, out) in x0[r * t * h..(r + 1) * t * h]
                .chunks_exact_mut(h)
                .enumerate()
            {
                let pos = &self.position_embeddings[p * h..(p + 1) * h];
                match ids.get(p) {
                    Some(&id) => {
                        self.word_embeddings.add_row(id as usize, pos, out);
                    }
                    None => out.copy_from_slice(pos),
                }
            }
        }
        let mut x = self
            .embed_norm
            .forward(Tensor::from_data(TensorData::new(x0, [n, h]), &self.device));

        // Key-padding mask, true where the key is padding; broadcast over heads.
        let mut mask = vec![false; b * t * t];
        let mut keep = vec![0.0f32; n];
        for (r, ids) in batch.rows.iter().enumerate() {
            for q in 0..t {
                mask[(r * t + q) * t + ids.len()..(r * t + q + 1) * t].fill(true);
            }
            keep[r * t..r * t + ids.len()].fill(1.0);
        }
        let mask: Tensor<4, Bool> =
            Tensor::from_data(TensorData::new(mask, [b, 1, t, t]), &self.device);

        let (f32, compute) = (FloatDType::F32, self.compute);
        for block in &self.blocks {
            let qkv = block
                .qkv
                .forward(x.clone().cast(compute))
                .reshape([b, t, 3 * heads, dh])
                .swap_dims(1, 2);
            let q = qkv.clone().narrow(1, 0, heads);
            let k = qkv.clone().narrow(1, heads, heads);
            let v = qkv.narrow(1, 2 * heads, heads);
            let ctx = attention(
                q,
                k,
                v,
                Some(mask.clone()),
                None,
                AttentionModuleOptions::default(),
            )
            .swap_dims(1, 2)
            .reshape([n, h]);
            x = block
                .attn_norm
                .forward(block.attn_out.forward(ctx).cast(f32) + x);
            let up = block.up.forward(x.clone().cast(compute));
            let act = if self.host_gelu {
                gelu::gelu_tensor(up, &self.device)
            } else {
                activation::gelu(up)
            };
            x = block
                .out_norm
                .forward(block.down.forward(act).cast(f32) + x);
        }

        let x = x.reshape([b, t, h]);
        let pooled = match spec.pooling {
            Pooling::Cls => x.narrow(1, 0, 1).reshape([b, h]),
            Pooling::Mean => {
                let lens: Vec<f32> = batch.rows.iter().map(|r| 1.0 / r.len() as f32).collect();
                let keep: Tensor<3> =
                    Tensor::from_data(TensorData::new(keep, [b, t, 1]), &self.device);
                let inv: Tensor<2> = Tensor::from_data(TensorData::new(lens, [b, 1]), &self.device);
                (x * keep).sum_dim(1).reshape([b, h]) * inv
            }
        };
        pooled
            .into_data()
            .try_into_vec::<f32>()
            .expect("the model computes in f32")
    }
}

#[cfg(test)]
mod tests {
    use super::outlier_channels;

    #[test]
    fn outlier_channels_are_the_largest_in_channel_order() {
        let mut maxima = vec![1.0f32; 64];
        maxima[40] = 28.0;
        maxima[3] = 9.0;
        maxima[63] = 9.0;
        maxima[10] = 2.0;
        assert_eq!(outlier_channels(&maxima, 3), vec![3, 40, 63]);
        // Ties broken by channel; never more than an eighth of the inputs.
        assert_eq!(
            outlier_channels(&maxima, 100),
            vec![0, 1, 2, 3, 4, 10, 40, 63]
        );
        assert!(outlier_channels(&maxima[..7], 8).is_empty());
        assert!(outlier_channels(&[], 8).is_empty());
    }
}
