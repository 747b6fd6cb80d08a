//! `precision: f32` as bf16×3 (each operand split into two bf16 parts, three products,
//! f32 sums) on this CPU's bf16 kernels, against the float64 reference: the bounds of
//! exact f32 (cosine ≥ 0.99999, |diff| ≤ 1e-4 on every reference text). On AMX CPUs this
//! is what `f32` runs; elsewhere `KEEL_CPU_F32=bf16x3` asks for it, as here. A test binary
//! of its own: the choice is read once per process.

mod common;

use keel_model::{Backend, BatchLimits, SentenceModel};

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
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let limits = BatchLimits {
        max_rows: 64,
        max_tokens: 16_384,
    };
    let got = model.embed(&texts, limits).unwrap();
    let (mut worst_cos, mut worst_diff) = (1.0f64, 0.0f32);
    for (r, v) in refs.iter().zip(got.chunks_exact(model.dim())) {
        let (text, want) = (&r.text, &r.embedding);
        let diff = v
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst_cos = worst_cos.min(cosine(v, want));
        worst_diff = worst_diff.max(diff);
        assert!(
            cosine(v, want) >= 0.99999 && diff <= 1e-4,
            "{text:?}: cosine {:.8}, |diff| {diff:.2e}",
            cosine(v, want)
        );
    }
    eprintln!("bf16x3 vs float64: min cosine {worst_cos:.8}, max |diff| {worst_diff:.2e}");
}
