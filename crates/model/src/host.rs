//! The CPU forward pass: the BERT encoder on Keel's own host kernels, in memory it owns.
//!
//! burn runs the GPU backends and is the reference this pass is tested against
//! (`tests/model.rs`); on the CPU, a pass of burn's tensors spent most of its time outside
//! the matrix products: copies into and out of tensors around each host kernel, `swap_dims`
//! before and after attention, a separate pass over memory for each of bias, GELU, residual
//! and LayerNorm, and padding every row to the longest. This pass instead:
//!
//! - runs **ragged**: the rows of a pass are concatenated, so Linear layers compute only
//!   real tokens (no padding at all) and a row's tokens attend only to each other;
//! - keeps its activations in a [`Workspace`] of a few flat buffers that grow to the
//!   largest pass seen and are reused: once warm, a pass allocates nothing but its output;
//! - hands those buffers to the kernels directly (`&[f32]` in, `&mut [f32]` out), in
//!   blocks of [`ROWS_PER_TASK`] rows (twice that on AMX tiles), and finishes each block
//!   while it is in cache:
//!   bias (in the kernel), residual + LayerNorm after the attention output, and the whole
//!   feed-forward (up-projection, GELU, down-projection, residual + LayerNorm) one block
//!   at a time, its activations in a buffer of each thread's (no `tokens × intermediate`
//!   array between the two projections: on large passes that array outgrew the caches);
//! - computes attention per (row, head) in one pass: QKᵀ, softmax and ·V for each query
//!   in a few cache lines, reading Q, K and V in place in the fused QKV output.
//!
//! Each Linear layer computes in its own precision ([`HostLinear`]: f32, bf16 or int8);
//! everything else is f32. Blocks of rows and (row, head) pairs run in parallel on the
//! current rayon pool; a row's result never depends on the rows beside it.

use std::cell::RefCell;
use std::sync::Arc;

use rayon::prelude::*;

use super::bert::{LayerPrecision, LinearRole, TokenBatch, WordTable, outlier_channels};
use super::device::Precision;
use super::gelu;
use super::kernels::bf16::Bf16Linear;
use super::kernels::bf16x3::{Bf16x3Linear, f32_on_tiles};
use super::kernels::f32::F32Linear;
use super::kernels::int8::Int8Linear;
use super::kernels::{Isa, ROWS_PER_TASK, Scratch};
use super::spec::{ModelSpec, Pooling};
use super::weights::{LinearWeights, NormWeights, WeightFile};
use crate::error::ModelError;

/// Input channels of each int8 layer computed in f32 beside the int8 product (see
/// [`crate::bert`]'s calibration notes).
const OUTLIER_CHANNELS: usize = 8;

thread_local! {
    /// Each thread's packing and quantization buffers for the kernels.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// Each thread's attention buffers (one query's scores, one head's keys transposed).
    static ATTENTION: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's feed-forward activations for one block of rows (`rows × intermediate`,
    /// [`HostLinear::rows_per_task`]).
    static FEED_FORWARD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Compiles `$body` for AVX-512, for AVX2 + FMA and for the baseline, and runs the best
/// form this CPU has: the same scalar code, vectorised by the compiler for each.
macro_rules! widest {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn plain($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) {
                    plain($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn half($($arg: $ty),*) {
                    plain($($arg),*)
                }
                use $crate::kernels::{Isa, allows};
                if allows(Isa::Avx512) && std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512 F.
                    return unsafe { wide($($arg),*) };
                }
                if allows(Isa::Avx2)
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { half($($arg),*) };
                }
            }
            plain($($arg),*)
        }
    };
}

mod attention;

use attention::{attend, attention_buffer};

