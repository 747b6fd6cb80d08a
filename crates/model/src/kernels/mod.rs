//! Host matrix kernels for the CPU backend's reduced precisions.
//!
//! burn's flex backend multiplies quantized tensors by dequantizing them to f32 first, and
//! bf16 tensors by converting them to f32 (burn-flex 0.22.1, `q_matmul`, `matmul_bf16`):
//! no fewer bits per multiply, so no speed-up. The Linear layers of a reduced-precision
//! model run here instead, on the host, with the CPU's own narrow dot-product
//! instructions:
//!
//! - [`int8`]: weights quantized per output channel at load, activations per row at run
//!   time, exact int32 accumulation: AVX-512 VNNI (`vpdpbusd`), AVX2
//!   (`vpmaddubsw`/`vpmaddwd`), or portable Rust;
//! - [`bf16`]: weights rounded to bf16 at load, activations per pass, f32 accumulation:
//!   AMX tiles (`tdpbf16ps`), AVX-512 BF16 (`vdpbf16ps`) or AVX-512 FMA on weights widened
//!   in registers, whichever this CPU runs faster, or portable Rust;
//! - [`bf16x3`]: f32 accuracy on those bf16 kernels (each operand split into two bf16
//!   parts, three products), what `precision: f32` runs on AMX CPUs;
//! - [`f32`]: 512-bit or 256-bit FMA, or portable Rust.
//!
//! The instruction set is chosen at run time ([`Isa::detect`]), so one binary runs on any
//! x86-64 (and, through the portable kernels, anywhere). Every kernel is unit-tested
//! against a scalar reference on odd sizes, tails and extreme values.

pub mod amx;
pub mod bf16;
pub mod bf16x3;
pub mod f32;
pub mod int8;

use std::sync::OnceLock;

/// The instruction sets the kernels are written for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isa {
    /// Plain Rust: any CPU.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 F/BW and VNNI (int8), or F (bf16; BF16 adds `vdpbf16ps`).
    Avx512,
    /// x86-64 with AMX tiles (`tdpbusd` for int8, `tdpbf16ps` for bf16), granted by the
    /// OS and verified at first use ([`amx_verified`]).
    Amx,
}

impl Isa {
    /// The most capable kernels this CPU runs for `kind`, unless `KEEL_CPU_KERNELS`
    /// (`portable`, `avx2`, `avx512` or `amx`) asks for less. Read once per process.
    pub fn detect(kind: Kind) -> Isa {
        let cap = cap();
        // The best form at or below the cap that this CPU runs for `kind` (bf16 has no
        // AVX2 form: capped at `avx2`, it runs the portable kernels, and says so).
        [Isa::Amx, Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|&isa| cap.is_none_or(|cap| isa <= cap))
            .find(|isa| isa.runs(kind))
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU runs `kind`'s kernels for this instruction set.
    pub fn runs(self, kind: Kind) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match (self, kind) {
                (Isa::Portable, _) => true,
                (Isa::Avx2, Kind::F32) => has!("avx2") && has!("fma"),
                (Isa::Avx512, Kind::F32) => has!("avx512f"),
                (Isa::Avx2, Kind::Int8) => has!("avx2") && has!("fma"),
                // AVX2 has no bf16 arithmetic: its bf16 form is the f32 FMA kernel over
                // the bf16 values (bf16::Bf16Linear).
                (Isa::Avx2, Kind::Bf16) => has!("avx2") && has!("fma"),
                (Isa::Avx512, Kind::Int8) => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
                }
                // The widened form needs AVX-512 F alone (bf16::Avx512Form).
                (Isa::Avx512, Kind::Bf16) => has!("avx512f"),
                (Isa::Amx, Kind::F32) => false,
                (Isa::Amx, kind) => amx_verified(kind),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = kind;
            self == Isa::Portable
        }
    }
}

/// The instruction set `KEEL_CPU_KERNELS` (`portable`, `avx2`, `avx512` or `amx`) caps
/// every kernel at, the Linear layers' and the element-wise ones' (GELU, LayerNorm,
/// pooling, quantization, attention) alike. Read once per process.
pub fn cap() -> Option<Isa> {
    static CAP: OnceLock<Option<Isa>> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("KEEL_CPU_KERNELS").ok()?.as_str() {
        "portable" => Some(Isa::Portable),
        "avx2" => Some(Isa::Avx2),
        "avx512" => Some(Isa::Avx512),
        "amx" => Some(Isa::Amx),
        other => {
            tracing::warn!(
                value = other,
                "KEEL_CPU_KERNELS is not portable, avx2, avx512 or amx; ignored"
            );
            None
        }
    })
}

