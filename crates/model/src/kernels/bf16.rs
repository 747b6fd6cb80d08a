//! bf16 Linear layers: `y = x · W + b` with W and x rounded to bfloat16, products summed in
//! f32.
//!
//! bfloat16 keeps f32's exponent and 8 bits of mantissa, so no scale is needed and no
//! value overflows; each operand carries a relative rounding error of at most 2⁻⁹. Weights
//! are rounded once at load (round to nearest even) and packed in panels of 16 columns
//! and pairs of inputs (the operand order of `vdpbf16ps`); activations are rounded per
//! pass. Kernels over the same packing: AMX tiles (`tdpbf16ps`), AVX-512 in one of two
//! forms ([`Avx512Form`]: `vdpbf16ps`, 8 rows × 32 columns per tile, or the weights widened
//! to f32 in registers and 512-bit FMA, 12 rows × 32 columns), or portable Rust. AVX2 has no
//! bf16 arithmetic: there the weights are kept widened to f32 (the same values, twice the
//! bytes) and the f32 FMA kernel multiplies them by the activations rounded to bf16, at
//! f32's speed (the portable loops ran 7× slower). Every form multiplies the same bf16
//! values exactly and sums in f32: they differ only in the order of the sums.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::amx::{self, TILE_GROUPS, TILE_ROWS};
use super::f32::F32Linear;
use super::{Aligned, Isa, Kind, PANEL, ROWS_PER_TASK, Scratch};

/// How the AVX-512 kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Avx512Form {
    /// `vdpbf16ps` (AVX512_BF16): two bf16 products per f32 lane per instruction.
    DotProduct,
    /// Each weight pair widened to two f32 vectors (a shift and a mask: bf16 is the top
    /// half of an f32), then 512-bit FMA. Faster where the FMA units run f32 at twice
    /// `vdpbf16ps`'s rate (an Intel Xeon core measured here: 120 against 60 GMAC/s), and
    /// the only form on AVX-512 CPUs without BF16.
    Widened,
}

impl Avx512Form {
    /// The faster form on this CPU, measured once per process on a layer of MiniLM's
    /// shape (a few milliseconds) unless `KEEL_BF16_FORM` (`dot` or `widened`) names one.
    /// Both forms give the same products; only speed differs.
    pub fn detect() -> Avx512Form {
        static FORM: OnceLock<Avx512Form> = OnceLock::new();
        *FORM.get_or_init(|| {
            if !Self::DotProduct.runs() {
                return Self::Widened;
            }
            match std::env::var("KEEL_BF16_FORM").ok().as_deref() {
                Some("dot") => return Self::DotProduct,
                Some("widened") => return Self::Widened,
                Some(other) => tracing::warn!(
                    value = other,
                    "KEEL_BF16_FORM is not dot or widened; ignored"
                ),
                None => {}
            }
            let dot = Self::DotProduct.time();
            let widened = Self::Widened.time();
            let form = if widened < dot {
                Self::Widened
            } else {
                Self::DotProduct
            };
            tracing::info!(
                ?form,
                dot_us = dot.as_micros() as u64,
                widened_us = widened.as_micros() as u64,
                "bf16 kernels: the faster AVX-512 form on this CPU"
            );
            form
        })
    }

