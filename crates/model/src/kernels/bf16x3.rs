//! Exact f32 Linear layers on bf16 hardware (AMX tiles): the "bf16×3" scheme.
//!
//! Every f32 operand splits into a bf16 high part and a bf16 low part, `v = hi + lo + e`
//! with `hi = bf16(v)`, `lo = bf16(v − hi)` (the subtraction is exact) and `|e| ≤ 2⁻¹⁷·|v|`.
//! The product keeps the three significant terms and drops `lo·lo` (`≤ 2⁻¹⁸` of it):
//!
//! `x · W ≈ hi(x)·hi(W) + hi(x)·lo(W) + lo(x)·hi(W)`,
//!
//! all summed in f32 by the bf16 kernels. On AMX tiles the layer holds `[hi(W); lo(W)]`
//! (each part padded to a whole tile step) and each step of the tile kernel loads the two
//! parts of its activations and weights once and multiplies the three products from them
//! ([`super::amx::Product::Bf16x3`]: 8 tile loads for 12 products). On the other bf16
//! kernels (AVX-512 `vdpbf16ps` or widened FMA, portable; for tests and measurements) the
//! three products are ONE bf16 layer over three times the inputs: the weights stacked as
//! `[hi(W); lo(W); hi(W)]`, each activation row laid out as `[hi(x), hi(x), lo(x)]`. Each
//! product term is exact and only the f32 sums round, so the result stays within ~2⁻¹⁶ of
//! f32's instead of bf16's 2⁻⁸.
//!
//! It pays where bf16 multiplies far faster than f32: AMX tiles run bf16 at ~14× a core's
//! 512-bit f32 FMA, so three bf16 products still beat one f32 product. Without tiles the
//! f32 FMA kernels are faster, and `precision: f32` uses them ([`f32_on_tiles`]).

use std::sync::OnceLock;

use super::bf16::{Bf16Linear, from_bf16, to_bf16};
use super::{Isa, Kind, Scratch};

/// Whether `precision: f32` runs its Linear layers as bf16×3 on the bf16 kernels: where
/// AMX bf16 tiles are available and verified, unless `KEEL_CPU_F32` says `fma` (the f32
/// FMA kernels) or `bf16x3` (this scheme on whatever bf16 kernels the CPU has: for tests
/// and measurements). Read once per process.
pub fn f32_on_tiles() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| match std::env::var("KEEL_CPU_F32").ok().as_deref() {
        Some("fma") => false,
        Some("bf16x3") => true,
        other => {
            if let Some(value) = other {
                tracing::warn!(value, "KEEL_CPU_F32 is not fma or bf16x3; ignored");
            }
            Isa::detect(Kind::Bf16) == Isa::Amx
        }
    })
}

/// `hi(v)` as f32 (exact), and `v − hi(v)` (exact in f32; its bf16 rounding is `lo(v)`).
#[inline(always)]
fn split(v: f32) -> (f32, f32) {
    let hi = from_bf16(to_bf16(v));
    (hi, v - hi)
}

/// A Linear layer computed as bf16×3: f32 accuracy on the bf16 kernels.
pub struct Bf16x3Linear {
    /// On AMX, `2 × padded` inputs: rows `[hi(W); lo(W)]`, each part `padded` rows (zeros
    /// past `inputs`); on the other kernels, `3 × inputs`: rows `[hi(W); lo(W); hi(W)]`.
    stacked: Bf16Linear,
    inputs: usize,
}

/// The rows of one part of the weights on AMX: a whole tile step of inputs.
fn padded(inputs: usize) -> usize {
    inputs.next_multiple_of(2 * super::amx::TILE_GROUPS)
}