/// What a Linear layer computes in when a model is loaded in `precision` (no override):
/// `precision`, except in int8 the fused Q·K·V projection of the last third of the layers,
/// which stays in bf16. Its error passes through the softmax, and the deepest layers'
/// was the largest of any layer alone in int8 (docs/BENCHMARKS.md, the per-layer table);
/// on MiniLM (layers 4 and 5) this lifts neighbour recall@10 from 0.969 to 0.972 for ~6 %
/// of int8's speed.
fn planned(precision: Precision, layer: usize, role: LinearRole, layers: usize) -> Precision {
    let deep = layer >= layers - layers.div_ceil(3);
    if precision == Precision::Int8 && role == LinearRole::Qkv && deep {
        Precision::Bf16
    } else {
        precision
    }
}

/// A Linear layer on one of the host kernels.
pub enum HostLinear {
    F32(F32Linear),
    /// f32 accuracy on the bf16 kernels (AMX CPUs).
    Bf16x3(Bf16x3Linear),
    Bf16(Bf16Linear),
    Int8(Int8Linear),
}

impl HostLinear {
    /// `w` in `precision` (`f32`, `bf16` or `int8` with `outliers` kept in f32).
    fn new(w: &LinearWeights, precision: Precision, outliers: &[usize]) -> Self {
        let (weight, bias, k, n) = (&w.weight, &w.bias, w.inputs, w.outputs);
        match precision {
            Precision::Int8 => Self::Int8(Int8Linear::quantize_with_outliers(
                weight, bias, k, n, outliers,
            )),
            Precision::Bf16 => Self::Bf16(Bf16Linear::round(weight, bias, k, n)),
            Precision::F32 | Precision::F16 if f32_on_tiles() => {
                Self::Bf16x3(Bf16x3Linear::split(weight, bias, k, n))
            }
            Precision::F32 | Precision::F16 => Self::exact_f32(w),
        }
    }

    /// `w` on the f32 FMA kernels, whatever `precision: f32` runs elsewhere: what int8
    /// calibration measures and quantizes from.
    fn exact_f32(w: &LinearWeights) -> Self {
        Self::F32(F32Linear::pack(&w.weight, &w.bias, w.inputs, w.outputs))
    }

    /// Rows each rayon task multiplies: twice [`ROWS_PER_TASK`] on AMX tiles. A task
    /// reads the layer's weights once (MiniLM's feed-forward layers: 1.2 MB in bf16, from
    /// L3), and at the tiles' rate (~1.7 T multiply-adds/s a core) 64 rows of products
    /// take about as long as that read (~54 GB/s a core); 128 rows halve its share. The
    /// vector kernels multiply ~10× slower, and 64 rows keep more tasks for the threads.
    fn rows_per_task(&self) -> usize {
        let isa = match self {
            Self::F32(l) => l.isa(),
            Self::Bf16x3(l) => l.isa(),
            Self::Bf16(l) => l.isa(),
            Self::Int8(l) => l.isa(),
        };
        if isa == Isa::Amx {
            2 * ROWS_PER_TASK
        } else {
            ROWS_PER_TASK
        }
    }

    fn inputs(&self) -> usize {
        match self {
            Self::F32(l) => l.inputs(),
            Self::Bf16x3(l) => l.inputs(),
            Self::Bf16(l) => l.inputs(),
            Self::Int8(l) => l.inputs(),
        }
    }

