//! A CPU without AVX2 or AVX-512 (`KEEL_CPU_KERNELS=portable`): the whole forward pass on
//! the portable kernels (Linear layers, attention, GELU, LayerNorm, pooling) against the
//! float64 reference, within the bounds of exact f32. A test binary of its own: the cap
//! is read once per process.

mod common;

use keel_model::{Backend, BatchLimits, SentenceModel};

use common::*;

#[test]
fn the_portable_kernels_alone_stay_within_the_bounds_of_exact_f32() {
    // SAFETY: this binary's only test sets the variables before any thread reads them.
    unsafe {
        std::env::set_var("KEEL_CPU_KERNELS", "portable");
        std::env::set_var("KEEL_CPU_F32", "fma");
    }
    assert!(!keel_model::kernels::allows(keel_model::kernels::Isa::Avx2));
    let model = SentenceModel::load(&model_dir(), Backend::Cpu).expect("model loads");
    let adapter = &model.device().adapter;
    assert!(adapter.contains("portable"), "{adapter}");
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let limits = BatchLimits {
        max_rows: 64,
        max_tokens: 16_384,
    };
    let got = model.embed(&texts, limits).unwrap();
    for (r, v) in refs.iter().zip(got.chunks_exact(model.dim())) {
        let diff = v
            .iter()
            .zip(&r.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            cosine(v, &r.embedding) >= 0.99999 && diff <= 1e-4,
            "{:?}: cosine {:.8}, |diff| {diff:.2e}",
            r.text,
            cosine(v, &r.embedding)
        );
    }
}