    /// Whether this CPU runs this form.
    pub fn runs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Self::DotProduct => has!("avx512f") && has!("avx512bf16"),
                Self::Widened => has!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Best of seven single-threaded passes of 64 rows through a 384 × 1 536 layer.
    fn time(self) -> Duration {
        let (rows, k, n) = (64, 384, 1536);
        let weight: Vec<f32> = (0..k * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1)
            .collect();
        let layer = Bf16Linear::pack(&weight, &vec![0.0; n], k, n, Isa::Avx512, self);
        let mut out = vec![0.0f32; rows * n];
        (0..7)
            .map(|_| {
                let t = Instant::now();
                layer.block(&x, &mut out, &mut Scratch::default());
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    }
}

/// Inputs per packed group: the pair one 32-bit lane of `vdpbf16ps` sums.
const GROUP: usize = 2;
/// bf16 values in one packed group of a panel: 16 columns × 2 inputs (64 bytes).
const GROUP_VALUES: usize = PANEL * GROUP;

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    // Both results, then a select: no branch, so loops over it vectorise.
    let quiet = ((bits >> 16) | 0x40) as u16;
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { quiet } else { rounded }
}

/// bf16 → f32 (exact).
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The activation rows a block multiplies: rounded to bf16, or split into bf16×3's
/// parts (`bf16x3`: rows of `inputs` values, for a layer stacked as `[hi(W); lo(W)]`, each
/// part padded to a whole tile step).
#[derive(Clone, Copy)]
enum Rows<'a> {
    Rounded(&'a [f32]),
    Split { x: &'a [f32], inputs: usize },
}

/// A Linear layer's weights in bf16, packed for the kernels, with the layer's f32 bias.
pub struct Bf16Linear {
    inputs: usize,
    outputs: usize,
    /// `ceil(inputs / 2)`, rounded up to a whole AMX tile step (zeros past the inputs).
    groups: usize,
    /// Panels of 16 columns, an even number (tiles take two).
    panels: usize,
    /// `panels × groups × 16 × 2` (empty on AVX2: `widened` holds the weights).
    packed: Aligned<u16>,
    /// On AVX2 (no bf16 arithmetic), the same bf16 weights as f32 for the f32 FMA
    /// kernels: they multiply the bf16-rounded activations exactly, as every form does.
    widened: Option<F32Linear>,
    /// Per column, padded to `panels × 16` with zeros.
    bias: Vec<f32>,
    isa: Isa,
    /// Which AVX-512 kernels run when `isa` is AVX-512.
    form: Avx512Form,
}

impl Bf16Linear {
    /// Rounds `weight` (`inputs × outputs`, row-major) to bf16 and keeps `bias`.
    pub fn round(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize) -> Self {
        Self::round_on(weight, bias, inputs, outputs, Isa::detect(Kind::Bf16))
    }

    /// [`Self::round`] onto `isa`'s kernels (which this CPU must run; unchecked).
    pub(super) fn round_on(
        weight: &[f32],
        bias: &[f32],
        inputs: usize,
        outputs: usize,
        isa: Isa,
    ) -> Self {
        let form = if isa == Isa::Avx512 {
            Avx512Form::detect()
        } else {
            Avx512Form::Widened
        };
        Self::pack(weight, bias, inputs, outputs, isa, form)
    }

    fn pack(
        weight: &[f32],
        bias: &[f32],
        inputs: usize,
        outputs: usize,
        isa: Isa,
        form: Avx512Form,
    ) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "weight is inputs × outputs");
        assert_eq!(bias.len(), outputs, "one bias per output");
        assert!(inputs > 0 && outputs > 0, "an empty layer");
        let groups = inputs.div_ceil(GROUP).next_multiple_of(TILE_GROUPS);
        let panels = outputs.div_ceil(2 * PANEL) * 2;
        let mut packed = Aligned::filled(0u16, panels * groups * GROUP_VALUES);
        for i in 0..inputs {
            for j in 0..outputs {
                packed[Self::index(groups, i, j)] = to_bf16(weight[i * outputs + j]);
            }
        }
        let mut padded_bias = vec![0.0f32; panels * PANEL];
        padded_bias[..outputs].copy_from_slice(bias);
        let layer = Self {
            inputs,
            outputs,
            groups,
            panels,
            packed,
            widened: None,
            bias: padded_bias,
            isa: Isa::Portable,
            form,
        };
        layer.on(isa)
    }

    /// The layer on `isa`'s kernels, its weights moved between the bf16 packing and the
    /// AVX2 form's f32 (both hold the same bf16 values exactly).
    fn on(mut self, isa: Isa) -> Self {
        let (k, n) = (self.inputs, self.outputs);
        if isa == Isa::Avx2 && self.widened.is_none() {
            let (w, bias) = self.unpacked();
            let layer = F32Linear::pack(&w, &bias, k, n).with_isa(Isa::Avx2);
            self.widened = Some(layer);
            self.packed = Aligned::default();
        } else if isa != Isa::Avx2
            && let Some(widened) = self.widened.take()
        {
            let (w, _) = widened.unpacked();
            self.packed = Aligned::filled(0u16, self.panels * self.groups * GROUP_VALUES);
            for i in 0..k {
                for j in 0..n {
                    self.packed[Self::index(self.groups, i, j)] = to_bf16(w[i * n + j]);
                }
            }
        }
        self.isa = isa;
        self
    }