/// Whether `KEEL_CPU_KERNELS` lets kernels use `isa` (the CPU must still have it).
pub fn allows(isa: Isa) -> bool {
    cap().is_none_or(|cap| isa <= cap)
}

/// Whether the AMX kernels for `kind` are available ([`amx::available`]) and computed a
/// small layer as the portable kernels do ([`check_layer`]). Checked once per process and
/// kind; a disagreement is logged and the AMX kernels are not used.
pub fn amx_verified(kind: Kind) -> bool {
    static BF16: OnceLock<bool> = OnceLock::new();
    static INT8: OnceLock<bool> = OnceLock::new();
    let cell = match kind {
        Kind::Bf16 => &BF16,
        Kind::Int8 => &INT8,
        Kind::F32 => return false,
    };
    *cell.get_or_init(|| {
        if !amx::available(kind) {
            return false;
        }
        let agrees = match kind {
            // f32 runs as bf16×3 on the same tiles: its kernel is checked too.
            Kind::Bf16 => bf16::amx_agrees_with_portable() && bf16x3::amx_agrees_with_portable(),
            Kind::Int8 => int8::amx_agrees_with_portable(),
            Kind::F32 => false,
        };
        if agrees {
            tracing::debug!(?kind, "AMX kernels verified against the portable kernels");
        } else {
            tracing::warn!(
                ?kind,
                "AMX kernels disagree with the portable kernels on this CPU: not used"
            );
        }
        agrees
    })
}

/// The layer the AMX kernels are checked on before use: 37 rows (a partial tile of rows)
/// × 70 inputs (a partial tile step) × 40 outputs (a partial panel pair), fixed values.
pub(crate) struct CheckLayer {
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
    pub x: Vec<f32>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl CheckLayer {
    /// Whether `block(isa, out)` (this layer's rows through kernels on `isa`) gives the
    /// same outputs on AMX as on the portable kernels, within `tolerance × (1 + |p|)`.
    pub(crate) fn amx_matches_portable(
        &self,
        tolerance: f32,
        block: impl Fn(Isa, &mut [f32]),
    ) -> bool {
        let run = |isa| {
            let mut out = vec![f32::NAN; self.rows * self.outputs];
            block(isa, &mut out);
            out
        };
        let (amx, portable) = (run(Isa::Amx), run(Isa::Portable));
        amx.iter()
            .zip(&portable)
            .all(|(a, p)| (a - p).abs() <= tolerance * (1.0 + p.abs()))
    }
}

pub(crate) fn check_layer() -> CheckLayer {
    let (rows, inputs, outputs) = (37, 70, 40);
    CheckLayer {
        rows,
        inputs,
        outputs,
        x: (0..rows * inputs)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.013)
            .collect(),
        weight: (0..inputs * outputs)
            .map(|i| ((i * 104_729 % 197) as f32 - 98.0) * 0.007)
            .collect(),
        bias: (0..outputs).map(|i| i as f32 * 0.1 - 2.0).collect(),
    }
}

/// A family of kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    F32,
    Int8,
    Bf16,
}

/// Output columns per packed weight panel: one 512-bit register of f32 or i32 lanes.
pub(crate) const PANEL: usize = 16;

/// Rows of activations each parallel task quantizes and multiplies: its quantized rows
/// and one weight panel pair stay in the core's L2 cache.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Rounds to the nearest integer, ties to even, for |x| < 2²²: plain adds that vectorise
/// on any x86-64 (`f32::round` is a libm call without SSE4.1).
#[inline(always)]
pub(crate) fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    (x + MAGIC) - MAGIC
}

/// The alignment of every buffer the kernels read whole vectors or tiles from: one cache
/// line.
pub(crate) const ALIGN: usize = 64;

/// A vector whose first value starts a cache line ([`ALIGN`]): packed weights and the
/// activations packed for them. The kernels read 64-byte rows (a 512-bit register, a row
/// of an AMX tile) at multiples of 64 bytes from the start; from a plain `Vec` (16-byte
/// aligned by the allocator) each such row spans two cache lines, and AMX tile loads ran
/// at a quarter of their speed on them (the whole tile loop at 0.27 T MAC/s instead of
/// 1.0 on a Sapphire Rapids core).
#[derive(Clone)]
pub(crate) struct Aligned<T>(aligned_vec::AVec<T, aligned_vec::ConstAlign<ALIGN>>);

