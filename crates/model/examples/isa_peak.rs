//! Peak multiply-accumulate rate of one core for the instructions the CPU kernels use:
//! 12 independent chains of each, so that throughput, not latency, is measured.
//!
//!     cargo run --release -p keel-model --example isa_peak
//!
//! f32 FMA (the f32 kernels), int8 `vpdpbusd` and bf16 `vdpbf16ps` (the AVX-512 int8 and
//! bf16 kernels), and the AMX tile products `tdpbusd` and `tdpbf16ps` (the AMX kernels;
//! four accumulator tiles, as they use them). Instructions the CPU (or, for AMX, the OS)
//! does not offer are skipped, with a line saying so.
use std::time::Instant;

const N: usize = 120_000_000;

fn report(name: &str, secs: f64, macs_per_instruction: f64) {
    println!(
        "{name:<28} {:>5.2} G instructions/s  {:>6.0} GMAC/s",
        N as f64 / secs / 1e9,
        N as f64 * macs_per_instruction / secs / 1e9
    );
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    use super::{N, report};

    macro_rules! chains {
        ($name:expr, $macs:expr, $zero:expr, $x:expr, $op:expr) => {{
            let mut acc = [$zero; 12];
            let x = black_box($x);
            let t = Instant::now();
            for _ in 0..N / 12 {
                for a in acc.iter_mut() {
                    *a = $op(*a, x);
                }
            }
            black_box(&acc);
            report($name, t.elapsed().as_secs_f64(), $macs);
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn avx2() {
        chains!(
            "f32 FMA, 256-bit",
            8.0,
            _mm256_setzero_ps(),
            _mm256_set1_ps(1e-9),
            |a, x| { _mm256_fmadd_ps(a, x, x) }
        );
    }

    #[target_feature(enable = "avx512f")]
    pub fn avx512() {
        chains!(
            "f32 FMA, 512-bit",
            16.0,
            _mm512_setzero_ps(),
            _mm512_set1_ps(1e-9),
            |a, x| { _mm512_fmadd_ps(a, x, x) }
        );
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub fn vnni() {
        chains!(
            "int8 vpdpbusd, 512-bit",
            64.0,
            _mm512_setzero_si512(),
            _mm512_set1_epi8(1),
            |a, x| { _mm512_dpbusd_epi32(a, x, x) }
        );
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub fn bf16() {
        let h = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-9), _mm512_set1_ps(1e-9));
        chains!(
            "bf16 vdpbf16ps, 512-bit",
            32.0,
            _mm512_setzero_ps(),
            h,
            |a, x| { _mm512_dpbf16_ps(a, x, x) }
        );
    }
}

fn main() {
    let t = Instant::now();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // SAFETY (each call): the CPU has the features the function is compiled for.
        if has!("avx2") && has!("fma") {
            unsafe { x86::avx2() };
        }
        if has!("avx512f") {
            unsafe { x86::avx512() };
        }
        if has!("avx512f") && has!("avx512vnni") {
            unsafe { x86::vnni() };
        }
        if has!("avx512f") && has!("avx512bf16") {
            unsafe { x86::bf16() };
        }
    }
    use keel_model::kernels::{Kind, amx};
    for (name, kind) in [
        ("bf16 AMX tdpbf16ps", Kind::Bf16),
        ("int8 AMX tdpbusd", Kind::Int8),
    ] {
        match amx::peak_macs_per_second(kind, 2_000_000) {
            Some(macs) => println!("{name:<28} {:>17.0} GMAC/s", macs / 1e9),
            None => println!("{name:<28} skipped: no AMX tiles on this CPU or OS"),
        }
    }
    eprintln!("({:.1} s)", t.elapsed().as_secs_f64());
}