    /// The weights (`inputs × outputs`, row-major, bf16 values as f32) and the bias, as
    /// packed: on any kernels, `round` of them gives this layer back.
    pub fn unpacked(&self) -> (Vec<f32>, Vec<f32>) {
        if let Some(widened) = &self.widened {
            return widened.unpacked();
        }
        let (k, n) = (self.inputs, self.outputs);
        let mut w = vec![0.0f32; k * n];
        for i in 0..k {
            for j in 0..n {
                w[i * n + j] = from_bf16(self.packed[Self::index(self.groups, i, j)]);
            }
        }
        (w, self.bias[..n].to_vec())
    }

    fn index(groups: usize, i: usize, j: usize) -> usize {
        ((j / PANEL) * groups + i / GROUP) * GROUP_VALUES + (j % PANEL) * GROUP + i % GROUP
    }

    /// The same layer on other kernels.
    ///
    /// # Panics
    /// If this CPU cannot run `isa`'s bf16 kernels.
    pub fn with_isa(self, isa: Isa) -> Self {
        assert!(
            isa.runs(Kind::Bf16) || (isa == Isa::Amx && amx::runs(Kind::Bf16)),
            "this CPU cannot run {isa:?} bf16 kernels"
        );
        self.on(isa)
    }

    /// The same layer on the other AVX-512 form.
    ///
    /// # Panics
    /// If this CPU cannot run `form`.
    pub fn with_form(mut self, form: Avx512Form) -> Self {
        assert!(form.runs(), "this CPU cannot run the {form:?} bf16 kernels");
        self.form = form;
        self
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The AVX-512 form, where the kernels are AVX-512.
    pub fn form(&self) -> Option<Avx512Form> {
        (self.isa == Isa::Avx512).then_some(self.form)
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Bytes held: packed weights and the bias.
    pub fn bytes(&self) -> usize {
        self.packed.len() * 2
            + self.bias.len() * 4
            + self.widened.as_ref().map_or(0, F32Linear::bytes)
    }

    /// `out = x · W + b` for `rows` rows, in parallel on the current rayon pool.
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

    /// `out = x · W + b` for the rows of `x` (`rows × inputs`) on this thread, rounding
    /// them to bf16 into `scratch`.
    pub fn block(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let k = self.inputs;
        let rows = x.len() / k;
        let stride = self.groups * GROUP;
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 && self.form == Avx512Form::Widened {
            // The widened form reads the rounded activations as f32 (bf16 is their top
            // half), broadcast straight from memory into its FMAs, laid out tile by tile
            // as [group][row][pair]: one pointer and constant offsets reach a group's
            // values for every row of the tile.
            let mr = x86::MR_WIDENED;
            let round = |v: f32| from_bf16(to_bf16(v));
            let a = scratch.f32s(rows * stride);
            let mut next = 0;
            for start in (0..rows).step_by(mr) {
                let tile = &x[start * k..(start + mr).min(rows) * k];
                for g in 0..self.groups {
                    for row in tile.chunks_exact(k) {
                        let c = g * GROUP;
                        a[next] = row.get(c).copied().map_or(0.0, round);
                        a[next + 1] = row.get(c + 1).copied().map_or(0.0, round);
                        next += 2;
                    }
                }
            }
            // SAFETY: `pack`, `with_isa` and `with_form` only choose kernels this CPU runs.
            unsafe { x86::block_widened(self, a, rows, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Amx {
            return self.block_amx(x, out, scratch);
        }
        if let Some(widened) = &self.widened {
            // AVX2: the rows rounded to bf16 (held apart while the f32 kernel packs them
            // into the other buffers), then the f32 kernel over the widened weights.
            let mut rounded = std::mem::take(&mut scratch.rounded);
            rounded.clear();
            rounded.extend(x.iter().map(|&v| from_bf16(to_bf16(v))));
            widened.block(&rounded, out, scratch);
            scratch.rounded = rounded;
            return;
        }
        let a = scratch.u16s(rows * stride);
        self.round_rows(x, a);
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx512 => unsafe { x86::block_dot(self, a, rows, out) },
            _ => self.block_portable(a, rows, out),
        }
    }

    /// Rounds the rows of `x` to bf16 into `a` (`groups × 2` values a row; zeros past the
    /// inputs, and in the rows of `a` past those of `x`).
    #[inline(always)]
    fn round_rows(&self, x: &[f32], a: &mut [u16]) {
        let (k, stride) = (self.inputs, self.groups * GROUP);
        let rows = x.len() / k;
        for (row, x) in a.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
            let (row, pad) = row.split_at_mut(k);
            for (b, &v) in row.iter_mut().zip(x) {
                *b = to_bf16(v);
            }
            pad.fill(0);
        }
        a[rows * stride..].fill(0);
    }

    /// The AMX kernel: the rows rounded to bf16, padded to whole tiles of 32 rows (zeros).
    #[cfg(target_arch = "x86_64")]
    fn block_amx(&self, x: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        // SAFETY: a CPU with AMX has AVX-512 F and BW (`amx::available` checks both); the
        // crate's tests put layers on the software tiles only where the CPU has them too
        // (`testable`).
        unsafe { self.block_amx_on_tiles(Rows::Rounded(x), out, scratch) }
    }

    /// bf16×3 on the AMX kernel: this layer is `[hi(W); lo(W)]`, each part padded to a
    /// whole tile step (`inputs / 2` rows, a multiple of 32), and the rows of `x` (`rows ×
    /// inputs`, `inputs ≤ self.inputs / 2`) are split into `[hi(x), lo(x)]` straight into
    /// the tile rows, padded alike; each step multiplies the three significant products
    /// ([`amx::Product::Bf16x3`]).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn block_amx_split(
        &self,
        x: &[f32],
        inputs: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        debug_assert_eq!(self.isa, Isa::Amx);
        debug_assert!(
            self.inputs.is_multiple_of(2 * TILE_GROUPS * GROUP) && inputs <= self.inputs / 2
        );
        // SAFETY: as in `block_amx`.
        unsafe { self.block_amx_on_tiles(Rows::Split { x, inputs }, out, scratch) }
    }

    /// Compiled for AVX-512 (closures inherit it): what runs around the tile products
    /// runs 16 lanes wide. On the CPU's tiles, or in the crate's tests on the software
    /// model where it has none ([`amx::multiply`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn block_amx_on_tiles(&self, x: Rows<'_>, out: &mut [f32], scratch: &mut Scratch) {
        let (n, stride) = (self.outputs, self.groups * GROUP);
        let rows = match x {
            Rows::Rounded(x) => x.len() / self.inputs,
            Rows::Split { x, inputs } => x.len() / inputs,
        };
        let a = scratch.u16s(rows.next_multiple_of(TILE_ROWS) * stride);
        // The product, and the packed inputs a step of it covers.
        let (product, steps) = match x {
            Rows::Rounded(x) => {
                self.round_rows(x, a);
                (amx::Product::Bf16, self.groups / TILE_GROUPS)
            }
            Rows::Split { x, inputs } => {
                let half = stride / 2;
                for (row, x) in a.chunks_exact_mut(stride).zip(x.chunks_exact(inputs)) {
                    let (hi, lo) = row.split_at_mut(half);
                    // SAFETY: this function runs with AVX-512 F and BW.
                    unsafe { x86::split_row(x, &mut hi[..inputs], &mut lo[..inputs]) };
                    hi[inputs..].fill(0);
                    lo[inputs..].fill(0);
                }
                a[rows * stride..].fill(0);
                let steps = self.groups / TILE_GROUPS / 2;
                let lo = amx::Product::Bf16x3 {
                    a_lo: half * 2,
                    b_lo: steps * TILE_GROUPS * GROUP_VALUES * 2,
                };
                (lo, steps)
            }
        };
        let bytes = |v: &[u16]| {
            // SAFETY: any u16 is two plain bytes; the length is doubled accordingly.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 2) }
        };
        let store = |row0: usize, pair: usize, sums: &amx::Sums| {
            amx::each_row(row0, pair, rows, n, |row, j0, at, valid| {
                let out = &mut out[row * n + j0..][..valid];
                let sums = &sums.main[at..][..valid];
                let bias = &self.bias[j0..][..valid];
                for ((o, &s), &b) in out.iter_mut().zip(sums).zip(bias) {
                    *o = f32::from_bits(s) + b;
                }
            })
        };
        // SAFETY: only `pack` (for tests) or `with_isa`/`detect` (verified) choose AMX on
        // a CPU that runs it (the tests elsewhere run the software model); `a` holds whole
        // tiles of rows of `stride` values, `packed` whole panels of `groups` (a multiple
        // of 16) groups.
        unsafe {
            amx::multiply(
                product,
                bytes(a),
                stride * 2,
                a.len() / stride,
                bytes(&self.packed),
                self.groups * GROUP_VALUES * 2,
                n.div_ceil(2 * PANEL),
                steps,
                None,
                store,
            )
        };
    }

    fn block_portable(&self, a: &[u16], rows: usize, out: &mut [f32]) {
        let (n, stride) = (self.outputs, self.groups * GROUP);
        for r in 0..rows {
            let row = &a[r * stride..(r + 1) * stride];
            for p in 0..self.panels {
                let j0 = p * PANEL;
                if j0 >= n {
                    break;
                }
                let mut acc = [0.0f32; PANEL];
                let panel = &self.packed[p * self.groups * GROUP_VALUES..];
                for (g, pair) in row.chunks_exact(GROUP).enumerate() {
                    let (a0, a1) = (from_bf16(pair[0]), from_bf16(pair[1]));
                    let w = &panel[g * GROUP_VALUES..(g + 1) * GROUP_VALUES];
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc += a0 * from_bf16(w[c * 2]) + a1 * from_bf16(w[c * 2 + 1]);
                    }
                }
                for (c, &acc) in acc.iter().enumerate().take(n - j0) {
                    out[r * n + j0 + c] = acc + self.bias[j0 + c];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `to_bf16` of 16 lanes, bit for bit (round to nearest even, NaN quieted).
    #[inline(always)]
    unsafe fn round16(v: __m512) -> __m256i {
        // SAFETY (all below): the caller runs with AVX-512 F and BW.
        unsafe {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                bits,
                _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)),
            ));
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
        }
    }