impl Bf16x3Linear {
    /// Splits `weight` (`inputs × outputs`, row-major) into its bf16 parts, on the bf16
    /// kernels [`Bf16Linear::round`] picks.
    pub fn split(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "weight is inputs × outputs");
        let (hi, lo): (Vec<f32>, Vec<f32>) = weight.iter().map(|&w| split(w)).unzip();
        Self::stack(&hi, &lo, bias, inputs, outputs, Isa::detect(Kind::Bf16))
    }

    /// The parts stacked for `isa`'s kernels (`hi`, `lo`: `inputs × outputs`).
    fn stack(
        hi: &[f32],
        lo: &[f32],
        bias: &[f32],
        inputs: usize,
        outputs: usize,
        isa: Isa,
    ) -> Self {
        let mut stacked;
        let rows = if isa == Isa::Amx {
            let part = padded(inputs) * outputs;
            stacked = vec![0.0f32; 2 * part];
            stacked[..hi.len()].copy_from_slice(hi);
            stacked[part..part + lo.len()].copy_from_slice(lo);
            2 * padded(inputs)
        } else {
            stacked = Vec::with_capacity(3 * hi.len());
            stacked.extend_from_slice(hi);
            stacked.extend_from_slice(lo);
            stacked.extend_from_slice(hi);
            3 * inputs
        };
        Self {
            stacked: Bf16Linear::round_on(&stacked, bias, rows, outputs, isa),
            inputs,
        }
    }

    /// The same layer on other bf16 kernels.
    ///
    /// # Panics
    /// If this CPU cannot run `isa`'s bf16 kernels.
    pub fn with_isa(self, isa: Isa) -> Self {
        assert!(
            isa.runs(Kind::Bf16) || (isa == Isa::Amx && super::amx::runs(Kind::Bf16)),
            "this CPU cannot run {isa:?} bf16 kernels"
        );
        let on_tiles = |isa| isa == Isa::Amx;
        if on_tiles(isa) == on_tiles(self.isa()) {
            return Self {
                stacked: self.stacked.with_isa(isa),
                inputs: self.inputs,
            };
        }
        // The other stacking: the parts back from the packed values (exact).
        let (k, n) = (self.inputs, self.outputs());
        let (w, bias) = self.stacked.unpacked();
        let lo_row = if on_tiles(self.isa()) { padded(k) } else { k };
        Self::stack(&w[..k * n], &w[lo_row * n..][..k * n], &bias, k, n, isa)
    }

    pub fn isa(&self) -> Isa {
        self.stacked.isa()
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.stacked.outputs()
    }

    /// Bytes held: `hi(W)` and `lo(W)` in bf16 (on AMX; elsewhere a second copy of
    /// `hi(W)`), and the bias.
    pub fn bytes(&self) -> usize {
        self.stacked.bytes()
    }

    /// `out = x · W + b` for the rows of `x` (`rows × inputs`) on this thread.
    pub fn block(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let k = self.inputs;
        let rows = x.len() / k;
        // On AMX the parts go straight into the tiles' bf16 rows.
        #[cfg(target_arch = "x86_64")]
        if self.stacked.isa() == Isa::Amx {
            return self.stacked.block_amx_split(x, k, out, scratch);
        }
        // The split rows live in a buffer of their own while the bf16 kernel uses the
        // others; it goes back to `scratch` after, so a warm block allocates nothing.
        let mut wide = std::mem::take(&mut scratch.split);
        wide.grow(rows * 3 * k, 0.0);
        for (row, wide) in x.chunks_exact(k).zip(wide.chunks_exact_mut(3 * k)) {
            let (hi, rest) = wide.split_at_mut(k);
            let (hi2, lo) = rest.split_at_mut(k);
            for (((&v, h), h2), l) in row.iter().zip(hi).zip(hi2).zip(lo) {
                let (high, low) = split(v);
                *h = high;
                *h2 = high;
                *l = low;
            }
        }
        self.stacked.block(&wide[..rows * 3 * k], out, scratch);
        scratch.split = wide;
    }
}