    fn outputs(&self) -> usize {
        match self {
            Self::F32(l) => l.outputs(),
            Self::Bf16x3(l) => l.outputs(),
            Self::Bf16(l) => l.outputs(),
            Self::Int8(l) => l.outputs(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F32(l) => l.bytes(),
            Self::Bf16x3(l) => l.bytes(),
            Self::Bf16(l) => l.bytes(),
            Self::Int8(l) => l.bytes(),
        }
    }

    /// `out = x · W + b` for one block of rows on this thread.
    fn block(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        match self {
            Self::F32(l) => l.block(x, out, scratch),
            Self::Bf16x3(l) => l.block(x, out, scratch),
            Self::Bf16(l) => l.block(x, out, scratch),
            Self::Int8(l) => l.block(x, out, scratch),
        }
    }

    /// The weights back as `inputs × outputs` f32 (an f32 layer only: what calibration
    /// quantizes from).
    fn f32_weights(&self) -> Option<LinearWeights> {
        match self {
            Self::F32(l) => {
                let (weight, bias) = l.unpacked();
                Some(LinearWeights {
                    weight,
                    bias,
                    inputs: l.inputs(),
                    outputs: l.outputs(),
                })
            }
            _ => None,
        }
    }

    /// `out = epilogue(x · W + b)` over all rows, a block of [`Self::rows_per_task`] rows
    /// per rayon task; `epilogue` gets each block's output rows while they are in cache.
    fn forward(&self, x: &[f32], out: &mut [f32], epilogue: impl Fn(&mut [f32]) + Sync + Send) {
        let (k, n, rows) = (self.inputs(), self.outputs(), self.rows_per_task());
        debug_assert_eq!(x.len() / k, out.len() / n);
        out.par_chunks_mut(rows * n)
            .zip(x.par_chunks(rows * k))
            .for_each(|(out, x)| {
                SCRATCH.with_borrow_mut(|scratch| self.block(x, out, scratch));
                epilogue(out);
            });
    }
}

/// A LayerNorm over rows of `gamma.len()` values.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new(w: NormWeights, eps: f64) -> Self {
        Self {
            gamma: w.gamma,
            beta: w.beta,
            eps: eps as f32,
        }
    }

    /// Normalises every row of `rows` in place.
    fn rows(&self, rows: &mut [f32]) {
        layer_norm(rows, &self.gamma, &self.beta, self.eps);
    }

    /// `x = LayerNorm(y + x)` row by row.
    fn residual(&self, y: &[f32], x: &mut [f32]) {
        add_layer_norm(y, x, &self.gamma, &self.beta, self.eps);
    }
}

widest! {
    fn layer_norm(rows: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        for row in rows.chunks_exact_mut(gamma.len()) {
            normalise(row, gamma, beta, eps);
        }
    }
}

widest! {
    fn add_layer_norm(y: &[f32], x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let h = gamma.len();
        for (x, y) in x.chunks_exact_mut(h).zip(y.chunks_exact(h)) {
            for (x, y) in x.iter_mut().zip(y) {
                *x += *y;
            }
            normalise(x, gamma, beta, eps);
        }
    }
}

/// `(x − mean) / √(var + eps) · γ + β` over one row, mean and variance in two passes
/// (sums of 16 running lanes, so the compiler vectorises them).
#[inline(always)]
fn normalise(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let h = x.len() as f32;
    let mean = lanes_sum(x, |v| v) / h;
    let var = lanes_sum(x, |v| (v - mean) * (v - mean)) / h;
    let inv = 1.0 / (var + eps).sqrt();
    for ((x, g), b) in x.iter_mut().zip(gamma).zip(beta) {
        *x = (*x - mean) * inv * g + b;
    }
}

#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` for `x ≤ 0` (softmax after its maximum is subtracted), relative error < 2e-7, 0
/// below −87:
/// `x = n·ln 2 + r`, Cephes' polynomial for `e^r` on `|r| ≤ ln 2 / 2`, `2^n` built in the
/// exponent bits. Plain arithmetic, so loops over it vectorise.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let tiny = x < -87.0;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // Below e^-87 (f32's smallest normal), and −∞ (a masked score): exactly 0.
    if tiny {
        0.0
    } else {
        y * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
}

#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let mut max = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        max = if v > max { v } else { max };
    }
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = if v > *l { v } else { *l };
        }
    }
    lanes
        .into_iter()
        .fold(max, |m, v| if v > m { v } else { m })
}