    /// bf16×3's parts of one row: `hi = to_bf16(x)`, `lo = to_bf16(x − hi)`, 16 lanes at a
    /// time (the same values as the scalar code).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn split_row(x: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        let n = x.len().min(hi.len()).min(lo.len());
        let whole = n - n % 16;
        // SAFETY: every access below is inside the first `whole` values of the slices.
        unsafe {
            for i in (0..whole).step_by(16) {
                let v = _mm512_loadu_ps(x.as_ptr().add(i));
                let h = round16(v);
                let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                let l = round16(_mm512_sub_ps(v, _mm512_castsi512_ps(wide)));
                _mm256_storeu_si256(hi.as_mut_ptr().add(i).cast(), h);
                _mm256_storeu_si256(lo.as_mut_ptr().add(i).cast(), l);
            }
        }
        for i in whole..n {
            let h = super::to_bf16(x[i]);
            hi[i] = h;
            lo[i] = super::to_bf16(x[i] - super::from_bf16(h));
        }
    }

    use super::{Bf16Linear, GROUP, GROUP_VALUES, PANEL};

    /// Rows per tile of the dot-product form: 16 accumulators, two weight registers.
    const MR_DOT: usize = 8;
    /// Rows per tile of the widened form: 24 accumulators and four widened weight
    /// registers of 32; more rows share each widening (measured 3 % faster than 8).
    pub(super) const MR_WIDENED: usize = 12;

    /// Runs `$tile::<R>` over every panel pair and every tile of at most `$mr` rows.
    macro_rules! tiles {
        ($layer:expr, $a:expr, $rows:expr, $out:expr, $tile:ident, $mr:expr) => {{
            let stride = $layer.groups * GROUP;
            for pair in 0..$layer.panels / 2 {
                if pair * 2 * PANEL >= $layer.outputs {
                    break;
                }
                let mut r = 0;
                while r < $rows {
                    let take = ($rows - r).min($mr);
                    let rest = &$a[r * stride..];
                    // SAFETY: same features as the caller; bounds checked in the tile.
                    unsafe {
                        match take {
                            12 => $tile::<12>($layer, rest, pair, $out, r),
                            11 => $tile::<11>($layer, rest, pair, $out, r),
                            10 => $tile::<10>($layer, rest, pair, $out, r),
                            9 => $tile::<9>($layer, rest, pair, $out, r),
                            8 => $tile::<8>($layer, rest, pair, $out, r),
                            7 => $tile::<7>($layer, rest, pair, $out, r),
                            6 => $tile::<6>($layer, rest, pair, $out, r),
                            5 => $tile::<5>($layer, rest, pair, $out, r),
                            4 => $tile::<4>($layer, rest, pair, $out, r),
                            3 => $tile::<3>($layer, rest, pair, $out, r),
                            2 => $tile::<2>($layer, rest, pair, $out, r),
                            _ => $tile::<1>($layer, rest, pair, $out, r),
                        }
                    }
                    r += take;
                }
            }
        }};
    }

    /// # Safety
    /// The CPU must have AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block_dot(layer: &Bf16Linear, a: &[u16], rows: usize, out: &mut [f32]) {
        tiles!(layer, a, rows, out, tile, MR_DOT)
    }

    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_widened(
        layer: &Bf16Linear,
        a: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        tiles!(layer, a, rows, out, tile_widened, MR_WIDENED)
    }

    /// Adds the bias and stores a tile's accumulators (columns past the layer's masked off).
    #[inline(always)]
    unsafe fn store<const R: usize>(
        layer: &Bf16Linear,
        acc: [&[__m512; R]; 2],
        pair: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let n = layer.outputs;
        for (half, acc) in acc.into_iter().enumerate() {
            let j = (2 * pair + half) * PANEL;
            if j >= n {
                break;
            }
            let valid = (n - j).min(PANEL);
            let mask = ((1u32 << valid) - 1) as __mmask16;
            // SAFETY: the bias is padded to whole panels; the caller checked `out`'s length.
            unsafe {
                let bias = _mm512_loadu_ps(layer.bias.as_ptr().add(j));
                for (r, &a) in acc.iter().enumerate() {
                    let y = _mm512_add_ps(a, bias);
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add((first + r) * n + j), mask, y);
                }
            }
        }
    }

    /// Panel pair `pair`'s packed weights, once a tile of `R` rows (`a_len` values of
    /// activations, its first output row `first`) is checked to fit.
    fn operands<const R: usize>(
        layer: &Bf16Linear,
        a_len: usize,
        pair: usize,
        out_len: usize,
        first: usize,
    ) -> &[u16] {
        assert!(a_len >= R * layer.groups * GROUP);
        assert!(out_len >= (first + R) * layer.outputs);
        let values = layer.groups * GROUP_VALUES;
        &layer.packed[2 * pair * values..(2 * pair + 2) * values]
    }

    /// The widened form: a packed group holds, per column, the pair (input 2g in the low
    /// half, input 2g + 1 in the high half); shifting left by 16 gives input 2g's weights as
    /// f32, masking the low half off gives input 2g + 1's. `a` is the tile's rows as
    /// [group][row][pair] (`Bf16Linear::block`).
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_widened<const R: usize>(
        layer: &Bf16Linear,
        a: &[f32],
        pair: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let (groups, w) = (
            layer.groups,
            operands::<R>(layer, a.len(), pair, out.len(), first),
        );
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        // SAFETY: every pointer stays inside `a` and `w`, checked above.
        unsafe {
            let (ap, wp) = (a.as_ptr(), w.as_ptr());
            for g in 0..groups {
                let b0 = _mm512_loadu_si512(wp.add(g * GROUP_VALUES).cast());
                let b1 = _mm512_loadu_si512(wp.add((groups + g) * GROUP_VALUES).cast());
                let w0even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b0));
                let w0odd = _mm512_castsi512_ps(_mm512_and_si512(b0, high));
                let w1even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b1));
                let w1odd = _mm512_castsi512_ps(_mm512_and_si512(b1, high));
                let p = ap.add(g * R * GROUP);
                for r in 0..R {
                    let (x0, x1) = (
                        _mm512_set1_ps(*p.add(r * 2)),
                        _mm512_set1_ps(*p.add(r * 2 + 1)),
                    );
                    acc0[r] = _mm512_fmadd_ps(x0, w0even, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(x0, w1even, acc1[r]);
                    acc0[r] = _mm512_fmadd_ps(x1, w0odd, acc0[r]);
                    acc1[r] = _mm512_fmadd_ps(x1, w1odd, acc1[r]);
                }
            }
            store(layer, [&acc0, &acc1], pair, out, first);
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const R: usize>(
        layer: &Bf16Linear,
        a: &[u16],
        pair: usize,
        out: &mut [f32],
        first: usize,
    ) {
        let (groups, w) = (
            layer.groups,
            operands::<R>(layer, a.len(), pair, out.len(), first),
        );
        let stride = groups * GROUP;
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        // SAFETY: every pointer stays inside `a`, `w` and the padded bias, checked above.
        unsafe {
            let (ap, wp) = (a.as_ptr(), w.as_ptr());
            for g in 0..groups {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(wp.add(g * GROUP_VALUES).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    wp.add((groups + g) * GROUP_VALUES).cast(),
                ));
                for r in 0..R {
                    let v = ap
                        .add(r * stride + g * GROUP)
                        .cast::<i32>()
                        .read_unaligned();
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(v));
                    acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
                    acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
                }
            }
            store(layer, [&acc0, &acc1], pair, out, first);
        }
    }
}

