//! f32 Linear layers: `y = x · W + b` in full single precision, the default precision's
//! matrix products on the host.
//!
//! Weights are packed at load in panels of 16 columns (one 512-bit register of f32), each
//! panel `inputs × 16` contiguous; a block of activation rows is packed per call into
//! tiles of [`MR`] rows laid out input by input (`[tile][input][row]`), so one pointer and
//! constant offsets reach a whole tile's values. Kernels over that packing:
//!
//! - **AVX-512 F**: tiles of 12 rows × 32 columns (two panels), 24 accumulators in
//!   registers, one 512-bit FMA per row and panel per input;
//! - **AVX2 + FMA**: 6 rows × 16 columns (one panel), 12 accumulators, one 256-bit FMA
//!   per row and half-panel per input: the same products summed in the same order as
//!   AVX-512's, so the same bits (the portable loops compiled for AVX2, which this replaced,
//!   spilled their accumulators and ran at 4 GMAC/s a core where this runs at ~65);
//! - **portable**: the same loops in plain Rust (4 rows × 16 columns), for other CPUs.
//!
//! Every kernel sums each output's `inputs` products in input order, one f32 FMA (or
//! multiply-add) at a time, so a row's result never depends on the rows beside it.

use super::{Aligned, Isa, Kind, PANEL, Scratch};

/// Rows per tile of the packed activations (the AVX-512 kernel's register block).
pub(crate) const MR: usize = 12;

/// A Linear layer's f32 weights, packed for the kernels, with its bias.
pub struct F32Linear {
    inputs: usize,
    outputs: usize,
    /// Panels of 16 columns, an even number (the AVX-512 tiles take two).
    panels: usize,
    /// `panels × inputs × 16`.
    packed: Aligned<f32>,
    /// Per column, padded to `panels × 16` with zeros.
    bias: Vec<f32>,
    isa: Isa,
}

