//! What the model crate's test binaries share: where the model and the float64 reference
//! are, and how vectors are compared. (Each binary uses some of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// This crate's folder (`crates/model`).
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn repo_root() -> PathBuf {
    crate_dir().join("../..")
}

/// MiniLM (`scripts/fetch-model.sh`), or `KEEL_TEST_MODEL_DIR`.
pub fn model_dir() -> PathBuf {
    std::env::var_os("KEEL_TEST_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/all-MiniLM-L6-v2"))
}

pub struct Reference {
    pub text: String,
    pub embedding: Vec<f32>,
}

/// The 20 reference texts with their float64 vectors (`tests/data/minilm-reference.jsonl`,
/// made by `scripts/tools/minilm_ref.py`).
pub fn reference() -> Vec<Reference> {
    let path = crate_dir().join("tests/data/minilm-reference.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            Reference {
                text: v["text"].as_str().unwrap().to_string(),
                embedding: v["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Embeds the reference texts with `model` and checks every vector against the float64
/// reference within exact f32's bounds (cosine ≥ 0.99999, |diff| ≤ 1e-4); returns the
/// worst cosine and difference.
pub fn assert_within_exact_f32(model: &keel_model::SentenceModel) -> (f64, f32) {
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let limits = keel_model::BatchLimits {
        max_rows: 64,
        max_tokens: 16_384,
    };
    let got = model.embed(&texts, limits).unwrap();
    let (mut worst_cos, mut worst_diff) = (1.0f64, 0.0f32);
    for (r, v) in refs.iter().zip(got.chunks_exact(model.dim())) {
        let diff = v
            .iter()
            .zip(&r.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let cos = cosine(v, &r.embedding);
        worst_cos = worst_cos.min(cos);
        worst_diff = worst_diff.max(diff);
        assert!(
            cos >= 0.99999 && diff <= 1e-4,
            "{:?}: cosine {cos:.8}, |diff| {diff:.2e}",
            r.text
        );
    }
    (worst_cos, worst_diff)
}