/// Whether the AMX kernel computes a small layer (odd rows, a padded step) as the portable
/// kernel does, within f32 rounding of the sums. Only where [`amx::available`].
pub(crate) fn amx_agrees_with_portable() -> bool {
    let c = super::check_layer();
    c.amx_matches_portable(1e-4, |isa, out| {
        let form = Avx512Form::Widened;
        let layer = Bf16Linear::pack(&c.weight, &c.bias, c.inputs, c.outputs, isa, form);
        layer.block(&c.x, out, &mut Scratch::default());
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::noise;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_split_gives_the_scalar_parts_bit_for_bit() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("SKIPPED the AVX-512 split: this CPU has no AVX-512 F/BW");
            return;
        }
        let mut x: Vec<f32> = (0..70).map(|i| (i as f32 - 35.0) * 0.123_456_7).collect();
        x[3] = f32::NAN;
        x[4] = f32::INFINITY;
        x[5] = -0.0;
        x[6] = 1.0e-40; // subnormal
        x[7] = f32::MAX;
        x[8] = 1.0 + 3.0 * f32::EPSILON; // below bf16's precision
        x[9] = f32::from_bits(0x3f80_8000); // a tie: rounds to even
        x[68] = f32::from_bits(0x3f81_8000); // a tie in the scalar tail: rounds up
        let (mut hi, mut lo) = (vec![0u16; 70], vec![0u16; 70]);
        // SAFETY: checked above.
        unsafe { x86::split_row(&x, &mut hi, &mut lo) };
        for (i, &v) in x.iter().enumerate() {
            let h = to_bf16(v);
            assert_eq!(hi[i], h, "hi of x[{i}] = {v}");
            assert_eq!(lo[i], to_bf16(v - from_bf16(h)), "lo of x[{i}] = {v}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to even (1.0).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // Just above halfway rounds up.
        assert_eq!(
            from_bf16(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0)),
            1.0 + 1.0 / 128.0
        );
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        for i in 0..10_000 {
            let x = (i as f32 - 5000.0) * 0.0371;
            let r = from_bf16(to_bf16(x));
            assert!((r - x).abs() <= x.abs() / 256.0, "{x} → {r}");
        }
    }

    /// The product of the bf16-rounded operands in f64: every kernel within f32 summation
    /// error of it.
    fn reference(layer: &Bf16Linear, x: &[f32], rows: usize) -> Vec<f64> {
        let (k, n) = (layer.inputs, layer.outputs);
        let mut out = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut sum = layer.bias[j] as f64;
                for i in 0..k {
                    let w = match &layer.widened {
                        Some(widened) => widened.weight(i, j),
                        None => from_bf16(layer.packed[Bf16Linear::index(layer.groups, i, j)]),
                    };
                    sum += from_bf16(to_bf16(x[r * k + i])) as f64 * w as f64;
                }
                out[r * n + j] = sum;
            }
        }
        out
    }

    fn isa_listed(isas: &[Isa], isa: Isa) -> bool {
        isas.contains(&isa)
    }

    /// Every kernel this CPU runs: portable, AVX2, each AVX-512 form, AMX.
    fn kernels() -> Vec<(Isa, Avx512Form)> {
        let isas = crate::kernels::testable(Kind::Bf16, "bf16");
        let kernels: Vec<(Isa, Avx512Form)> = [
            (Isa::Portable, Avx512Form::Widened),
            (Isa::Avx2, Avx512Form::Widened),
            (Isa::Avx512, Avx512Form::DotProduct),
            (Isa::Avx512, Avx512Form::Widened),
            (Isa::Amx, Avx512Form::Widened),
        ]
        .into_iter()
        .filter(|&(isa, form)| isa_listed(&isas, isa) && (isa != Isa::Avx512 || form.runs()))
        .collect();
        if Isa::Avx512.runs(Kind::Bf16) && !Avx512Form::DotProduct.runs() {
            eprintln!("SKIPPED bf16 kernel Avx512 DotProduct: this CPU has no AVX512_BF16");
        }
        kernels
    }

    #[test]
    fn every_kernel_matches_the_reference_on_odd_sizes_and_tails() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let kernels = kernels();
        for &(rows, k, n) in &[
            (1, 1, 1),
            (1, 3, 5),
            (7, 2, 16),
            (8, 5, 17),
            (9, 17, 31),
            (65, 33, 33),
            (130, 384, 48),
            (3, 383, 384),
        ] {
            let x = noise(&mut seed, rows * k, 3.0);
            let w = noise(&mut seed, k * n, 0.2);
            let b = noise(&mut seed, n, 1.0);
            for &(isa, form) in &kernels {
                let layer = Bf16Linear::pack(&w, &b, k, n, isa, form);
                let expected = reference(&layer, &x, rows);
                let mut out = vec![f32::NAN; rows * n];
                layer.forward(&x, rows, &mut out);
                // f32 accumulation of k products of magnitude ≤ 0.6: error ≲ k · 2⁻²⁴.
                let bound = 1e-6 * (k as f64).max(8.0);
                for (idx, (got, want)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (*got as f64 - want).abs() <= bound,
                        "{isa:?} {form:?} {rows}×{k}×{n}: element {idx} is {got}, expected {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_chosen_form_runs_here() {
        if Isa::Avx512.runs(Kind::Bf16) {
            assert!(Avx512Form::detect().runs());
        }
        let layer = Bf16Linear::round(&[1.0, 2.0, 3.0, 4.0], &[0.5, 0.0], 2, 2);
        assert_eq!(layer.form().is_some(), layer.isa() == Isa::Avx512);
        let mut out = [0.0f32; 2];
        layer.forward(&[1.0, -1.0], 1, &mut out);
        assert_eq!(out, [1.0 - 3.0 + 0.5, 2.0 - 4.0]);
    }

    #[test]
    fn close_to_the_f32_product_and_handles_extremes() {
        let (rows, k, n) = (16, 384, 40);
        let mut seed = 99;
        let mut x = noise(&mut seed, rows * k, 2.0);
        x[..k].fill(0.0);
        x[k] = 3.0e38; // near f32's largest: finite in bf16, no scale to overflow
        x[k + 1..2 * k].fill(0.0);
        let w = noise(&mut seed, k * n, 0.1);
        let b = noise(&mut seed, n, 1.0);
        for (isa, form) in kernels() {
            let layer = Bf16Linear::pack(&w, &b, k, n, isa, form);
            let mut out = vec![0.0f32; rows * n];
            layer.forward(&x, rows, &mut out);
            assert_eq!(
                &out[..n],
                &b[..],
                "{isa:?} {form:?}: a zero row returns the bias"
            );
            assert!(out.iter().all(|v| v.is_finite()));
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for r in 2..rows {
                for j in 0..n {
                    let exact: f64 = b[j] as f64
                        + (0..k)
                            .map(|i| x[r * k + i] as f64 * w[i * n + j] as f64)
                            .sum::<f64>();
                    err += (out[r * n + j] as f64 - exact).powi(2);
                    norm += exact * exact;
                }
            }
            let relative = (err / norm).sqrt();
            assert!(relative < 0.01, "relative error {relative}");
            assert!(
                relative > 1e-6,
                "suspiciously exact: is it rounding at all?"
            );
        }
    }
}