/// Runs `f(row, qkv rows, ctx rows)` for every row of a ragged pass (`starts[r]..starts[r
/// + 1]` its tokens), splitting the buffers between rayon tasks without allocating.
fn for_each_row(
    starts: &[usize],
    qkv: &[f32],
    ctx: &mut [f32],
    h: usize,
    f: &(impl Fn(&[f32], &mut [f32]) + Sync),
) {
    let rows = starts.len() - 1;
    if rows == 1 || rayon::current_num_threads() == 1 {
        let base = starts[0];
        for w in starts.windows(2) {
            let (a, b) = (w[0] - base, w[1] - base);
            f(&qkv[a * 3 * h..b * 3 * h], &mut ctx[a * h..b * h]);
        }
        return;
    }
    let mid = rows / 2;
    let split = starts[mid] - starts[0];
    let (qkv_a, qkv_b) = qkv.split_at(split * 3 * h);
    let (ctx_a, ctx_b) = ctx.split_at_mut(split * h);
    rayon::join(
        || for_each_row(&starts[..=mid], qkv_a, ctx_a, h, f),
        || for_each_row(&starts[mid..], qkv_b, ctx_b, h, f),
    );
}

struct Block {
    qkv: HostLinear,
    attn_out: HostLinear,
    attn_norm: Norm,
    up: HostLinear,
    down: HostLinear,
    out_norm: Norm,
}

impl Block {
    /// `x = LayerNorm(x + down(GELU(up(x))))` for one block of rows, its activations in
    /// this thread's buffer.
    fn feed_forward(&self, x: &mut [f32], y: &mut [f32]) {
        let tokens = x.len() / self.up.inputs();
        FEED_FORWARD.with_borrow_mut(|act| {
            let width = self.up.outputs();
            if act.len() < tokens * width {
                act.resize(tokens * width, 0.0);
            }
            let act = &mut act[..tokens * width];
            SCRATCH.with_borrow_mut(|scratch| {
                self.up.block(x, act, scratch);
                gelu::gelu_slice(act);
                self.down.block(act, y, scratch);
            });
            self.out_norm.residual(y, x);
        });
    }

    fn linear_mut(&mut self, role: LinearRole) -> &mut HostLinear {
        match role {
            LinearRole::Qkv => &mut self.qkv,
            LinearRole::AttnOut => &mut self.attn_out,
            LinearRole::Up => &mut self.up,
            LinearRole::Down => &mut self.down,
        }
    }
}

/// The activations of a pass: flat buffers, grown to the largest pass and kept.
#[derive(Default)]
pub struct Workspace {
    /// The residual stream, `tokens × hidden`.
    x: Vec<f32>,
    /// Fused QKV output, `tokens × 3·hidden`.
    qkv: Vec<f32>,
    /// Attention context, `tokens × hidden`.
    ctx: Vec<f32>,
    /// A Linear layer's output before its residual, `tokens × hidden`.
    y: Vec<f32>,
    /// The feed-forward's GELU output, `tokens × intermediate`, for calibration (which
    /// observes every layer's whole input); a pass runs the feed-forward a block of rows
    /// at a time in each thread's own buffer.
    act: Vec<f32>,
    /// Where each row's tokens start, and the end.
    starts: Vec<usize>,
}

impl Workspace {
    /// Grows the buffers to hold a pass of `tokens` tokens in `rows` rows (`whole_ffn`:
    /// the feed-forward's activations for every token too).
    fn reserve(&mut self, spec: &ModelSpec, rows: usize, tokens: usize, whole_ffn: bool) {
        let h = spec.hidden_size;
        let i = if whole_ffn { spec.intermediate_size } else { 0 };
        for (buffer, width) in [
            (&mut self.x, h),
            (&mut self.qkv, 3 * h),
            (&mut self.ctx, h),
            (&mut self.y, h),
            (&mut self.act, i),
        ] {
            if buffer.len() < tokens * width {
                buffer.resize(tokens * width, 0.0);
            }
        }
        self.starts.reserve(rows + 1);
    }

    /// Drops the buffers (the next pass grows them again); returns the bytes released.
    pub fn release(&mut self) -> usize {
        let bytes = self.bytes();
        *self = Self::default();
        bytes
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.x.capacity()
            + self.qkv.capacity()
            + self.ctx.capacity()
            + self.y.capacity()
            + self.act.capacity())
            * 4
            + self.starts.capacity() * size_of::<usize>()
    }
}

