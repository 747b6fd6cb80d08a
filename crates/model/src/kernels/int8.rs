//! int8 Linear layers: `y = x · W + b` with W quantized per output channel and x per row.
//!
//! **Weights**, at load: each output column `j` gets a scale `s_j = max|W[·,j]| / 127` and
//! integer weights `round(W[i,j] / s_j)` in `[-127, 127]`, packed in panels of 16 columns
//! and groups of 4 inputs (the operand order of `vpdpbusd`). **Activations**, per pass,
//! asymmetric: each row `r` spans `[lo_r, hi_r]` (widened to hold 0), gets a step
//! `t_r = (hi_r − lo_r) / 255`, a zero point `z_r = round(−lo_r / t_r)` and bytes
//! `u[r,i] = round(x[r,i] / t_r) + z_r` in `[0, 255]`: all 256 levels used whatever the
//! row's sign balance (a GELU output is almost all ≥ 0, and symmetric levels would leave
//! half of them unused). The product `Σ_i u[r,i] · w[i,j]` is accumulated exactly in int32
//! (at most 255 · 127 · inputs: no overflow below 66 000 inputs) and scaled back:
//! `y[r,j] = t_r · s_j · (Σ − z_r · Σ_i w[i,j]) + b_j`.
//!
//! **Outlier channels.** A few input channels of a transformer's activations are far
//! larger than the rest in every token (channels 99, 63, 157 and 223 of MiniLM's
//! LayerNorm outputs reach 28 where a typical channel's maximum is 1.7); a row's step is
//! set by its largest value, so they would leave the other channels few levels. A layer
//! can be given such channels at load (found by calibration, [`crate::bert`]): their
//! weights are kept in f32 and their products computed in f32 beside the int8 product,
//! and the int8 rows are quantized without them (`y = int8(x without S) + x_S · W_S + b`).
//!
//! Three kernels compute the same integer sums (and a fourth, AMX, in [`super::amx`]):
//! - **AVX-512 VNNI**: `vpdpbusd` multiplies unsigned by signed bytes: `u · w` directly;
//!   8 rows × 32 columns per tile, 16 accumulators in registers; the outlier channels are
//!   added by FMA while a tile's sums are in registers (the other kernels add them after,
//!   one pass over the outputs per channel);
//! - **AVX2**: `vpmaddubsw` would saturate its 16-bit pair sums on `u · w`, so it
//!   multiplies `|u − 128|` by `sign(u − 128) · w` instead (pair sums at most
//!   2 · 128 · 127 < 2¹⁵), then `vpmaddwd` by ones, and adds `128 · Σ_i w[i,j]` back:
//!   4 rows × 16 columns per tile;
//! - **portable** Rust over the same packing, for any other CPU.

use rayon::prelude::*;

use super::amx::{self, TILE_GROUPS, TILE_ROWS};
use super::bf16::{from_bf16, to_bf16};
use super::{Aligned, Isa, Kind, PANEL, ROWS_PER_TASK, Scratch, round_even};

/// Inputs per packed group: the four bytes one 32-bit lane of `vpdpbusd` sums.
const GROUP: usize = 4;
/// Bytes of one packed group of a panel: 16 columns × 4 inputs.
const GROUP_BYTES: usize = PANEL * GROUP;
/// Largest integer magnitude of a quantized weight (−128 is never used, so that the AVX2
/// sign trick stays in range).
const QMAX: f32 = 127.0;
/// Levels of a quantized activation byte above its lowest.
const LEVELS: f32 = 255.0;

/// A Linear layer's weights in int8, packed for the kernels, with the layer's bias.
pub struct Int8Linear {
    inputs: usize,
    outputs: usize,
    /// `ceil(inputs / 4)`, rounded up to a whole AMX tile step (zero weights past the
    /// inputs).
    groups: usize,
    /// Panels of 16 columns, an even number (tiles take two).
    panels: usize,
    /// `panels × groups × 16 × 4`: panel-major, then group, then column, then input.
    packed: Aligned<i8>,
    /// Per column (padded to `panels × 16` with zeros): scale, `Σ_i w[i,j]`, bias.
    scales: Vec<f32>,
    col_sums: Vec<i32>,
    bias: Vec<f32>,
    /// Input channels computed in f32 beside the int8 product, ascending; their rows of
    /// the int8 weights are zero.
    outliers: Vec<usize>,
    /// Their weights, `outliers × outputs`, row-major.
    outlier_rows: Vec<f32>,
    /// On AMX, the same weights as bf16×3 tiles for the side product ([`tile_outliers`]);
    /// empty elsewhere.
    tile_outliers: Aligned<u16>,
    isa: Isa,
}

impl Int8Linear {
    /// Quantizes `weight` (`inputs × outputs`, row-major: burn's Linear layout) and keeps
    /// `bias` (`outputs`). Runs on the best kernels this CPU has ([`Isa::detect`]).
    pub fn quantize(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize) -> Self {
        Self::quantize_with_outliers(weight, bias, inputs, outputs, &[])
    }

    /// [`Self::quantize`], with the input channels `outliers` computed in f32 beside the
    /// int8 product (see the module's documentation).
    ///
    /// # Panics
    /// If a channel is not below `inputs`.
    pub fn quantize_with_outliers(
        weight: &[f32],
        bias: &[f32],
        inputs: usize,
        outputs: usize,
        outliers: &[usize],
    ) -> Self {
        let isa = Isa::detect(Kind::Int8);
        Self::quantize_for(weight, bias, inputs, outputs, outliers, isa)
    }

