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
//!   AVX-512 BF16 (`vdpbf16ps`) or AVX-512 FMA on weights widened in registers, whichever
//!   this CPU runs faster, or portable Rust.
//!
//! The instruction set is chosen at run time ([`Isa::detect`]), so one binary runs on any
//! x86-64 (and, through the portable kernels, anywhere). Every kernel is unit-tested
//! against a scalar reference on odd sizes, tails and extreme values.

pub mod bf16;
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
}

impl Isa {
    /// The most capable kernels this CPU runs for `kind`, unless `KEEL_CPU_KERNELS`
    /// (`portable`, `avx2` or `avx512`) asks for less. Read once per process.
    pub fn detect(kind: Kind) -> Isa {
        static CAP: OnceLock<Option<Isa>> = OnceLock::new();
        let cap = *CAP.get_or_init(|| match std::env::var("KEEL_CPU_KERNELS").ok()?.as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            other => {
                tracing::warn!(
                    value = other,
                    "KEEL_CPU_KERNELS is not portable, avx2 or avx512; ignored"
                );
                None
            }
        });
        let best = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.runs(kind))
            .unwrap_or(Isa::Portable);
        cap.map_or(best, |cap| cap.min(best))
    }

    /// Whether this CPU runs `kind`'s kernels for this instruction set.
    pub fn runs(self, kind: Kind) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match (self, kind) {
                (Isa::Portable, _) => true,
                (Isa::Avx2, Kind::Int8) => has!("avx2") && has!("fma"),
                // The bf16 kernels have no AVX2 form: AVX2 has no bf16 arithmetic.
                (Isa::Avx2, Kind::Bf16) => false,
                (Isa::Avx512, Kind::Int8) => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
                }
                // The widened form needs AVX-512 F alone (bf16::Avx512Form).
                (Isa::Avx512, Kind::Bf16) => has!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = kind;
            self == Isa::Portable
        }
    }
}

/// A family of kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_portable_kernels_run_everywhere() {
        assert!(Isa::Portable.runs(Kind::Int8));
        assert!(Isa::Portable.runs(Kind::Bf16));
        assert!(!Isa::Avx2.runs(Kind::Bf16));
        let isa = Isa::detect(Kind::Int8);
        assert!(isa.runs(Kind::Int8));
    }
}