/// The BERT encoder on the host kernels, with its pooling. Shared (behind an `Arc`) by
/// every replica; each replica brings its own [`Workspace`].
pub struct HostEncoder {
    spec: Arc<ModelSpec>,
    words: WordTable,
    /// `max_positions × hidden`: position plus token-type-0 embedding.
    positions: Vec<f32>,
    embed_norm: Norm,
    blocks: Vec<Block>,
}

impl HostEncoder {
    /// Loads the encoder with its Linear layers in `precision`, except `overrides`.
    ///
    /// int8 layers are calibrated: the encoder first loads in f32 and runs `calibration`
    /// (token rows, one per pass), and each int8 layer keeps the input channels that
    /// reached the largest magnitudes in f32 ([`OUTLIER_CHANNELS`]); then its weights are
    /// quantized and the f32 layer dropped.
    pub fn load(
        spec: Arc<ModelSpec>,
        weights: &mut WeightFile,
        precision: Precision,
        overrides: &[LayerPrecision],
        calibration: &[Vec<u32>],
    ) -> Result<Self, ModelError> {
        let layers = spec.num_layers;
        let of = |layer: usize, role: LinearRole| {
            overrides
                .iter()
                .rev()
                .find(|o| o.layer == layer && o.role == role)
                .map_or_else(|| planned(precision, layer, role, layers), |o| o.precision)
        };
        let int8 = |l: usize, r: LinearRole| of(l, r) == Precision::Int8;
        let embeddings = weights.embeddings(&spec)?;
        let eps = spec.layer_norm_eps;
        let mut blocks = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let w = weights.block(&spec, l)?;
            // int8 layers load in exact f32 until calibration has run.
            let layer = |w: &LinearWeights, role| {
                if int8(l, role) {
                    HostLinear::exact_f32(w)
                } else {
                    HostLinear::new(w, of(l, role), &[])
                }
            };
            blocks.push(Block {
                qkv: layer(&w.qkv, LinearRole::Qkv),
                attn_out: layer(&w.attn_out, LinearRole::AttnOut),
                attn_norm: Norm::new(w.attn_norm, eps),
                up: layer(&w.up, LinearRole::Up),
                down: layer(&w.down, LinearRole::Down),
                out_norm: Norm::new(w.out_norm, eps),
            });
        }
        let mut encoder = Self {
            words: WordTable::F32(embeddings.words),
            positions: embeddings.positions,
            embed_norm: Norm::new(embeddings.norm, eps),
            blocks,
            spec,
        };
        let layers = encoder.blocks.len();
        if (0..layers).any(|l| LinearRole::ALL.iter().any(|&r| int8(l, r))) {
            let maxima = encoder.input_maxima(calibration);
            for (l, block) in encoder.blocks.iter_mut().enumerate() {
                for role in LinearRole::ALL.into_iter().filter(|&r| int8(l, r)) {
                    let outliers = maxima
                        .get(l)
                        .map(|m| outlier_channels(&m[role.index()], OUTLIER_CHANNELS))
                        .unwrap_or_default();
                    let linear = block.linear_mut(role);
                    if let Some(w) = linear.f32_weights() {
                        *linear = HostLinear::new(&w, Precision::Int8, &outliers);
                    }
                }
            }
        }
        if precision == Precision::Int8
            && let WordTable::F32(table) = &encoder.words
        {
            encoder.words = WordTable::int8(table, encoder.spec.hidden_size);
        }
        Ok(encoder)
    }

    /// Bytes of the Linear layers' weights and biases (what a reduced precision shrinks).
    pub fn linear_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.qkv.bytes() + b.attn_out.bytes() + b.up.bytes() + b.down.bytes())
            .sum()
    }

    /// Bytes of every weight held: the word and position tables, the Linear layers, the
    /// LayerNorms.
    pub fn weight_bytes(&self) -> usize {
        let norms = (1 + 2 * self.blocks.len()) * 2 * self.spec.hidden_size * 4;
        self.words.bytes() + self.positions.len() * 4 + self.linear_bytes() + norms
    }

    /// Grows `ws` for passes of up to `rows` rows and `tokens` tokens, so that the first
    /// passes do not allocate either.
    pub fn reserve(&self, ws: &mut Workspace, rows: usize, tokens: usize) {
        ws.reserve(&self.spec, rows, tokens, false);
    }

    /// Pooled, not yet normalised sentence vectors of a batch, `rows × hidden`, into
    /// `out` (cleared first). Every id must be below `vocab_size` and every row non-empty
    /// and at most `positions()` long (the tokenizer guarantees all three).
    pub fn forward(&self, batch: &TokenBatch<'_>, ws: &mut Workspace, out: &mut Vec<f32>) {
        self.forward_observed(batch, ws, out, None::<fn(usize, LinearRole, &[f32])>);
    }

    /// For each block and Linear layer, the largest magnitude each input channel reached
    /// over `texts`, run one per pass.
    fn input_maxima(&self, texts: &[Vec<u32>]) -> Vec<[Vec<f32>; 4]> {
        let mut maxima: Vec<[Vec<f32>; 4]> = Vec::new();
        let (mut ws, mut out) = (Workspace::default(), Vec::new());
        for ids in texts.iter().filter(|ids| !ids.is_empty()) {
            let rows = [ids.as_slice()];
            let batch = TokenBatch {
                rows: &rows,
                pad_to: 0,
            };
            self.forward_observed(
                &batch,
                &mut ws,
                &mut out,
                Some(|layer: usize, role: LinearRole, x: &[f32]| {
                    if maxima.len() <= layer {
                        maxima.resize_with(layer + 1, Default::default);
                    }
                    let kept = &mut maxima[layer][role.index()];
                    let width = x.len() / ids.len();
                    if kept.is_empty() {
                        kept.resize(width, 0.0);
                    }
                    for row in x.chunks_exact(width) {
                        for (k, v) in kept.iter_mut().zip(row) {
                            *k = k.max(v.abs());
                        }
                    }
                }),
            );
        }
        maxima
    }

    /// [`Self::forward`], showing `observe` each Linear layer's input (`tokens × in`).
    /// Without an observer the feed-forward runs a block of rows at a time, up-projection,
    /// GELU, down-projection and residual + LayerNorm while the block's activations are in
    /// cache (a row's result does not depend on the rows beside it, so both ways compute
    /// the same vectors).
    fn forward_observed(
        &self,
        batch: &TokenBatch<'_>,
        ws: &mut Workspace,
        out: &mut Vec<f32>,
        mut observe: Option<impl FnMut(usize, LinearRole, &[f32])>,
    ) {
        let spec = &*self.spec;
        let (h, heads, inter) = (spec.hidden_size, spec.num_heads, spec.intermediate_size);
        out.clear();
        let longest = batch.rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if batch.rows.is_empty() || longest == 0 {
            return;
        }
        let longest = longest.min(spec.positions());
        let tokens: usize = batch
            .rows
            .iter()
            .map(|r| r.len().min(spec.positions()))
            .sum();
        ws.reserve(spec, batch.rows.len(), tokens, observe.is_some());
        ws.starts.clear();
        ws.starts.push(0);
        for r in batch.rows {
            let end = ws.starts[ws.starts.len() - 1] + r.len().min(spec.positions());
            ws.starts.push(end);
        }
        let Workspace {
            x,
            qkv,
            ctx,
            y,
            act,
            starts,
        } = ws;
        let (x, qkv, ctx, y) = (
            &mut x[..tokens * h],
            &mut qkv[..tokens * 3 * h],
            &mut ctx[..tokens * h],
            &mut y[..tokens * h],
        );

        // Embeddings: word + position (+ type 0) rows, then LayerNorm.
        for (ids, w) in batch.rows.iter().zip(starts.windows(2)) {
            for (p, (&id, row)) in ids
                .iter()
                .zip(x[w[0] * h..w[1] * h].chunks_exact_mut(h))
                .enumerate()
            {
                let pos = &self.positions[p * h..(p + 1) * h];
                self.words.add_row(id as usize, pos, row);
            }
        }
        x.par_chunks_mut(ROWS_PER_TASK * h)
            .for_each(|rows| self.embed_norm.rows(rows));

        let buffer = attention_buffer(longest, h / heads);
        let whole_ffn = observe.is_some();
        let mut observe = |l: usize, role: LinearRole, x: &[f32]| {
            if let Some(observe) = observe.as_mut() {
                observe(l, role, x);
            }
        };
        for (l, block) in self.blocks.iter().enumerate() {
            observe(l, LinearRole::Qkv, x);
            block.qkv.forward(x, qkv, |_| {});
            for_each_row(starts, qkv, ctx, h, &|qkv, ctx| {
                ATTENTION.with_borrow_mut(|b| {
                    if b.len() < buffer {
                        b.resize(buffer, 0.0);
                    }
                    attend(qkv, ctx, h, heads, b);
                })
            });
            observe(l, LinearRole::AttnOut, ctx);
            block.attn_out.forward(ctx, y, |_| {});
            residual_norm(&block.attn_norm, y, x);
            if whole_ffn {
                let act = &mut act[..tokens * inter];
                observe(l, LinearRole::Up, x);
                block.up.forward(x, act, gelu::gelu_slice);
                observe(l, LinearRole::Down, act);
                block.down.forward(act, y, |_| {});
                residual_norm(&block.out_norm, y, x);
            } else {
                let rows = block.up.rows_per_task();
                x.par_chunks_mut(rows * h)
                    .zip(y.par_chunks_mut(rows * h))
                    .for_each(|(x, y)| block.feed_forward(x, y));
            }
        }

        out.resize(batch.rows.len() * h, 0.0);
        for (w, v) in starts.windows(2).zip(out.chunks_exact_mut(h)) {
            let rows = &x[w[0] * h..w[1] * h];
            match spec.pooling {
                Pooling::Cls => v.copy_from_slice(&rows[..h]),
                Pooling::Mean => mean_rows(rows, v),
            }
        }
    }
}