    /// [`Self::quantize_with_outliers`] for the kernels of `isa`, unchecked.
    fn quantize_for(
        weight: &[f32],
        bias: &[f32],
        inputs: usize,
        outputs: usize,
        outliers: &[usize],
        isa: Isa,
    ) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "weight is inputs × outputs");
        assert_eq!(bias.len(), outputs, "one bias per output");
        assert!(inputs > 0 && outputs > 0, "an empty layer");
        let mut outliers = outliers.to_vec();
        outliers.sort_unstable();
        outliers.dedup();
        assert!(
            outliers.last().is_none_or(|&i| i < inputs),
            "an outlier channel past the layer's inputs"
        );
        let mut in_f32 = vec![false; inputs];
        let mut outlier_rows = Vec::with_capacity(outliers.len() * outputs);
        for &i in &outliers {
            in_f32[i] = true;
            outlier_rows.extend_from_slice(&weight[i * outputs..(i + 1) * outputs]);
        }
        // The int8 weights of an f32 channel are zero: its product is all in f32.
        let w = |i: usize, j: usize| {
            if in_f32[i] {
                0.0
            } else {
                weight[i * outputs + j]
            }
        };
        let groups = inputs.div_ceil(GROUP).next_multiple_of(TILE_GROUPS);
        let panels = outputs.div_ceil(2 * PANEL) * 2;
        let width = panels * PANEL;
        let mut packed = Aligned::filled(0i8, panels * groups * GROUP_BYTES);
        let mut scales = vec![0.0f32; width];
        let mut col_sums = vec![0i32; width];
        let mut padded_bias = vec![0.0f32; width];
        padded_bias[..outputs].copy_from_slice(bias);
        for j in 0..outputs {
            let max = (0..inputs).map(|i| w(i, j).abs()).fold(0.0f32, f32::max);
            let inv = if max > 0.0 { QMAX / max } else { 0.0 };
            scales[j] = max / QMAX;
            let mut sum = 0i32;
            for i in 0..inputs {
                let q = round_even(w(i, j) * inv).clamp(-QMAX, QMAX) as i8;
                packed[Self::index(groups, i, j)] = q;
                sum += q as i32;
            }
            col_sums[j] = sum;
        }
        Self {
            inputs,
            outputs,
            groups,
            panels,
            packed,
            scales,
            col_sums,
            bias: padded_bias,
            tile_outliers: Aligned::default(),
            outliers,
            outlier_rows,
            isa,
        }
        .with_tile_outliers()
    }

    /// Builds [`Self::tile_outliers`] where the kernels are AMX and the layer has outlier
    /// channels.
    fn with_tile_outliers(mut self) -> Self {
        if self.isa == Isa::Amx && !self.outliers.is_empty() && self.tile_outliers.is_empty() {
            self.tile_outliers = tile_outliers(
                self.outliers.len(),
                self.outputs,
                self.panels,
                &self.outlier_rows,
            );
        }
        self
    }

    /// Where weight `(i, j)` lives in `packed`.
    fn index(groups: usize, i: usize, j: usize) -> usize {
        ((j / PANEL) * groups + i / GROUP) * GROUP_BYTES + (j % PANEL) * GROUP + i % GROUP
    }

    /// The same layer on other kernels (tests and benchmarks compare them).
    ///
    /// # Panics
    /// If this CPU cannot run `isa`'s int8 kernels.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        assert!(
            isa.runs(Kind::Int8) || (isa == Isa::Amx && amx::runs(Kind::Int8)),
            "this CPU cannot run {isa:?} int8 kernels"
        );
        self.isa = isa;
        self.with_tile_outliers()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The input channels computed in f32, ascending.
    pub fn outliers(&self) -> &[usize] {
        &self.outliers
    }

    /// Bytes held: packed weights, the per-column scales, sums and biases, and the f32
    /// rows of the outlier channels (and their bf16×3 tiles on AMX).
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + self.scales.len() * 4
            + self.col_sums.len() * 4
            + self.bias.len() * 4
            + self.outlier_rows.len() * 4
            + self.tile_outliers.len() * 2
            + self.outliers.len() * size_of::<usize>()
    }

    /// The weight as the kernels see it, dequantized: `s_j · w[i,j]` (or the f32 weight of
    /// an outlier channel).
    pub fn dequantized(&self, i: usize, j: usize) -> f32 {
        match self.outliers.binary_search(&i) {
            Ok(o) => self.outlier_rows[o * self.outputs + j],
            Err(_) => self.packed[Self::index(self.groups, i, j)] as f32 * self.scales[j],
        }
    }

    /// `out = x · W + b` for `rows` rows of `x` (`rows × inputs`, row-major) into `out`
    /// (`rows × outputs`), in parallel on the current rayon pool.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (k, n) = (self.inputs, self.outputs);
        assert_eq!(x.len(), rows * k, "x is rows × inputs");
        assert_eq!(out.len(), rows * n, "out is rows × outputs");
        if rows == 0 {
            return;
        }
        out.par_chunks_mut(ROWS_PER_TASK * n)
            .zip(x.par_chunks(ROWS_PER_TASK * k))
            .for_each(|(out, x)| self.block(x, out, &mut Scratch::default()));
    }

    /// `out = x · W + b` for the rows of `x` (`rows × inputs`) on this thread, quantizing
    /// them into `scratch`.
    pub fn block(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let (k, n) = (self.inputs, self.outputs);
        let rows = x.len() / k;
        assert_eq!(x.len(), rows * k, "x is rows × inputs");
        assert_eq!(out.len(), rows * n, "out is rows × outputs");
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Amx {
            return self.block_amx(x, out, scratch);
        }
        let stride = self.groups * GROUP;
        let (q, rows_q, rest, _) = scratch.quantized(rows * stride, rows, self.rest_len(), 0);
        self.quantize_rows(x, q, rows_q, rest);
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            // SAFETY: `with_isa` and `Isa::detect` only choose kernels this CPU runs. The
            // kernel adds the outlier channels while each tile's sums are in registers.
            return unsafe { x86::block_avx512(self, q, rows_q, x, out) };
        }
        self.block_quantized(q, rows_q, out);
        for (x, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            for (&i, w) in self.outliers.iter().zip(self.outlier_rows.chunks_exact(n)) {
                axpy(x[i], w, out);
            }
        }
    }

    /// The length of the buffer a row is copied into without its outlier channels.
    fn rest_len(&self) -> usize {
        if self.outliers.is_empty() {
            0
        } else {
            self.inputs
        }
    }

    /// Quantizes the rows of `x` into `q` (`groups × 4` bytes a row), the outlier
    /// channels left out (zeros, through `rest`: a row's copy).
    #[inline(always)]
    fn quantize_rows(&self, x: &[f32], q: &mut [u8], rows_q: &mut [RowQuant], rest: &mut [f32]) {
        let stride = self.groups * GROUP;
        for ((row, q), row_q) in x
            .chunks_exact(self.inputs)
            .zip(q.chunks_exact_mut(stride))
            .zip(rows_q)
        {
            let row = if self.outliers.is_empty() {
                row
            } else {
                rest.copy_from_slice(row);
                for &i in &self.outliers {
                    rest[i] = 0.0;
                }
                &*rest
            };
            *row_q = quantize_row(row, q);
        }
    }

    /// One block of quantized rows (`groups × 4` bytes each) into `out`, without the
    /// outlier channels (AVX2 and portable kernels).
    fn block_quantized(&self, q: &[u8], rows: &[RowQuant], out: &mut [f32]) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with_isa` and `Isa::detect` only choose kernels this CPU runs.
            Isa::Avx2 => unsafe { x86::block_avx2(self, q, rows, out) },
            _ => self.block_portable(q, rows, out),
        }
    }

    /// The AMX kernel: the integer product on `tdpbusd` and, beside it, the outlier
    /// channels as a bf16×3 side product on `tdpbf16ps` (each value split into bf16 high
    /// and low parts, `hi·hi + lo·hi + hi·lo` summed in f32: within ~2⁻¹⁶ of the f32
    /// product, a thousandth of the int8 product's own error). On the tiles, 8 outlier
    /// channels cost one tile step per block where the int8 product of 384 inputs takes
    /// six; as f32 vector products beside the tiles they cost more than the int8 product.
    #[cfg(target_arch = "x86_64")]
    fn block_amx(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        // SAFETY: a CPU with AMX has AVX-512 F and BW (`amx::available` checks both); the
        // crate's tests put layers on the software tiles only where the CPU has them too
        // (`testable`).
        unsafe { self.block_amx_on_tiles(x, out, scratch) }
    }

    /// Compiled for AVX-512 (closures inherit it): what runs around the tile products
    /// runs 16 lanes wide. On the CPU's tiles, or in the crate's tests on the software
    /// model where it has none ([`amx::multiply`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn block_amx_on_tiles(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let (k, n, stride) = (self.inputs, self.outputs, self.groups * GROUP);
        let rows = x.len() / k;
        // Whole tiles of 32 rows: the rows past the block are zeros.
        let padded = rows.next_multiple_of(TILE_ROWS);
        let side_steps = (3 * self.outliers.len()).div_ceil(TILE_GROUPS * 2);
        let side_width = side_steps * TILE_GROUPS * 2;
        let (q, rows_q, rest, side_a) =
            scratch.quantized(padded * stride, rows, self.rest_len(), padded * side_width);
        self.quantize_rows(x, q, rows_q, rest);
        q[rows * stride..].fill(0);
        // Each row's outlier values as (hi, lo, hi), facing the weights' (hi, hi, lo).
        if side_steps > 0 {
            for (row, side) in x.chunks_exact(k).zip(side_a.chunks_exact_mut(side_width)) {
                let (used, pad) = side.split_at_mut(3 * self.outliers.len());
                for (&i, v) in self.outliers.iter().zip(used.chunks_exact_mut(3)) {
                    let (hi, lo) = split_bf16(row[i]);
                    v.copy_from_slice(&[hi, lo, hi]);
                }
                pad.fill(0);
            }
            side_a[rows * side_width..].fill(0);
        }
        let rows_q = &*rows_q;
        let store = |row0: usize, pair: usize, sums: &amx::Sums| {
            amx::each_row(row0, pair, rows, n, |row, j0, at, valid| {
                let RowQuant { step: t, zero } = rows_q[row];
                let out = &mut out[row * n + j0..][..valid];
                let (main, side) = (&sums.main[at..][..valid], &sums.side[at..][..valid]);
                let scales = &self.scales[j0..][..valid];
                let col_sums = &self.col_sums[j0..][..valid];
                let bias = &self.bias[j0..][..valid];
                for c in 0..valid {
                    let sum = main[c] as i32 - zero * col_sums[c];
                    out[c] = sum as f32 * (scales[c] * t) + bias[c] + side[c];
                }
            })
        };
        let bytes = |v: &[u16]| {
            // SAFETY: any u16 is two plain bytes; the length is doubled accordingly.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 2) }
        };
        let side = (side_steps > 0).then(|| amx::Side {
            a: bytes(side_a),
            b: bytes(&self.tile_outliers),
            steps: side_steps,
        });
        // SAFETY: only `with_isa` (where the CPU has AMX) or `detect` (verified) choose
        // AMX (the tests elsewhere run the software model); `q` holds whole tiles of rows
        // of `stride` bytes, `packed` whole panels of `groups` (a multiple of 16) groups,
        // the side operands `side_steps` tile steps a row and a panel.
        unsafe {
            let packed =
                std::slice::from_raw_parts(self.packed.as_ptr().cast::<u8>(), self.packed.len());
            amx::multiply(
                amx::Product::Int8,
                q,
                stride,
                padded,
                packed,
                self.groups * GROUP_BYTES,
                n.div_ceil(2 * PANEL),
                self.groups / TILE_GROUPS,
                side,
                store,
            )
        };
    }

    fn block_portable(&self, q: &[u8], rows: &[RowQuant], out: &mut [f32]) {
        let (n, stride) = (self.outputs, self.groups * GROUP);
        for (r, &RowQuant { step: t, zero }) in rows.iter().enumerate() {
            let row = &q[r * stride..(r + 1) * stride];
            for p in 0..self.panels {
                let j0 = p * PANEL;
                if j0 >= n {
                    break;
                }
                let mut acc = [0i32; PANEL];
                let panel = &self.packed[p * self.groups * GROUP_BYTES..];
                for (g, a) in row.chunks_exact(GROUP).enumerate() {
                    let w = &panel[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
                    for (c, acc) in acc.iter_mut().enumerate() {
                        for i in 0..GROUP {
                            *acc += a[i] as i32 * w[c * GROUP + i] as i32;
                        }
                    }
                }
                for (c, &acc) in acc.iter().enumerate().take(n - j0) {
                    let j = j0 + c;
                    let sum = acc - zero * self.col_sums[j];
                    out[r * n + j] = sum as f32 * (self.scales[j] * t) + self.bias[j];
                }
            }
        }
    }
}

/// `v` as a bf16 high part and a bf16 low part (`v − hi`, rounded): `hi + lo` is within
/// 2⁻¹⁸ of `v`.
#[inline(always)]
fn split_bf16(v: f32) -> (u16, u16) {
    let hi = to_bf16(v);
    (hi, to_bf16(v - from_bf16(hi)))
}

/// The outlier channels' weights (`outlier_rows`: `outliers × outputs`) as the AMX side
/// product reads them: per panel of 16 columns, tile steps of 16 rows × 64 bytes, each
/// row a pair of bf16 inputs for the 16 columns; channel `o` is inputs `3o`, `3o + 1` and
/// `3o + 2`: `(hi(w), hi(w), lo(w))`, facing the activations' `(hi(x), lo(x), hi(x))`.
fn tile_outliers(
    outliers: usize,
    outputs: usize,
    panels: usize,
    outlier_rows: &[f32],
) -> Aligned<u16> {
    const PAIR_ROW: usize = PANEL * 2;
    let steps = (3 * outliers).div_ceil(TILE_GROUPS * 2);
    let mut b = Aligned::filled(0u16, panels * steps * TILE_GROUPS * PAIR_ROW);
    for (o, w) in outlier_rows.chunks_exact(outputs).enumerate() {
        for (j, &w) in w.iter().enumerate() {
            let (hi, lo) = split_bf16(w);
            for (t, v) in [hi, hi, lo].into_iter().enumerate() {
                let input = 3 * o + t;
                let at = ((j / PANEL) * steps * TILE_GROUPS + input / 2) * PAIR_ROW
                    + (j % PANEL) * 2
                    + input % 2;
                b[at] = v;
            }
        }
    }
    b
}

/// `out += a · w`: one outlier channel's f32 products, vectorised for the widest
/// registers the CPU has.
fn axpy(a: f32, w: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn plain(a: f32, w: &[f32], out: &mut [f32]) {
        for (o, w) in out.iter_mut().zip(w) {
            *o += a * w;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide(a: f32, w: &[f32], out: &mut [f32]) {
            plain(a, w, out)
        }
        #[target_feature(enable = "avx2")]
        fn half(a: f32, w: &[f32], out: &mut [f32]) {
            plain(a, w, out)
        }
        use super::{Isa, allows};
        use std::arch::is_x86_feature_detected as has;
        if allows(Isa::Avx512) && has!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { wide(a, w, out) };
        }
        if allows(Isa::Avx2) && has!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { half(a, w, out) };
        }
    }
    plain(a, w, out)
}

/// How one row was quantized: `x ≈ step · (u − zero)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct RowQuant {
    step: f32,
    zero: i32,
}

