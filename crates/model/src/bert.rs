//! The BERT encoder and pooling, on burn tensors.
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
//! - on the CPU backend GELU is [`super::gelu`]'s vectorised exact-erf kernel, run in
//!   parallel; other backends use burn's `gelu`.
//!
//! Tensors are reference-counted: cloning a [`Bert`] shares its weights, which is how
//! several worker threads each get a replica without copying 90 MB.

use std::sync::Arc;

use burn::tensor::activation;
use burn::tensor::module::{attention, layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, FloatDType, Tensor, TensorData};

use super::ModelError;
use super::device::Precision;
use super::gelu;
use super::kernels::bf16::Bf16Linear;
use super::kernels::int8::Int8Linear;
use super::spec::{ModelSpec, Pooling};
use super::weights::WeightFile;

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
    fn index(self) -> usize {
        self as usize
    }
}

/// Input channels of each int8 Linear layer computed in f32 beside the int8 product: the
/// channels that reached the largest magnitudes over the calibration texts. MiniLM's
/// LayerNorm outputs carry four channels up to 16× the typical channel's maximum; eight
/// cover them and the GELU outputs' largest. On the 2 000 variant texts of
/// `scripts/bench-model.sh` eight lift int8's neighbour recall@10 from 0.93 to 0.96, for
/// about 2 % of a layer's multiplies in f32 (docs/BENCHMARKS.md).
const OUTLIER_CHANNELS: usize = 8;

/// The `count` channels of `maxima` with the largest values (fewer if the layer is
/// narrow: at most an eighth of its inputs).
fn outlier_channels(maxima: &[f32], count: usize) -> Vec<usize> {
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

/// A Linear layer: burn's matmul on the device, or one of the host kernels.
#[derive(Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "four per block, made once at load: their size is immaterial"
)]
enum Linear {
    Device {
        /// `[in, out]`
        weight: Tensor<2>,
        bias: Tensor<1>,
    },
    Int8(Arc<Int8Linear>),
    Bf16(Arc<Bf16Linear>),
}