/// `x = norm(y + x)`, a block of rows per rayon task.
fn residual_norm(norm: &Norm, y: &[f32], x: &mut [f32]) {
    let h = norm.gamma.len();
    x.par_chunks_mut(ROWS_PER_TASK * h)
        .zip(y.par_chunks(ROWS_PER_TASK * h))
        .for_each(|(x, y)| norm.residual(y, x));
}

widest! {
    /// `v` = the mean of `rows` (each `v.len()` wide).
    fn mean_rows(rows: &[f32], v: &mut [f32]) {
        v.fill(0.0);
        let count = rows.len() / v.len();
        for row in rows.chunks_exact(v.len()) {
            for (v, x) in v.iter_mut().zip(row) {
                *v += *x;
            }
        }
        let inv = 1.0 / count as f32;
        for v in v.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// int8 keeps the Q·K·V of the last third of the layers in bf16 and nothing else;
    /// the other precisions run every layer as asked.
    #[test]
    fn int8_keeps_the_deepest_attention_projections_in_bf16() {
        let bf16 = |layers: usize| -> Vec<(usize, LinearRole)> {
            (0..layers)
                .flat_map(|l| LinearRole::ALL.iter().map(move |&r| (l, r)))
                .filter(|&(l, r)| planned(Precision::Int8, l, r, layers) == Precision::Bf16)
                .collect()
        };
        assert_eq!(bf16(6), [(4, LinearRole::Qkv), (5, LinearRole::Qkv)]);
        assert_eq!(bf16(12).len(), 4);
        assert_eq!(bf16(12)[0], (8, LinearRole::Qkv));
        assert_eq!(bf16(1), [(0, LinearRole::Qkv)]);
        for precision in [Precision::F32, Precision::Bf16] {
            for r in LinearRole::ALL {
                assert_eq!(planned(precision, 5, r, 6), precision);
            }
        }
    }
}