/// Quantizes one row to bytes `u` in `[0, 255]` and returns its step and zero point;
/// padding bytes (past `x.len()`, under zero weights) get the zero point. An all-zero row
/// has step 0 and zero point 0. AVX-512 where the CPU has it (16 values per instruction,
/// rounding to nearest even as the portable code does), else the portable code compiled
/// for AVX2 or the baseline.
fn quantize_row(x: &[f32], q: &mut [u8]) -> RowQuant {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn half(x: &[f32], q: &mut [u8]) -> RowQuant {
            quantize_row_plain(x, q)
        }
        use super::{Isa, allows};
        use std::arch::is_x86_feature_detected as has;
        if allows(Isa::Avx512) && has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            // SAFETY: the CPU has AVX-512 F, BW and VL.
            return unsafe { x86::quantize_row_avx512(x, q) };
        }
        if allows(Isa::Avx2) && has!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { half(x, q) };
        }
    }
    quantize_row_plain(x, q)
}

/// The step and zero point of a row spanning `[lo, hi]` (`lo ≤ 0 ≤ hi`), and `1 / step`.
#[inline(always)]
fn row_quant(lo: f32, hi: f32) -> (RowQuant, f32) {
    let range = hi - lo;
    if range > 0.0 {
        let inv = LEVELS / range;
        let zero = round_even(-lo * inv) as i32;
        (
            RowQuant {
                step: range / LEVELS,
                zero,
            },
            inv,
        )
    } else {
        (RowQuant::default(), 0.0)
    }
}