impl<T> Default for Aligned<T> {
    fn default() -> Self {
        Self(aligned_vec::AVec::new(ALIGN))
    }
}

impl<T: Copy> Aligned<T> {
    /// `len` copies of `value`.
    pub(crate) fn filled(value: T, len: usize) -> Self {
        let mut v = Self::default();
        v.0.resize(len, value);
        v
    }

    /// Grows (never shrinks) to at least `len` values, new ones `value`.
    pub(crate) fn grow(&mut self, len: usize, value: T) {
        if self.0.len() < len {
            self.0.resize(len, value);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    pub(crate) fn extend(&mut self, values: impl IntoIterator<Item = T>) {
        let values = values.into_iter();
        self.0.reserve(values.size_hint().0);
        for v in values {
            self.0.push(v);
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

/// Buffers a kernel packs or quantizes a block of activation rows into, kept by the
/// caller between calls: once they have grown to the largest block, no call allocates.
/// Every one starts a cache line ([`Aligned`]).
#[derive(Default)]
pub struct Scratch {
    f32s: Aligned<f32>,
    /// bf16×3's split activation rows (held apart while the bf16 kernel uses the rest).
    pub(crate) split: Aligned<f32>,
    /// bf16's rounded activation rows on AVX2 (held apart while the f32 kernel uses the
    /// rest).
    pub(crate) rounded: Aligned<f32>,
    u16s: Aligned<u16>,
    bytes: Aligned<u8>,
    rows: Aligned<int8::RowQuant>,
}

/// `buffer`'s first `len` values, growing it (never shrinking) as needed.
fn prefix<T: Copy + Default>(buffer: &mut Aligned<T>, len: usize) -> &mut [T] {
    buffer.grow(len, T::default());
    &mut buffer[..len]
}

impl Scratch {
    pub(crate) fn f32s(&mut self, len: usize) -> &mut [f32] {
        prefix(&mut self.f32s, len)
    }

    pub(crate) fn u16s(&mut self, len: usize) -> &mut [u16] {
        prefix(&mut self.u16s, len)
    }

    /// Bytes, per-row `(step, zero)` pairs, f32 values and u16 values at once (the int8
    /// kernels).
    pub(crate) fn quantized(
        &mut self,
        bytes: usize,
        rows: usize,
        f32s: usize,
        u16s: usize,
    ) -> (&mut [u8], &mut [int8::RowQuant], &mut [f32], &mut [u16]) {
        (
            prefix(&mut self.bytes, bytes),
            prefix(&mut self.rows, rows),
            prefix(&mut self.f32s, f32s),
            prefix(&mut self.u16s, u16s),
        )
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.f32s.capacity() * 4
            + self.split.capacity() * 4
            + self.rounded.capacity() * 4
            + self.u16s.capacity() * 2
            + self.bytes.capacity()
            + self.rows.capacity() * 8
    }
}

/// The kernels of `kind` this CPU runs, each by name; the ones it cannot run are printed
/// (tests skip them by name, never silently).
#[cfg(test)]
pub(crate) fn testable(kind: Kind, family: &str) -> Vec<Isa> {
    // AMX is tested everywhere: on the CPU's tiles where it has them (verified or not: a
    // kernel that computes wrongly must fail here, not be skipped), else on the software
    // model of the tiles (the kernels' addressing and epilogues; not the instructions).
    let all = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx];
    let (runs, skipped): (Vec<Isa>, Vec<Isa>) = all.into_iter().partition(|&isa| match isa {
        Isa::Amx => kind != Kind::F32 && amx::runs(kind),
        _ => isa.runs(kind),
    });
    if runs.contains(&Isa::Amx) && !amx::available(kind) {
        eprintln!(
            "EMULATED {family} kernels [Amx]: this CPU has no AMX tiles; on the software model"
        );
    }
    // Forms that do not exist are not skipped: f32 has no AMX form.
    let skipped: Vec<Isa> = skipped
        .into_iter()
        .filter(|&isa| !(isa == Isa::Amx && kind == Kind::F32))
        .collect();
    if !skipped.is_empty() {
        eprintln!("SKIPPED {family} kernels {skipped:?}: this CPU cannot run them");
    }
    runs
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in `[-scale, scale)`.
    pub(crate) fn noise(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                ((*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn round_even_matches_std() {
        for i in -100_000..100_000 {
            let x = i as f32 * 0.00137;
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.49] {
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
    }

    /// The kernels' rate on one thread for MiniLM's four Linear shapes at 64, 128 and 256
    /// rows, every form this CPU runs natively (never the software tiles), in multiply-adds
    /// per second: one `RATE` line each (precision, kernels, rows, inputs × outputs, best
    /// of five blocks). A benchmark, not a test: ignored in test runs;
    /// `scripts/device-check.sh` runs it on the GPU machines' hosts (AMX), and
    ///
    ///     cargo test --release -p keel-model --lib layer_rates -- --ignored --nocapture
    ///
    /// anywhere.
    #[test]
    #[ignore = "a benchmark: run it with --ignored"]
    fn layer_rates() {
        use std::time::Instant;
        // KEEL_RATES_ISA=amx (avx2, avx512) measures one form only, for profiling.
        let only = std::env::var("KEEL_RATES_ISA").ok();
        let native = move |kind: Kind| {
            let only = only.clone();
            [Isa::Avx2, Isa::Avx512, Isa::Amx]
                .into_iter()
                .filter(move |&isa| match isa {
                    Isa::Amx => amx::available(kind),
                    _ => isa.runs(kind),
                })
                .filter(move |isa| {
                    only.as_deref()
                        .is_none_or(|only| format!("{isa:?}").eq_ignore_ascii_case(only))
                })
        };
        let mut seed = 5;
        for (k, n) in [(384, 1152), (384, 384), (384, 1536), (1536, 384)] {
            let w = noise(&mut seed, k * n, 0.1);
            let b = noise(&mut seed, n, 0.1);
            let outliers: Vec<usize> = (0..8).map(|i| i * 37 % k).collect();
            type Block = Box<dyn Fn(&[f32], &mut [f32], &mut Scratch)>;
            let mut layers: Vec<(&str, Isa, Block)> = Vec::new();
            for isa in native(Kind::F32) {
                let l = f32::F32Linear::pack(&w, &b, k, n).with_isa(isa);
                layers.push(("f32", isa, Box::new(move |x, o, s| l.block(x, o, s))));
            }
            for isa in native(Kind::Bf16) {
                let l = bf16::Bf16Linear::round(&w, &b, k, n).with_isa(isa);
                layers.push(("bf16", isa, Box::new(move |x, o, s| l.block(x, o, s))));
                let l = bf16x3::Bf16x3Linear::split(&w, &b, k, n).with_isa(isa);
                layers.push((
                    "f32 as bf16x3",
                    isa,
                    Box::new(move |x, o, s| l.block(x, o, s)),
                ));
            }
            for isa in native(Kind::Int8) {
                let l =
                    int8::Int8Linear::quantize_with_outliers(&w, &b, k, n, &outliers).with_isa(isa);
                layers.push(("int8", isa, Box::new(move |x, o, s| l.block(x, o, s))));
            }
            for rows in [64, 128, 256] {
                let x = noise(&mut seed, rows * k, 1.0);
                let mut out = vec![0.0f32; rows * n];
                for (precision, isa, block) in &layers {
                    let mut scratch = Scratch::default();
                    block(&x, &mut out, &mut scratch);
                    let best = (0..25)
                        .map(|_| {
                            let t = Instant::now();
                            block(&x, &mut out, &mut scratch);
                            t.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min);
                    let gmacs = (rows * k * n) as f64 / best / 1e9;
                    println!("RATE {precision} | {isa:?} | {rows} | {k}x{n} | {gmacs:.1}");
                }
            }
        }
    }

    #[test]
    fn the_portable_kernels_run_everywhere() {
        assert!(Isa::Portable.runs(Kind::Int8));
        assert!(Isa::Portable.runs(Kind::Bf16));
        // bf16's AVX2 form is the f32 FMA kernel over the bf16 values.
        assert_eq!(Isa::Avx2.runs(Kind::Bf16), Isa::Avx2.runs(Kind::F32));
        let isa = Isa::detect(Kind::Int8);
        assert!(isa.runs(Kind::Int8));
    }
}