impl Linear {
    /// `weight` is `[inp, out]`, row-major. `precision`: `f32`/`f16` run on the device in
    /// that dtype; `int8` and `bf16` on the host kernels (CPU backend only).
    fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        inp: usize,
        out: usize,
        device: &Device,
        precision: Precision,
    ) -> Self {
        match precision {
            Precision::Int8 => Self::Int8(Arc::new(Int8Linear::quantize(&weight, &bias, inp, out))),
            Precision::Bf16 => Self::Bf16(Arc::new(Bf16Linear::round(&weight, &bias, inp, out))),
            Precision::F32 | Precision::F16 => {
                let dtype = dtype_of(precision);
                Self::Device {
                    weight: on_device(TensorData::new(weight, [inp, out]), device, dtype),
                    bias: on_device(TensorData::new(bias, [out]), device, dtype),
                }
            }
        }
    }

    fn load(
        w: &mut WeightFile,
        name: &str,
        inp: usize,
        out: usize,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let weight = w.get_linear_weight(&format!("{name}.weight"), out, inp)?;
        let bias = w.get(&format!("{name}.bias"), &[out])?;
        Ok(Self::new(weight, bias, inp, out, device, precision))
    }

    /// Q, K and V stacked into one `[in, 3·out]` layer.
    fn load_fused(
        w: &mut WeightFile,
        names: [&str; 3],
        inp: usize,
        out: usize,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let mut weight = vec![0.0f32; inp * 3 * out];
        let mut bias = Vec::with_capacity(3 * out);
        for (part, name) in names.iter().enumerate() {
            let wt = w.get_linear_weight(&format!("{name}.weight"), out, inp)?;
            for i in 0..inp {
                weight[i * 3 * out + part * out..i * 3 * out + (part + 1) * out]
                    .copy_from_slice(&wt[i * out..(i + 1) * out]);
            }
            bias.extend(w.get(&format!("{name}.bias"), &[out])?);
        }
        Ok(Self::new(weight, bias, inp, 3 * out, device, precision))
    }

    /// This layer in int8 with `outliers` in f32 (a device layer's weights read back);
    /// host layers are returned as they are.
    fn quantized(&self, outliers: &[usize]) -> Self {
        match self {
            Self::Device { weight, bias } => {
                let [inp, out] = weight.dims();
                let read = |t: Tensor<2>| {
                    t.cast(FloatDType::F32)
                        .into_data()
                        .try_into_vec::<f32>()
                        .expect("cast to f32")
                };
                let weight = read(weight.clone());
                let bias = read(bias.clone().reshape([1, out]));
                Self::Int8(Arc::new(Int8Linear::quantize_with_outliers(
                    &weight, &bias, inp, out, outliers,
                )))
            }
            host => host.clone(),
        }
    }

    /// `x · W + b`. Device layers compute in the weights' dtype (`x` in it already); host
    /// layers take and return f32 tensors in host memory.
    fn forward(&self, x: Tensor<2>, device: &Device) -> Tensor<2> {
        match self {
            Self::Device { weight, bias } => linear(x, weight.clone(), Some(bias.clone())),
            Self::Int8(l) => on_host(x, l.outputs(), device, |x, rows, y| l.forward(x, rows, y)),
            Self::Bf16(l) => on_host(x, l.outputs(), device, |x, rows, y| l.forward(x, rows, y)),
        }
    }

    /// `gelu(x · W + b)`: on host layers GELU runs on the kernel's output before it becomes
    /// a tensor (one pass over memory fewer); on device layers, `gelu` after.
    fn forward_gelu(
        &self,
        x: Tensor<2>,
        device: &Device,
        on_device: impl Fn(Tensor<2>) -> Tensor<2>,
    ) -> Tensor<2> {
        match self {
            Self::Device { .. } => on_device(self.forward(x, device)),
            Self::Int8(l) => on_host(x, l.outputs(), device, |x, rows, y| {
                l.forward(x, rows, y);
                gelu::gelu_in_place(y);
            }),
            Self::Bf16(l) => on_host(x, l.outputs(), device, |x, rows, y| {
                l.forward(x, rows, y);
                gelu::gelu_in_place(y);
            }),
        }
    }

    /// Bytes of weights and biases.
    fn bytes(&self) -> usize {
        match self {
            Self::Device { weight, bias } => {
                let elem = weight.dtype().size();
                (weight.shape().num_elements() + bias.shape().num_elements()) * elem
            }
            Self::Int8(l) => l.bytes(),
            Self::Bf16(l) => l.bytes(),
        }
    }
}