#[inline(always)]
fn quantize_row_plain(x: &[f32], q: &mut [u8]) -> RowQuant {
    // Sixteen running extremes: reductions the compiler vectorises (`f32::max` is not one).
    let (mut highs, mut lows) = ([0.0f32; 16], [0.0f32; 16]);
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((h, l), &v) in highs.iter_mut().zip(lows.iter_mut()).zip(chunk) {
            *h = if v > *h { v } else { *h };
            *l = if v < *l { v } else { *l };
        }
    }
    let (mut hi, mut lo) = (0.0f32, 0.0f32);
    for v in highs.into_iter().chain(tail.iter().copied()) {
        hi = if v > hi { v } else { hi };
    }
    for v in lows.into_iter().chain(tail.iter().copied()) {
        lo = if v < lo { v } else { lo };
    }
    let (row, inv) = row_quant(lo, hi);
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (round_even(v * inv) as i32 + row.zero).clamp(0, 255) as u8;
    }
    q[x.len()..].fill(row.zero as u8);
    row
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, GROUP_BYTES, Int8Linear, PANEL, RowQuant};

    /// [`super::quantize_row`] with AVX-512: `vcvtps2dq` rounds to nearest even (the
    /// default rounding mode), `vpmaxsd` and `vpmovusdb` clamp to `[0, 255]`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_row_avx512(x: &[f32], q: &mut [u8]) -> RowQuant {
        let n = x.len();
        assert!(q.len() >= n);
        // SAFETY: full loads and stores stay below `n`; the tail is masked (masked lanes
        // load as 0, which the extremes hold anyway).
        unsafe {
            let tail = n % 16;
            let mask = ((1u32 << tail) - 1) as __mmask16;
            let xp = x.as_ptr();
            let (mut hi, mut lo) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                let v = _mm512_loadu_ps(xp.add(i));
                hi = _mm512_max_ps(hi, v);
                lo = _mm512_min_ps(lo, v);
                i += 16;
            }
            if tail > 0 {
                let v = _mm512_maskz_loadu_ps(mask, xp.add(i));
                hi = _mm512_max_ps(hi, v);
                lo = _mm512_min_ps(lo, v);
            }
            let (row, inv) = super::row_quant(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
            let inv = _mm512_set1_ps(inv);
            let zero = _mm512_set1_epi32(row.zero);
            let floor = _mm512_setzero_si512();
            let bytes = |v: __m512| {
                let v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), zero);
                _mm512_cvtusepi32_epi8(_mm512_max_epi32(v, floor))
            };
            let qp = q.as_mut_ptr();
            let mut i = 0;
            while i + 16 <= n {
                _mm_storeu_si128(qp.add(i).cast(), bytes(_mm512_loadu_ps(xp.add(i))));
                i += 16;
            }
            if tail > 0 {
                let b = bytes(_mm512_maskz_loadu_ps(mask, xp.add(i)));
                _mm_mask_storeu_epi8(qp.add(i).cast(), mask, b);
            }
            q[n..].fill(row.zero as u8);
            row
        }
    }

    /// Rows per AVX-512 tile (× 32 columns: 16 accumulators).
    const MR_512: usize = 8;
    /// Rows per AVX2 tile (× 16 columns: 8 accumulators).
    const MR_256: usize = 4;

    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block_avx512(
        layer: &Int8Linear,
        q: &[u8],
        rows_q: &[RowQuant],
        x: &[f32],
        out: &mut [f32],
    ) {
        let rows = rows_q.len();
        let stride = layer.groups * GROUP;
        assert!(x.len() >= rows * layer.inputs);
        for pair in 0..layer.panels / 2 {
            let j0 = pair * 2 * PANEL;
            if j0 >= layer.outputs {
                break;
            }
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(MR_512);
                let (a, s, o) = (&q[r * stride..], &rows_q[r..r + take], r);
                // SAFETY: same features as this function; bounds checked in the tile.
                unsafe {
                    match take {
                        8 => tile_avx512::<8>(layer, a, s, x, pair, out, o),
                        7 => tile_avx512::<7>(layer, a, s, x, pair, out, o),
                        6 => tile_avx512::<6>(layer, a, s, x, pair, out, o),
                        5 => tile_avx512::<5>(layer, a, s, x, pair, out, o),
                        4 => tile_avx512::<4>(layer, a, s, x, pair, out, o),
                        3 => tile_avx512::<3>(layer, a, s, x, pair, out, o),
                        2 => tile_avx512::<2>(layer, a, s, x, pair, out, o),
                        _ => tile_avx512::<1>(layer, a, s, x, pair, out, o),
                    }
                }
                r += take;
            }
        }
    }

    /// `R` rows (from `a`, `groups × 4` bytes apart) × the 32 columns of panel pair `pair`,
    /// written to `out` rows `first..first + R`, with the outlier channels of `x`'s rows
    /// `first..first + R` added (f32 FMA) while the sums are in registers: one pass over
    /// the outputs instead of one per channel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512<const R: usize>(
        layer: &Int8Linear,
        a: &[u8],
        rows_q: &[RowQuant],
        x: &[f32],
        pair: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let (groups, n, k) = (layer.groups, layer.outputs, layer.inputs);
        let stride = groups * GROUP;
        assert!(a.len() >= (R - 1) * stride + stride && rows_q.len() == R);
        assert!(out.len() >= (first + R) * n && x.len() >= (first + R) * k);
        // Outlier channels are below `inputs` (checked at quantization), their weight rows
        // `outputs` long.
        debug_assert!(layer.outlier_rows.len() == layer.outliers.len() * n);
        let w0 =
            &layer.packed[2 * pair * groups * GROUP_BYTES..(2 * pair + 2) * groups * GROUP_BYTES];
        let mut acc0 = [_mm512_setzero_si512(); R];
        let mut acc1 = [_mm512_setzero_si512(); R];
        // SAFETY: every pointer below stays inside `a` and `w0`, whose lengths were checked.
        unsafe {
            let (ap, wp) = (a.as_ptr(), w0.as_ptr());
            for g in 0..groups {
                let b0 = _mm512_loadu_si512(wp.add(g * GROUP_BYTES).cast());
                let b1 = _mm512_loadu_si512(wp.add((groups + g) * GROUP_BYTES).cast());
                for r in 0..R {
                    let v = ap
                        .add(r * stride + g * GROUP)
                        .cast::<i32>()
                        .read_unaligned();
                    let av = _mm512_set1_epi32(v);
                    acc0[r] = _mm512_dpbusd_epi32(acc0[r], av, b0);
                    acc1[r] = _mm512_dpbusd_epi32(acc1[r], av, b1);
                }
            }
            for (half, acc) in [&acc0, &acc1].into_iter().enumerate() {
                let j = (2 * pair + half) * PANEL;
                if j >= n {
                    break;
                }
                let valid = (n - j).min(PANEL);
                let mask = ((1u32 << valid) - 1) as __mmask16;
                let sums = _mm512_loadu_si512(layer.col_sums.as_ptr().add(j).cast());
                let scales = _mm512_loadu_ps(layer.scales.as_ptr().add(j));
                let bias = _mm512_loadu_ps(layer.bias.as_ptr().add(j));
                // (Loops over `R` only, fully unrolled, so that `acc` and `y` stay in
                // registers; the channels' loop is outside them.)
                let mut y = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    let RowQuant { step, zero } = rows_q[r];
                    let offset = _mm512_mullo_epi32(sums, _mm512_set1_epi32(zero));
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], offset));
                    let s = _mm512_mul_ps(scales, _mm512_set1_ps(step));
                    y[r] = _mm512_fmadd_ps(v, s, bias);
                }
                let rows = x.as_ptr().add(first * k);
                for (o, &i) in layer.outliers.iter().enumerate() {
                    let w = _mm512_maskz_loadu_ps(mask, layer.outlier_rows.as_ptr().add(o * n + j));
                    for (r, y) in y.iter_mut().enumerate() {
                        let xr = _mm512_set1_ps(*rows.add(r * k + i));
                        *y = _mm512_fmadd_ps(xr, w, *y);
                    }
                }
                for (r, &y) in y.iter().enumerate() {
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add((first + r) * n + j), mask, y);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2(
        layer: &Int8Linear,
        q: &[u8],
        rows_q: &[RowQuant],
        out: &mut [f32],
    ) {
        let rows = rows_q.len();
        let stride = layer.groups * GROUP;
        for p in 0..layer.panels {
            if p * PANEL >= layer.outputs {
                break;
            }
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(MR_256);
                let (a, s, o) = (&q[r * stride..], &rows_q[r..r + take], r);
                // SAFETY: same features as this function; bounds checked in the tile.
                unsafe {
                    match take {
                        4 => tile_avx2::<4>(layer, a, s, p, out, o),
                        3 => tile_avx2::<3>(layer, a, s, p, out, o),
                        2 => tile_avx2::<2>(layer, a, s, p, out, o),
                        _ => tile_avx2::<1>(layer, a, s, p, out, o),
                    }
                }
                r += take;
            }
        }
    }

    /// `R` rows × the 16 columns of panel `p`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize>(
        layer: &Int8Linear,
        a: &[u8],
        rows_q: &[RowQuant],
        p: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let (groups, n) = (layer.groups, layer.outputs);
        let stride = groups * GROUP;
        assert!(a.len() >= R * stride && rows_q.len() == R);
        assert!(out.len() >= (first + R) * n);
        let w = &layer.packed[p * groups * GROUP_BYTES..(p + 1) * groups * GROUP_BYTES];
        let mut acc0 = [_mm256_setzero_si256(); R];
        let mut acc1 = [_mm256_setzero_si256(); R];
        // SAFETY: every pointer below stays inside `a`, `w` and the padded per-column
        // vectors (`panels × 16` long), whose lengths were checked.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            let (ap, wp) = (a.as_ptr(), w.as_ptr());
            for g in 0..groups {
                let b0 = _mm256_loadu_si256(wp.add(g * GROUP_BYTES).cast());
                let b1 = _mm256_loadu_si256(wp.add(g * GROUP_BYTES + 32).cast());
                for r in 0..R {
                    let v = ap
                        .add(r * stride + g * GROUP)
                        .cast::<i32>()
                        .read_unaligned();
                    // u − 128 in [−128, 127]; |u − 128| (≤ 128, unsigned) times
                    // sign(u − 128)·w is (u − 128)·w.
                    let signed = _mm256_xor_si256(_mm256_set1_epi32(v), flip);
                    let magnitude = _mm256_abs_epi8(signed);
                    let p0 = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(b0, signed));
                    let p1 = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(b1, signed));
                    acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(p0, ones));
                    acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(p1, ones));
                }
            }
            let j0 = p * PANEL;
            for (half, acc) in [&acc0, &acc1].into_iter().enumerate() {
                let j = j0 + half * 8;
                if j >= n {
                    break;
                }
                let valid = (n - j).min(8);
                let sums = _mm256_loadu_si256(layer.col_sums.as_ptr().add(j).cast());
                let scales = _mm256_loadu_ps(layer.scales.as_ptr().add(j));
                let bias = _mm256_loadu_ps(layer.bias.as_ptr().add(j));
                for r in 0..R {
                    let RowQuant { step, zero } = rows_q[r];
                    // Σ (u − 128)·w + (128 − z)·Σ w = Σ u·w − z·Σ w.
                    let offset = _mm256_mullo_epi32(sums, _mm256_set1_epi32(128 - zero));
                    let v = _mm256_cvtepi32_ps(_mm256_add_epi32(acc[r], offset));
                    let s = _mm256_mul_ps(scales, _mm256_set1_ps(step));
                    let y = _mm256_fmadd_ps(v, s, bias);
                    let dst = out.as_mut_ptr().add((first + r) * n + j);
                    if valid == 8 {
                        _mm256_storeu_ps(dst, y);
                    } else {
                        let mut tmp = [0.0f32; 8];
                        _mm256_storeu_ps(tmp.as_mut_ptr(), y);
                        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
                    }
                }
            }
        }
    }
}