/// Whether bf16×3 on the AMX kernel computes a small layer (odd rows, padded parts) as on
/// the portable kernel, within f32 rounding of the sums. Only where [`super::amx::available`].
pub(crate) fn amx_agrees_with_portable() -> bool {
    let c = super::check_layer();
    let (hi, lo): (Vec<f32>, Vec<f32>) = c.weight.iter().map(|&w| split(w)).unzip();
    c.amx_matches_portable(1e-5, |isa, out| {
        let layer = Bf16x3Linear::stack(&hi, &lo, &c.bias, c.inputs, c.outputs, isa);
        layer.block(&c.x, out, &mut Scratch::default());
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::noise;
    use super::super::{f32::F32Linear, testable};
    use super::*;

    /// `x · W + b` in f64.
    fn reference(x: &[f32], w: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f64> {
        let rows = x.len() / k;
        let mut out = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut s = b[j] as f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[i * n + j] as f64;
                }
                out[r * n + j] = s;
            }
        }
        out
    }

    /// The largest error relative to the row's scale (`Σ|x·w|`, what f32 sums round
    /// against).
    fn worst(got: &[f32], want: &[f64], x: &[f32], w: &[f32], k: usize, n: usize) -> f64 {
        let mut worst = 0.0f64;
        for (idx, (&g, &t)) in got.iter().zip(want).enumerate() {
            let (r, j) = (idx / n, idx % n);
            let scale: f64 = (0..k)
                .map(|i| (x[r * k + i] as f64 * w[i * n + j] as f64).abs())
                .sum::<f64>()
                .max(1e-30);
            worst = worst.max((g as f64 - t).abs() / scale);
        }
        worst
    }

    #[test]
    fn the_split_is_exact_and_its_parts_are_bf16() {
        let mut seed = 7;
        for v in noise(&mut seed, 10_000, 300.0) {
            let (hi, rest) = split(v);
            let lo = from_bf16(to_bf16(rest));
            assert_eq!(from_bf16(to_bf16(hi)), hi, "hi is a bf16 value");
            assert_eq!(hi + rest, v, "the remainder is exact");
            assert!(((hi + lo) as f64 - v as f64).abs() <= v.abs() as f64 * 2f64.powi(-16));
        }
    }

    /// On every bf16 kernel form this CPU runs (odd sizes: partial tiles, tails),
    /// bf16×3 stays within 2⁻¹⁵ of the f64 product (f32's own sums: 2⁻¹⁸), and far
    /// closer than plain bf16.
    #[test]
    fn bf16x3_is_as_exact_as_f32_on_every_bf16_kernel() {
        let (rows, k, n) = (37, 70, 40);
        let mut seed = 11;
        let x = noise(&mut seed, rows * k, 2.0);
        let w = noise(&mut seed, k * n, 0.2);
        let b = noise(&mut seed, n, 0.5);
        let want = reference(&x, &w, &b, k, n);
        let mut f32_out = vec![0.0f32; rows * n];
        F32Linear::pack(&w, &b, k, n).block(&x, &mut f32_out, &mut Scratch::default());
        let f32_err = worst(&f32_out, &want, &x, &w, k, n);
        let mut bf16_out = vec![0.0f32; rows * n];
        Bf16Linear::round(&w, &b, k, n).block(&x, &mut bf16_out, &mut Scratch::default());
        let bf16_err = worst(&bf16_out, &want, &x, &w, k, n);
        for isa in testable(Kind::Bf16, "bf16x3") {
            let layer = Bf16x3Linear::split(&w, &b, k, n).with_isa(isa);
            let mut out = vec![0.0f32; rows * n];
            let mut scratch = Scratch::default();
            layer.block(&x, &mut out, &mut scratch);
            let err = worst(&out, &want, &x, &w, k, n);
            assert!(
                err <= 2f64.powi(-15),
                "{isa:?}: bf16x3 relative error {err:e} (f32 {f32_err:e}, bf16 {bf16_err:e})"
            );
            assert!(
                err * 30.0 < bf16_err,
                "{isa:?}: {err:e} vs bf16 {bf16_err:e}"
            );
            // A second block reuses the scratch: same answer, nothing grown.
            let held = scratch.bytes();
            let mut again = vec![0.0f32; rows * n];
            layer.block(&x, &mut again, &mut scratch);
            assert_eq!(again, out, "{isa:?}");
            assert_eq!(scratch.bytes(), held, "{isa:?}: a warm block allocated");
        }
        assert!(f32_err <= 2f64.powi(-18), "f32 {f32_err:e}");
    }
}