impl F32Linear {
    /// Packs `weight` (`inputs × outputs`, row-major) and keeps `bias`, for the best
    /// kernels this CPU runs ([`Isa::detect`]).
    pub fn pack(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "weight is inputs × outputs");
        assert_eq!(bias.len(), outputs, "one bias per output");
        assert!(inputs > 0 && outputs > 0, "an empty layer");
        let panels = outputs.div_ceil(2 * PANEL) * 2;
        let mut packed = Aligned::filled(0.0f32, panels * inputs * PANEL);
        for i in 0..inputs {
            for j in 0..outputs {
                packed[((j / PANEL) * inputs + i) * PANEL + j % PANEL] = weight[i * outputs + j];
            }
        }
        let mut padded_bias = vec![0.0f32; panels * PANEL];
        padded_bias[..outputs].copy_from_slice(bias);
        Self {
            inputs,
            outputs,
            panels,
            packed,
            bias: padded_bias,
            isa: Isa::detect(Kind::F32),
        }
    }

    /// The same layer on other kernels (tests and benchmarks compare them).
    ///
    /// # Panics
    /// If this CPU cannot run `isa`'s f32 kernels.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        assert!(
            isa.runs(Kind::F32),
            "this CPU cannot run {isa:?} f32 kernels"
        );
        self.isa = isa;
        self
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

    /// Bytes held: packed weights and the bias.
    pub fn bytes(&self) -> usize {
        (self.packed.len() + self.bias.len()) * 4
    }

    /// The weight `(i, j)` as stored.
    pub fn weight(&self, i: usize, j: usize) -> f32 {
        self.packed[((j / PANEL) * self.inputs + i) * PANEL + j % PANEL]
    }

    /// The weights as `inputs × outputs`, row-major, and the bias (what a layer quantized
    /// from this one starts from).
    pub fn unpacked(&self) -> (Vec<f32>, Vec<f32>) {
        let (k, n) = (self.inputs, self.outputs);
        let mut w = vec![0.0f32; k * n];
        for i in 0..k {
            for j in 0..n {
                w[i * n + j] = self.weight(i, j);
            }
        }
        (w, self.bias[..n].to_vec())
    }

    /// `out = x · W + b` for the rows of `x` (`rows × inputs`) on this thread, packing the
    /// rows into `scratch`.
    pub fn block(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let k = self.inputs;
        let rows = x.len() / k;
        assert_eq!(x.len(), rows * k, "x is rows × inputs");
        assert_eq!(out.len(), rows * self.outputs, "out is rows × outputs");
        if rows == 0 {
            return;
        }
        let tiles = rows.div_ceil(MR);
        let a = scratch.f32s(tiles * k * MR);
        for (t, tile) in a.chunks_exact_mut(k * MR).enumerate() {
            let first = t * MR;
            let take = (rows - first).min(MR);
            let x = &x[first * k..(first + take) * k];
            #[cfg(target_arch = "x86_64")]
            if take == MR {
                // SAFETY: SSE is part of x86-64; `x` holds MR rows of `k`, `tile` k × MR.
                unsafe { x86::pack_tile(x, k, tile) };
                continue;
            }
            for (r, row) in x.chunks_exact(k).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    tile[i * MR + r] = v;
                }
            }
            // Rows past the block compute on zeros and are never stored.
            for r in take..MR {
                for i in 0..k {
                    tile[i * MR + r] = 0.0;
                }
            }
        }
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `pack` and `with_isa` only choose kernels this CPU runs.
            Isa::Avx512 => unsafe { x86::block_avx512(self, a, rows, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::block_avx2(self, a, rows, out) },
            _ => self.block_portable(a, rows, out),
        }
    }

    /// The portable kernel: 4 rows of a tile × one panel at a time.
    #[inline(always)]
    fn block_portable(&self, a: &[f32], rows: usize, out: &mut [f32]) {
        const R: usize = 4;
        let (k, n) = (self.inputs, self.outputs);
        for first in (0..rows).step_by(R) {
            let tile = &a[(first / MR) * k * MR..(first / MR + 1) * k * MR];
            let within = first % MR;
            let take = (rows - first).min(R);
            for p in 0..self.panels {
                let j0 = p * PANEL;
                if j0 >= n {
                    break;
                }
                let panel = &self.packed[p * k * PANEL..(p + 1) * k * PANEL];
                let mut acc = [[0.0f32; PANEL]; R];
                for (i, w) in panel.chunks_exact(PANEL).enumerate() {
                    let x = &tile[i * MR + within..i * MR + within + R];
                    for (acc, &x) in acc.iter_mut().zip(x) {
                        for (acc, &w) in acc.iter_mut().zip(w) {
                            *acc += x * w;
                        }
                    }
                }
                let valid = (n - j0).min(PANEL);
                for (r, acc) in acc.iter().enumerate().take(take) {
                    let row = &mut out[(first + r) * n + j0..(first + r) * n + j0 + valid];
                    for ((o, &acc), &b) in row.iter_mut().zip(acc).zip(&self.bias[j0..]) {
                        *o = acc + b;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{F32Linear, MR, PANEL};

    /// # Safety
    /// The CPU must have AVX-512 F; `a` holds `ceil(rows / MR)` packed tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_avx512(layer: &F32Linear, a: &[f32], rows: usize, out: &mut [f32]) {
        let k = layer.inputs;
        assert!(a.len() >= rows.div_ceil(MR) * k * MR);
        assert!(out.len() >= rows * layer.outputs);
        for pair in 0..layer.panels / 2 {
            if pair * 2 * PANEL >= layer.outputs {
                break;
            }
            for t in 0..rows.div_ceil(MR) {
                let tile = &a[t * k * MR..(t + 1) * k * MR];
                let first = t * MR;
                // SAFETY: same features; bounds checked above and in `store`.
                unsafe {
                    match (rows - first).min(MR) {
                        12 => tile_avx512::<12>(layer, tile, pair, out, first),
                        11 => tile_avx512::<11>(layer, tile, pair, out, first),
                        10 => tile_avx512::<10>(layer, tile, pair, out, first),
                        9 => tile_avx512::<9>(layer, tile, pair, out, first),
                        8 => tile_avx512::<8>(layer, tile, pair, out, first),
                        7 => tile_avx512::<7>(layer, tile, pair, out, first),
                        6 => tile_avx512::<6>(layer, tile, pair, out, first),
                        5 => tile_avx512::<5>(layer, tile, pair, out, first),
                        4 => tile_avx512::<4>(layer, tile, pair, out, first),
                        3 => tile_avx512::<3>(layer, tile, pair, out, first),
                        2 => tile_avx512::<2>(layer, tile, pair, out, first),
                        _ => tile_avx512::<1>(layer, tile, pair, out, first),
                    }
                }
            }
        }
    }

    /// A whole tile of rows (`x`: MR rows of `k`) into `[input][row]` order (`tile`: k × MR),
    /// 4 rows × 4 inputs at a time through a register transpose: 4 loads and 4 stores of 16
    /// bytes per 16 values, where the scalar loop wrote each value apart (5 % of an f32
    /// pass).
    ///
    /// # Safety
    /// None beyond x86-64's SSE; the lengths are checked.
    pub(super) unsafe fn pack_tile(x: &[f32], k: usize, tile: &mut [f32]) {
        assert!(x.len() >= MR * k && tile.len() >= k * MR);
        let whole = k / 4 * 4;
        let (xp, tp) = (x.as_ptr(), tile.as_mut_ptr());
        for r0 in (0..MR).step_by(4) {
            // SAFETY: rows r0..r0 + 4 < MR and inputs i..i + 4 ≤ k stay inside both.
            unsafe {
                for i in (0..whole).step_by(4) {
                    let mut a = _mm_loadu_ps(xp.add(r0 * k + i));
                    let mut b = _mm_loadu_ps(xp.add((r0 + 1) * k + i));
                    let mut c = _mm_loadu_ps(xp.add((r0 + 2) * k + i));
                    let mut d = _mm_loadu_ps(xp.add((r0 + 3) * k + i));
                    _MM_TRANSPOSE4_PS(&mut a, &mut b, &mut c, &mut d);
                    _mm_storeu_ps(tp.add(i * MR + r0), a);
                    _mm_storeu_ps(tp.add((i + 1) * MR + r0), b);
                    _mm_storeu_ps(tp.add((i + 2) * MR + r0), c);
                    _mm_storeu_ps(tp.add((i + 3) * MR + r0), d);
                }
            }
            for i in whole..k {
                for r in r0..r0 + 4 {
                    tile[i * MR + r] = x[r * k + i];
                }
            }
        }
    }

    /// Rows of a tile the AVX2 kernel multiplies at once: 6 rows × 16 columns is 12
    /// accumulators of AVX2's 16 registers, beside the panel's two weight vectors and one
    /// broadcast activation.
    const MR_AVX2: usize = 6;

    /// The AVX2 + FMA kernel: the AVX-512 kernel's products and order of sums (one FMA per
    /// input, in input order), 256 bits wide, one panel of 16 columns × 6 rows at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` holds `ceil(rows / MR)` packed tiles.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2(layer: &F32Linear, a: &[f32], rows: usize, out: &mut [f32]) {
        const { assert!(MR.is_multiple_of(MR_AVX2)) };
        let k = layer.inputs;
        assert!(a.len() >= rows.div_ceil(MR) * k * MR);
        assert!(out.len() >= rows * layer.outputs);
        for panel in 0..layer.panels {
            if panel * PANEL >= layer.outputs {
                break;
            }
            for first in (0..rows).step_by(MR_AVX2) {
                let tile = &a[(first / MR) * k * MR..(first / MR + 1) * k * MR];
                let within = first % MR;
                // SAFETY: same features; bounds checked in `tile_avx2`.
                unsafe {
                    match (rows - first).min(MR_AVX2) {
                        6 => tile_avx2::<6>(layer, tile, within, panel, out, first),
                        5 => tile_avx2::<5>(layer, tile, within, panel, out, first),
                        4 => tile_avx2::<4>(layer, tile, within, panel, out, first),
                        3 => tile_avx2::<3>(layer, tile, within, panel, out, first),
                        2 => tile_avx2::<2>(layer, tile, within, panel, out, first),
                        _ => tile_avx2::<1>(layer, tile, within, panel, out, first),
                    }
                }
            }
        }
    }

    /// Rows `within..within + R` of a packed tile × the 16 columns of `panel`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize>(
        layer: &F32Linear,
        tile: &[f32],
        within: usize,
        panel: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let (k, n) = (layer.inputs, layer.outputs);
        let w = &layer.packed[panel * k * PANEL..(panel + 1) * k * PANEL];
        let j = panel * PANEL;
        assert!(tile.len() >= k * MR && within + R <= MR);
        assert!(out.len() >= (first + R) * n && layer.bias.len() >= j + PANEL);
        let mut acc0 = [_mm256_setzero_ps(); R];
        let mut acc1 = [_mm256_setzero_ps(); R];
        // SAFETY: `i < k` keeps every pointer inside `tile` (k × MR, rows below
        // `within + R ≤ MR`) and `w` (k × 16); the stores stay inside `out` (checked).
        unsafe {
            let (ap, wp) = (tile.as_ptr().add(within), w.as_ptr());
            for i in 0..k {
                let w0 = _mm256_loadu_ps(wp.add(i * PANEL));
                let w1 = _mm256_loadu_ps(wp.add(i * PANEL + 8));
                let x = ap.add(i * MR);
                for r in 0..R {
                    let xr = _mm256_broadcast_ss(&*x.add(r));
                    acc0[r] = _mm256_fmadd_ps(xr, w0, acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(xr, w1, acc1[r]);
                }
            }
            let valid = (n - j).min(PANEL);
            let b0 = _mm256_loadu_ps(layer.bias.as_ptr().add(j));
            let b1 = _mm256_loadu_ps(layer.bias.as_ptr().add(j + 8));
            for r in 0..R {
                let dst = out.as_mut_ptr().add((first + r) * n + j);
                let (y0, y1) = (_mm256_add_ps(acc0[r], b0), _mm256_add_ps(acc1[r], b1));
                if valid == PANEL {
                    _mm256_storeu_ps(dst, y0);
                    _mm256_storeu_ps(dst.add(8), y1);
                } else {
                    let mut tmp = [0.0f32; PANEL];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), y0);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), y1);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
                }
            }
        }
    }

    /// `R` rows of a packed tile × the 32 columns of panel pair `pair`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512<const R: usize>(
        layer: &F32Linear,
        tile: &[f32],
        pair: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let (k, n) = (layer.inputs, layer.outputs);
        let w = &layer.packed[2 * pair * k * PANEL..(2 * pair + 2) * k * PANEL];
        assert!(tile.len() >= k * MR && out.len() >= (first + R) * n);
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        // SAFETY: `i < k` keeps every pointer inside `tile` (k × MR) and `w` (2 × k × 16).
        unsafe {
            let (ap, wp) = (tile.as_ptr(), w.as_ptr());
            for i in 0..k {
                let w0 = _mm512_loadu_ps(wp.add(i * PANEL));
                let w1 = _mm512_loadu_ps(wp.add((k + i) * PANEL));
                let x = ap.add(i * MR);
                for r in 0..R {
                    let xr = _mm512_set1_ps(*x.add(r));
                    acc0[r] = _mm512_fmadd_ps(xr, w0, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(xr, w1, acc1[r]);
                }
            }
            for (half, acc) in [&acc0, &acc1].into_iter().enumerate() {
                let j = (2 * pair + half) * PANEL;
                if j >= n {
                    break;
                }
                let valid = (n - j).min(PANEL);
                let mask = ((1u32 << valid) - 1) as __mmask16;
                let bias = _mm512_loadu_ps(layer.bias.as_ptr().add(j));
                for (r, &a) in acc.iter().enumerate() {
                    let y = _mm512_add_ps(a, bias);
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add((first + r) * n + j), mask, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::noise;

    fn reference(w: &[f32], b: &[f32], x: &[f32], k: usize, n: usize) -> Vec<f64> {
        let rows = x.len() / k;
        let mut out = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = b[j] as f64
                    + (0..k)
                        .map(|i| x[r * k + i] as f64 * w[i * n + j] as f64)
                        .sum::<f64>();
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_the_reference_on_odd_sizes_and_tails() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let kernels = crate::kernels::testable(Kind::F32, "f32");
        let mut scratch = Scratch::default();
        for &(rows, k, n) in &[
            (1, 1, 1),
            (1, 3, 5),
            (7, 2, 16),
            (11, 5, 17),
            (12, 17, 31),
            (13, 33, 33),
            (25, 384, 48),
            (64, 384, 1152),
            (3, 1536, 384),
        ] {
            let x = noise(&mut seed, rows * k, 3.0);
            let w = noise(&mut seed, k * n, 0.2);
            let b = noise(&mut seed, n, 1.0);
            let expected = reference(&w, &b, &x, k, n);
            for &isa in &kernels {
                let layer = F32Linear::pack(&w, &b, k, n).with_isa(isa);
                let mut out = vec![f32::NAN; rows * n];
                layer.block(&x, &mut out, &mut scratch);
                let bound = 2e-7 * (k as f64).max(8.0) * 3.0;
                for (idx, (got, want)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (*got as f64 - want).abs() <= bound,
                        "{isa:?} {rows}×{k}×{n}: element {idx} is {got}, expected {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let (k, n) = (384, 64);
        let mut seed = 7;
        let x = noise(&mut seed, 30 * k, 2.0);
        let w = noise(&mut seed, k * n, 0.1);
        let b = noise(&mut seed, n, 0.5);
        let mut scratch = Scratch::default();
        for isa in crate::kernels::testable(Kind::F32, "f32") {
            let layer = F32Linear::pack(&w, &b, k, n).with_isa(isa);
            let mut all = vec![0.0f32; 30 * n];
            layer.block(&x, &mut all, &mut scratch);
            for r in [0, 11, 12, 29] {
                let mut one = vec![0.0f32; n];
                layer.block(&x[r * k..(r + 1) * k], &mut one, &mut scratch);
                assert_eq!(one, all[r * n..(r + 1) * n], "{isa:?} row {r}");
            }
        }
    }

    /// The AVX2 and AVX-512 kernels sum the same products in the same order: the same bits
    /// on every row count (whole and partial tiles of both) and column tail.
    #[test]
    fn avx2_and_avx512_give_the_same_bits() {
        let kernels = crate::kernels::testable(Kind::F32, "f32");
        if !(kernels.contains(&Isa::Avx2) && kernels.contains(&Isa::Avx512)) {
            eprintln!("SKIPPED f32 AVX2 against AVX-512: this CPU lacks one of them");
            return;
        }
        let mut seed = 3;
        let mut scratch = Scratch::default();
        for &(rows, k, n) in &[(1, 7, 3), (6, 384, 16), (13, 384, 40), (25, 96, 1152)] {
            let x = noise(&mut seed, rows * k, 2.0);
            let w = noise(&mut seed, k * n, 0.2);
            let b = noise(&mut seed, n, 1.0);
            let run = |isa, scratch: &mut Scratch| {
                let mut out = vec![f32::NAN; rows * n];
                F32Linear::pack(&w, &b, k, n)
                    .with_isa(isa)
                    .block(&x, &mut out, scratch);
                out
            };
            let (narrow, wide) = (run(Isa::Avx2, &mut scratch), run(Isa::Avx512, &mut scratch));
            assert!(
                narrow
                    .iter()
                    .zip(&wide)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows}×{k}×{n}"
            );
        }
    }

    #[test]
    fn unpacking_returns_the_weights() {
        let w: Vec<f32> = (0..3 * 40).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..40).map(|i| -(i as f32)).collect();
        let layer = F32Linear::pack(&w, &b, 3, 40);
        assert_eq!(layer.unpacked(), (w, b));
    }
}