/// Whether the AMX kernel computes a small layer (odd rows, a padded step) as the
/// portable kernel does: without outlier channels exactly (both sum the same integers:
/// this checks `tdpbusd` and its addressing), and with two within bf16×3's rounding of
/// their products (2⁻¹⁵ of `Σ|x·w|` over the channels: this checks the side product,
/// whose faults, such as a lost low part, move an output by 2⁻⁹ of it). Only where
/// [`amx::available`] (and in the crate's tests on the software tiles).
pub(crate) fn amx_agrees_with_portable() -> bool {
    let c = super::check_layer();
    let run = |isa, outliers: &[usize]| {
        let layer =
            Int8Linear::quantize_for(&c.weight, &c.bias, c.inputs, c.outputs, outliers, isa);
        let mut out = vec![f32::NAN; c.rows * c.outputs];
        layer.block(&c.x, &mut out, &mut Scratch::default());
        out
    };
    if run(Isa::Amx, &[]) != run(Isa::Portable, &[]) {
        return false;
    }
    let outliers = [3, 41];
    let (amx, portable) = (run(Isa::Amx, &outliers), run(Isa::Portable, &outliers));
    amx.iter().zip(&portable).enumerate().all(|(idx, (a, p))| {
        let (r, j) = (idx / c.outputs, idx % c.outputs);
        let magnitude: f32 = outliers
            .iter()
            .map(|&i| (c.x[r * c.inputs + i] * c.weight[i * c.outputs + j]).abs())
            .sum();
        (a - p).abs() <= magnitude / 32768.0 + 1e-6 * (1.0 + p.abs())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream in [-1, 1).
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.next() * scale).collect()
        }
    }

    /// The quantized product computed in f64 from the definition: what every kernel must
    /// return up to f32 rounding of the final scaling.
    fn reference(layer: &Int8Linear, x: &[f32], rows: usize) -> Vec<f64> {
        let (k, n) = (layer.inputs, layer.outputs);
        let mut out = vec![0.0f64; rows * n];
        for r in 0..rows {
            let mut rest = x[r * k..(r + 1) * k].to_vec();
            for &i in &layer.outliers {
                rest[i] = 0.0;
            }
            let lo = rest.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = rest.iter().fold(0.0f32, |m, &v| m.max(v));
            let range = hi - lo;
            let inv = if range > 0.0 { 255.0 / range } else { 0.0 };
            let zero = (-lo * inv).round_ties_even() as i64;
            let step = range as f64 / 255.0;
            for j in 0..n {
                let mut sum = 0i64;
                for (i, v) in rest.iter().enumerate() {
                    let u = ((v * inv).round_ties_even() as i64 + zero).clamp(0, 255);
                    sum += (u - zero) * layer.packed[Int8Linear::index(layer.groups, i, j)] as i64;
                }
                let outliers: f64 = layer
                    .outliers
                    .iter()
                    .enumerate()
                    .map(|(o, &i)| x[r * k + i] as f64 * layer.outlier_rows[o * n + j] as f64)
                    .sum();
                out[r * n + j] =
                    sum as f64 * step * layer.scales[j] as f64 + layer.bias[j] as f64 + outliers;
            }
        }
        out
    }

    fn isas() -> Vec<Isa> {
        crate::kernels::testable(Kind::Int8, "int8")
    }

    fn check(rows: usize, k: usize, n: usize, x: &[f32], w: &[f32], b: &[f32]) {
        check_with_outliers(rows, k, n, x, w, b, &[]);
    }

    fn check_with_outliers(
        rows: usize,
        k: usize,
        n: usize,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        outliers: &[usize],
    ) {
        let layer = Int8Linear::quantize_with_outliers(w, b, k, n, outliers);
        let expected = reference(&layer, x, rows);
        let largest = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for isa in isas() {
            let layer = Int8Linear::quantize_with_outliers(w, b, k, n, outliers).with_isa(isa);
            let mut out = vec![f32::NAN; rows * n];
            layer.forward(x, rows, &mut out);
            for (idx, (got, want)) in out.iter().zip(&expected).enumerate() {
                // AMX sums the outlier channels as bf16×3 (within 2⁻¹⁶ of each product):
                // allowed 2⁻¹⁵ of their magnitude; every other form sums them in f32.
                let (r, j) = (idx / n, idx % n);
                let outliers: f64 = layer
                    .outliers
                    .iter()
                    .enumerate()
                    .map(|(o, &i)| {
                        (x[r * k + i] as f64 * layer.outlier_rows[o * n + j] as f64).abs()
                    })
                    .sum();
                let bound = 1e-6 * largest
                    + if isa == Isa::Amx {
                        outliers / 32768.0
                    } else {
                        0.0
                    };
                assert!(
                    (*got as f64 - want).abs() <= bound,
                    "{isa:?} {rows}×{k}×{n}: element {idx} is {got}, expected {want}"
                );
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_reference_on_odd_sizes_and_tails() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        for &(rows, k, n) in &[
            (1, 1, 1),
            (1, 3, 5),
            (7, 4, 16),
            (8, 5, 17),
            (9, 17, 31),
            (13, 64, 32),
            (65, 33, 33),
            (130, 384, 48),
            (3, 383, 384),
            (70, 96, 1),
        ] {
            let x = noise.vec(rows * k, 3.0);
            let w = noise.vec(k * n, 0.2);
            let b = noise.vec(n, 1.0);
            check(rows, k, n, &x, &w, &b);
        }
    }

    #[test]
    fn extremes_zero_rows_zero_columns_outliers_and_saturation() {
        let (rows, k, n) = (11, 37, 35);
        let mut noise = Noise(42);
        let mut x = noise.vec(rows * k, 1.0);
        x[..k].fill(0.0); // an all-zero row: scale 0
        x[k..2 * k].fill(-5.0); // one sign only: every byte 0, zero point 255
        x[2 * k + 3] = 1.0e4; // one outlier dominates its row's scale
        x[3 * k..4 * k].fill(f32::MIN_POSITIVE); // tiny but non-zero
        let mut w = noise.vec(k * n, 1.0);
        for i in 0..k {
            w[i * n + 2] = 0.0; // an all-zero column
            w[i * n + 4] = -3.0; // a constant negative column
        }
        let b = noise.vec(n, 1.0);
        check(rows, k, n, &x, &w, &b);
        let layer = Int8Linear::quantize(&w, &b, k, n);
        assert!(layer.packed.iter().all(|&q| q != i8::MIN));
        assert_eq!(layer.dequantized(5, 4), -3.0);
        assert_eq!(layer.dequantized(5, 2), 0.0);
        let mut out = vec![0.0f32; rows * n];
        layer.forward(&x, rows, &mut out);
        // The zero row returns the bias exactly.
        assert_eq!(&out[..n], &b[..]);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn close_to_the_f32_product() {
        // 8-bit weights and activations: relative error of a 384-wide dot product ~1 %.
        let (rows, k, n) = (32, 384, 64);
        let mut noise = Noise(7);
        let x = noise.vec(rows * k, 2.0);
        let w = noise.vec(k * n, 0.1);
        let b = vec![0.0f32; n];
        let layer = Int8Linear::quantize(&w, &b, k, n);
        let relative = relative_error(&layer, &x, &w, rows);
        assert!(relative < 0.02, "relative error {relative}");
        assert!(
            relative > 1e-5,
            "suspiciously exact: is it quantizing at all?"
        );
    }

    /// The relative error of `layer` against the exact f32 product.
    fn relative_error(layer: &Int8Linear, x: &[f32], w: &[f32], rows: usize) -> f64 {
        let (k, n) = (layer.inputs(), layer.outputs());
        let mut out = vec![0.0f32; rows * n];
        layer.forward(x, rows, &mut out);
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for r in 0..rows {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[i * n + j] as f64)
                    .sum();
                err += (out[r * n + j] as f64 - exact).powi(2);
                norm += exact * exact;
            }
        }
        (err / norm).sqrt()
    }

    #[test]
    fn outlier_channels_run_in_f32_and_leave_the_others_their_levels() {
        let (rows, k, n) = (24, 96, 40);
        let mut noise = Noise(11);
        let mut x = noise.vec(rows * k, 1.0);
        for r in 0..rows {
            x[r * k + 5] = 40.1 - 3.07 * r as f32; // large, either sign, not bf16 values
            x[r * k + 70] = 30.0 + 0.0123 * r as f32;
        }
        let w = noise.vec(k * n, 0.1);
        let b = noise.vec(n, 0.5);
        check_with_outliers(rows, k, n, &x, &w, &b, &[70, 5, 70]);
        let with = Int8Linear::quantize_with_outliers(&w, &b, k, n, &[70, 5]);
        assert_eq!(with.outliers(), &[5, 70]);
        assert_eq!(with.dequantized(5, 3), w[5 * n + 3]);
        assert_eq!(with.dequantized(70, 39), w[70 * n + 39]);
        let without = Int8Linear::quantize(&w, &b, k, n);
        assert_eq!(
            with.bytes(),
            without.bytes() + 2 * n * 4 + with.tile_outliers.len() * 2 + 2 * size_of::<usize>()
        );
        // On AMX the side product's tiles: one step (6 of its 32 inputs used) per panel.
        assert_eq!(
            tile_outliers(2, n, with.panels, &with.outlier_rows).len(),
            4 * 16 * 32
        );
        let zero_bias = vec![0.0f32; n];
        let with = Int8Linear::quantize_with_outliers(&w, &zero_bias, k, n, &[5, 70]);
        let without = Int8Linear::quantize(&w, &zero_bias, k, n);
        let (e_with, e_without) = (
            relative_error(&with, &x, &w, rows),
            relative_error(&without, &x, &w, rows),
        );
        assert!(
            e_with * 4.0 < e_without,
            "outliers in f32: error {e_with}, all in int8: {e_without}"
        );
    }

    /// The check run before the AMX kernels are chosen passes for a correct kernel (here
    /// on the CPU's tiles or, without them, the software model).
    #[test]
    fn the_amx_start_up_check_passes_a_correct_kernel() {
        if !isas().contains(&Isa::Amx) {
            return;
        }
        assert!(amx_agrees_with_portable());
        assert!(crate::kernels::bf16::amx_agrees_with_portable());
        assert!(crate::kernels::bf16x3::amx_agrees_with_portable());
    }

    #[test]
    #[should_panic(expected = "past the layer's inputs")]
    fn an_outlier_channel_must_be_an_input() {
        Int8Linear::quantize_with_outliers(&[1.0; 12], &[0.0; 3], 4, 3, &[4]);
    }

    #[test]
    fn row_quantization_is_the_same_on_every_path() {
        let mut noise = Noise(3);
        for len in [1usize, 2, 15, 16, 17, 31, 33, 384, 1536, 1537] {
            let mut x = noise.vec(len, 0.9);
            if len > 3 {
                x[len / 2] = -1.0; // the lowest: byte 0
                x[0] = 0.992_187_5; // the highest, 255/128 − 1: a step of 1/128, byte 255
                x[1] = 0.503_906_25; // 64.5 steps: a tie, rounded to even (64)
            }
            let stride = len.div_ceil(GROUP) * GROUP;
            let mut plain = vec![0u8; stride];
            let row = quantize_row_plain(&x, &mut plain);
            if len > 3 {
                assert_eq!(
                    row,
                    RowQuant {
                        step: 1.0 / 128.0,
                        zero: 128
                    }
                );
                assert_eq!((plain[len / 2], plain[0], plain[1]), (0, 255, 128 + 64));
            }
            let mut dispatched = vec![7u8; stride];
            assert_eq!(quantize_row(&x, &mut dispatched), row);
            assert_eq!(dispatched, plain, "length {len}");
        }
        // A row of one sign uses all 256 levels from its zero point.
        let mut q = vec![9u8; 8];
        let row = quantize_row(&[0.0, 1.0, 2.0, 3.0, 1.5], &mut q);
        assert_eq!(row.zero, 0);
        assert_eq!(q, vec![0, 85, 170, 255, 128, 0, 0, 0]);
        let row = quantize_row(&[0.0, -1.0, -3.0], &mut q);
        assert_eq!(row.zero, 255);
        assert_eq!(&q[..4], &[255, 170, 0, 255]);
        // An all-zero row: step 0, every byte its zero point.
        let mut zeros = vec![9u8; 8];
        assert_eq!(
            quantize_row_plain(&[0.0; 5], &mut zeros),
            RowQuant::default()
        );
        assert_eq!(zeros, vec![0u8; 8]);
    }

    #[test]
    fn empty_passes_and_bytes() {
        let layer = Int8Linear::quantize(&[1.0; 12], &[0.0; 3], 4, 3);
        layer.forward(&[], 0, &mut []);
        // One panel pair (32 columns) × one AMX step of 16 groups of 4 inputs (one used),
        // plus 3 × 32 per-column values.
        assert_eq!(layer.bytes(), 2 * 16 * 4 * 16 + 3 * 32 * 4);
    }
}
