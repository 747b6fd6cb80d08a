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

/// GELU over a slice, in place, on this thread, on the widest vectors this CPU has
/// (chosen at run time). With AVX-512: the same rational erf on 16 lanes with fused
/// multiply-adds and the division replaced by `vrcp14ps` and one Newton step (the
/// division alone took about as long as the rest: GELU was ~10 % of a bf16 pass on AMX
/// tiles); within a few f32 ulps of [`gelu`] (`tests::the_avx512_form_stays_within_ulps`).
/// Otherwise the scalar code compiled for AVX2 or the baseline, lane for lane [`gelu`].
pub fn gelu_slice(chunk: &mut [f32]) {
    #[inline(always)]
    fn plain(chunk: &mut [f32]) {
        for v in chunk {
            *v = gelu(*v);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn half(chunk: &mut [f32]) {
            plain(chunk)
        }
        use crate::kernels::{Isa, allows};
        if allows(Isa::Avx512) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { avx512::gelu_slice(chunk) };
        }
        if allows(Isa::Avx2) && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { half(chunk) };
        }
    }
    plain(chunk)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::gelu`] on 16 lanes: the same erf polynomials, fused multiply-adds, and
    /// `p / q` as `p · rcp(q)` refined once by Newton (relative error ~2⁻²⁸ before the
    /// final rounding).
    #[target_feature(enable = "avx512f")]
    fn gelu16(x: __m512) -> __m512 {
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
        let z2 = _mm512_mul_ps(z, z);
        let mut p = _mm512_set1_ps(-2.726_142_3e-10);
        for c in [
            2.770_681_4e-8,
            -2.101_024e-6,
            -5.692_506_4e-5,
            -7.349_906_3e-4,
            -2.954_600_2e-3,
            -1.609_603_3e-2,
        ] {
            p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(c));
        }
        let mut q = _mm512_set1_ps(-1.456_607_2e-5);
        for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
            q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(c));
        }
        // 1/q: q lies in [-0.0143, -0.0068] here (never near zero).
        let r = _mm512_rcp14_ps(q);
        let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0)));
        let erf = _mm512_mul_ps(_mm512_mul_ps(z, p), r);
        let half = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
        _mm512_fmadd_ps(half, erf, half)
    }

    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_slice(chunk: &mut [f32]) {
        let n = chunk.len();
        let p = chunk.as_mut_ptr();
        let mut i = 0;
        // SAFETY: whole vectors below `n`, then one masked to the rest.
        unsafe {
            while i + 16 <= n {
                _mm512_storeu_ps(p.add(i), gelu16(_mm512_loadu_ps(p.add(i))));
                i += 16;
            }
            if i < n {
                let m: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                _mm512_mask_storeu_ps(p.add(i), m, gelu16(v));
            }
        }
    }
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
        for (i, (got, want)) in v.iter().zip(&expected).enumerate() {
            // The AVX-512 form rounds differently (fused, reciprocal): a few ulps.
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "element {i}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_form_stays_within_ulps() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED the AVX-512 GELU: this CPU has no AVX-512 F");
            return;
        }
        // Every 1/64 from -12 to 12 (past erf's clamp both ways), 16-lane blocks and a tail.
        let mut x: Vec<f32> = (-768..=768).map(|i| i as f32 / 64.0).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 3.0e38, -3.0e38]);
        let mut got = x.clone();
        // SAFETY: checked above.
        unsafe { avx512::gelu_slice(&mut got) };
        for (&x, &g) in x.iter().zip(&got) {
            let want = gelu(x) as f64;
            // GELU is 0.5·x·(1 + erf): a few ulps of (1 + erf), scaled by 0.5·|x| (for
            // x ≪ 0 both forms are the rounding noise of that cancellation).
            let bound = 4.0 * f32::EPSILON as f64 * want.abs().max(0.5 * x.abs() as f64);
            let err = (g as f64 - want).abs();
            assert!(err <= bound, "gelu({x}) = {g}, scalar {want}");
            // Against the definition as well: erf's own bound, scaled by x/2.
            let exact = 0.5 * x as f64 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
            if x.abs() <= 8.0 {
                assert!(
                    (g as f64 - exact).abs() < 5e-7 * (x.abs() as f64).max(1.0),
                    "x={x}"
                );
            }
        }
    }
}
