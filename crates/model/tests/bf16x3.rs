//! `precision: f32` as bf16×3 (each operand split into two bf16 parts, three products,
//! f32 sums) on this CPU's bf16 kernels, against the float64 reference: the bounds of
//! exact f32 (cosine ≥ 0.99999, |diff| ≤ 1e-4 on every reference text). On AMX CPUs this
//! is what `f32` runs; elsewhere `KEEL_CPU_F32=bf16x3` asks for it, as here. A test binary
//! of its own: the choice is read once per process.

mod common;

use keel_model::{Backend, SentenceModel};

use common::*;

#[test]
fn f32_as_bf16x3_is_within_the_bounds_of_exact_f32() {
    // SAFETY: this binary's only test sets the variable before any thread reads it.
    unsafe { std::env::set_var("KEEL_CPU_F32", "bf16x3") };
    let dir = model_dir();
    let model = SentenceModel::load(&dir, Backend::Cpu).expect("model loads");
    let adapter = &model.device().adapter;
    assert!(
        adapter.contains("f32") && adapter.contains("bf16x3"),
        "{adapter}"
    );
    let (worst_cos, worst_diff) = assert_within_exact_f32(&model);
    eprintln!("bf16x3 vs float64: min cosine {worst_cos:.8}, max |diff| {worst_diff:.2e}");
}