/// Runs a host kernel on `x` (`rows × in`, f32 in host memory) into a new `rows × out`
/// tensor.
fn on_host(
    x: Tensor<2>,
    out: usize,
    device: &Device,
    kernel: impl Fn(&[f32], usize, &mut [f32]),
) -> Tensor<2> {
    let [rows, _] = x.dims();
    let data = x.into_data();
    let input = data.as_slice::<f32>().expect("host layers take f32");
    let mut y = vec![0.0f32; rows * out];
    kernel(input, rows, &mut y);
    Tensor::from_data(TensorData::new(y, [rows, out]), device)
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
    fn load(
        w: &mut WeightFile,
        name: &str,
        width: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let gamma = w.get(&format!("{name}.weight"), &[width])?;
        let beta = w.get(&format!("{name}.bias"), &[width])?;
        Ok(Self {
            gamma: Tensor::from_data(TensorData::new(gamma, [width]), device),
            beta: Tensor::from_data(TensorData::new(beta, [width]), device),
            eps,
        })
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

impl Block {
    fn linear_mut(&mut self, role: LinearRole) -> &mut Linear {
        match role {
            LinearRole::Qkv => &mut self.qkv,
            LinearRole::AttnOut => &mut self.attn_out,
            LinearRole::Up => &mut self.up,
            LinearRole::Down => &mut self.down,
        }
    }
}

/// The word-embedding table (30 522 × 384 for MiniLM: 47 MB in f32, the largest tensor).
/// An int8 model keeps it in int8 with one scale per 32 values of a row (13 MB; one scale
/// per row lost a measurable 0.003 of min cosine on the reference texts): a row is
/// dequantized when gathered, before the embedding LayerNorm.
enum WordTable {
    F32(Vec<f32>),
    Int8 { values: Vec<i8>, scales: Vec<f32> },
}

/// Values of a word-table row sharing one int8 scale.
const WORD_GROUP: usize = 32;

impl WordTable {
    fn int8(table: &[f32], width: usize) -> Self {
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
    fn add_row(&self, id: usize, pos: &[f32], out: &mut [f32]) {
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

    fn bytes(&self) -> usize {
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
    /// Run GELU on the host with the vectorised kernel (CPU backend only).
    host_gelu: bool,
    /// What the Linear layers, attention and GELU compute in; the residual stream,
    /// LayerNorm and pooling stay f32.
    compute: FloatDType,
}

impl Bert {
    /// Loads the encoder with its Linear layers in `precision`, except `overrides`.
    ///
    /// int8 layers are calibrated: the model first loads in f32 and runs `calibration`
    /// (token rows, one per pass), and each int8 layer keeps the input channels that
    /// reached the largest magnitudes in f32 ([`OUTLIER_CHANNELS`]); then its weights are
    /// quantized and the f32 copy dropped.
    pub fn load(
        spec: Arc<ModelSpec>,
        weights: &mut WeightFile,
        device: &Device,
        host_gelu: bool,
        precision: Precision,
        overrides: &[LayerPrecision],
        calibration: &[Vec<u32>],
    ) -> Result<Self, ModelError> {
        let of = |layer: usize, role: LinearRole| {
            overrides
                .iter()
                .rev()
                .find(|o| o.layer == layer && o.role == role)
                .map_or(precision, |o| o.precision)
        };
        let int8 = |layer: usize, role: LinearRole| of(layer, role) == Precision::Int8;
        let mut bert = Self::load_layers(spec, weights, device, host_gelu, precision, |l, r| {
            if int8(l, r) { Precision::F32 } else { of(l, r) }
        })?;
        let layers = bert.blocks.len();
        if (0..layers).any(|l| LinearRole::ALL.iter().any(|&r| int8(l, r))) {
            let maxima = bert.input_maxima(calibration);
            for (l, block) in bert.blocks.iter_mut().enumerate() {
                for role in LinearRole::ALL.into_iter().filter(|&r| int8(l, r)) {
                    let outliers = maxima
                        .get(l)
                        .map(|m| outlier_channels(&m[role.index()], OUTLIER_CHANNELS))
                        .unwrap_or_default();
                    let linear = block.linear_mut(role);
                    *linear = linear.quantized(&outliers);
                }
            }
        }
        if precision == Precision::Int8
            && let WordTable::F32(table) = &*bert.word_embeddings
        {
            bert.word_embeddings = Arc::new(WordTable::int8(table, bert.spec.hidden_size));
        }
        Ok(bert)
    }

    /// The encoder with each Linear layer in `of(layer, role)`'s precision, the word
    /// table in f32.
    fn load_layers(
        spec: Arc<ModelSpec>,
        weights: &mut WeightFile,
        device: &Device,
        host_gelu: bool,
        precision: Precision,
        of: impl Fn(usize, LinearRole) -> Precision,
    ) -> Result<Self, ModelError> {
        let compute = dtype_of(precision);
        let h = spec.hidden_size;
        let word = weights.get("embeddings.word_embeddings.weight", &[spec.vocab_size, h])?;
        let mut pos = weights.get(
            "embeddings.position_embeddings.weight",
            &[spec.max_position_embeddings, h],
        )?;
        let types = weights.get(
            "embeddings.token_type_embeddings.weight",
            &[spec.type_vocab_size, h],
        )?;
        for row in pos.chunks_exact_mut(h) {
            for (p, t) in row.iter_mut().zip(&types[..h]) {
                *p += *t;
            }
        }
        let embed_norm = LayerNorm::load(
            weights,
            "embeddings.LayerNorm",
            h,
            spec.layer_norm_eps,
            device,
        )?;
        let mut blocks = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let p = format!("encoder.layer.{l}");
            blocks.push(Block {
                qkv: Linear::load_fused(
                    weights,
                    [
                        &format!("{p}.attention.self.query"),
                        &format!("{p}.attention.self.key"),
                        &format!("{p}.attention.self.value"),
                    ],
                    h,
                    h,
                    device,
                    of(l, LinearRole::Qkv),
                )?,
                attn_out: Linear::load(
                    weights,
                    &format!("{p}.attention.output.dense"),
                    h,
                    h,
                    device,
                    of(l, LinearRole::AttnOut),
                )?,
                attn_norm: LayerNorm::load(
                    weights,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    spec.layer_norm_eps,
                    device,
                )?,
                up: Linear::load(
                    weights,
                    &format!("{p}.intermediate.dense"),
                    h,
                    spec.intermediate_size,
                    device,
                    of(l, LinearRole::Up),
                )?,
                down: Linear::load(
                    weights,
                    &format!("{p}.output.dense"),
                    spec.intermediate_size,
                    h,
                    device,
                    of(l, LinearRole::Down),
                )?,
                out_norm: LayerNorm::load(
                    weights,
                    &format!("{p}.output.LayerNorm"),
                    h,
                    spec.layer_norm_eps,
                    device,
                )?,
            });
        }
        Ok(Self {
            spec,
            device: device.clone(),
            word_embeddings: Arc::new(WordTable::F32(word)),
            position_embeddings: Arc::new(pos),
            embed_norm,
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
        self.forward_observed(batch, |_, _, _| {})
    }

    /// For each block and Linear layer, the largest magnitude each input channel reached
    /// over `texts`, run one per pass (so that no padded position counts). Empty when
    /// `texts` is.
    fn input_maxima(&self, texts: &[Vec<u32>]) -> Vec<[Vec<f32>; 4]> {
        let mut maxima: Vec<[Vec<f32>; 4]> = Vec::new();
        for ids in texts.iter().filter(|ids| !ids.is_empty()) {
            let rows = [ids.as_slice()];
            let batch = TokenBatch {
                rows: &rows,
                pad_to: 0,
            };
            self.forward_observed(&batch, |layer, role, x| {
                let seen = x
                    .clone()
                    .abs()
                    .max_dim(0)
                    .into_data()
                    .try_into_vec::<f32>()
                    .expect("activations are f32");
                if maxima.len() <= layer {
                    maxima.resize_with(layer + 1, Default::default);
                }
                let kept = &mut maxima[layer][role.index()];
                if kept.is_empty() {
                    *kept = seen;
                } else {
                    for (k, s) in kept.iter_mut().zip(seen) {
                        *k = k.max(s);
                    }
                }
            });
        }
        maxima
    }

    /// [`Self::forward`], showing `observe` each Linear layer's input (`tokens × in`).
    fn forward_observed(
        &self,
        batch: &TokenBatch<'_>,
        mut observe: impl FnMut(usize, LinearRole, &Tensor<2>),
    ) -> Vec<f32> {
        let spec = &*self.spec;
        let (h, heads, dh) = (spec.hidden_size, spec.num_heads, spec.head_dim());
        let b = batch.rows.len();
        let longest = batch.rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if b == 0 || longest == 0 {
            return Vec::new();
        }
        let t = longest.max(batch.pad_to).min(spec.max_position_embeddings);
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
        for (l, block) in self.blocks.iter().enumerate() {
            observe(l, LinearRole::Qkv, &x);
            let qkv = block
                .qkv
                .forward(x.clone().cast(compute), &self.device)
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
            observe(l, LinearRole::AttnOut, &ctx);
            x = block
                .attn_norm
                .forward(block.attn_out.forward(ctx, &self.device).cast(f32) + x);
            observe(l, LinearRole::Up, &x);
            let act = block
                .up
                .forward_gelu(x.clone().cast(compute), &self.device, |up| {
                    if self.host_gelu {
                        gelu::gelu_tensor(up, &self.device)
                    } else {
                        activation::gelu(up)
                    }
                });
            observe(l, LinearRole::Down, &act);
            x = block
                .out_norm
                .forward(block.down.forward(act, &self.device).cast(f32) + x);
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
