//! Exact (erf) GELU for the CPU backend: branch-free, vectorisable, parallel.
//!
//! burn's flex backend computes GELU with a scalar `libm::erff` per element on one thread,
//! which was about half of MiniLM's forward time on two cores. Here `erf` is a rational
//! minimax approximation on `[-4, 4]` (the form used by Eigen and XLA; beyond ±4, f32 erf
//! is ±1): no branches and no calls, so the compiler vectorises the loop, and rayon
//! spreads it over the worker's threads. Its error against f64 `erf` is below 3e-7
//! (`tests::erf_is_within_3e7_of_the_integral`), well inside what the reference tests allow.

use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

/// `erf(x)` for f32, max absolute error < 3e-7.
///
/// Plain `a * b + c`, not `mul_add`: without FMA in the baseline x86-64 target,
/// `mul_add` is a libm call per element and nothing vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_2e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// `0.5 · x · (1 + erf(x / √2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU over a slice, in place, in parallel on the current rayon pool.
pub fn gelu_in_place(values: &mut [f32]) {
    values.par_chunks_mut(CHUNK).for_each(gelu_slice);
}

/// GELU over a slice, in place, on this thread: the same scalar code compiled for the
/// widest vectors this CPU has (chosen at run time), lane for lane the same IEEE
/// operations, so the same results, 4–16 at a time.
pub fn gelu_slice(chunk: &mut [f32]) {
    #[inline(always)]
    fn plain(chunk: &mut [f32]) {
        for v in chunk {
            *v = gelu(*v);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide(chunk: &mut [f32]) {
            plain(chunk)
        }
        #[target_feature(enable = "avx2")]
        fn half(chunk: &mut [f32]) {
            plain(chunk)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { wide(chunk) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { half(chunk) };
        }
    }
    plain(chunk)
}

/// GELU of a tensor through host memory (for backends whose memory is host memory).
pub fn gelu_tensor<const D: usize>(t: Tensor<D>, device: &Device) -> Tensor<D> {
    let mut data = t.into_data();
    gelu_in_place(
        data.as_mut_slice::<f32>()
            .expect("the model computes in f32"),
    );
    Tensor::from_data(data, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf(x) = 2/√π ∫₀ˣ e^{-t²} dt by composite Simpson: exact to ~1e-15 here, and
    /// independent of any erf implementation.
    fn erf64(x: f64) -> f64 {
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            let w = if i % 2 == 1 { 4.0 } else { 2.0 };
            s += w * f(i as f64 * h);
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_3e7_of_the_integral() {
        let mut worst = 0.0f64;
        let mut x = -6.0f64;
        while x <= 6.0 {
            let err = (erf(x as f32) as f64 - erf64(x)).abs();
            worst = worst.max(err);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst erf error {worst}");
    }

    #[test]
    fn gelu_matches_definition_and_is_odd_symmetric_around_identity() {
        // gelu(x) - gelu(-x) = x for exact GELU.
        for i in -400..=400 {
            let x = i as f32 * 0.02;
            let exact = 0.5 * x as f64 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
            // erf's absolute error is scaled by x/2 in GELU.
            let bound = 5e-7 * (x.abs() as f64).max(1.0);
            assert!((gelu(x) as f64 - exact).abs() < bound, "x={x}");
            assert!(
                ((gelu(x) - gelu(-x) - x) as f64).abs() < 2.0 * bound,
                "x={x}"
            );
        }
    }

    #[test]
    fn in_place_covers_every_element_across_chunks() {
        let mut v: Vec<f32> = (0..CHUNK * 3 + 17)
            .map(|i| (i % 97) as f32 / 10.0 - 4.8)
            .collect();
        let expected: Vec<f32> = v.iter().map(|x| gelu(*x)).collect();
        gelu_in_place(&mut v);
        assert_eq!(v, expected);
    }
}
