//! A CPU without AVX2 or AVX-512 (`KEEL_CPU_KERNELS=portable`): the whole forward pass on
//! the portable kernels (Linear layers, attention, GELU, LayerNorm, pooling) against the
//! float64 reference, within the bounds of exact f32. A test binary of its own: the cap
//! is read once per process.

mod common;

use keel_model::{Backend, SentenceModel};

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
    assert_within_exact_f32(&model);
}
