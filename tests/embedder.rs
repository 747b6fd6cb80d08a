//! The embedder workers, the one scheduler of `keel serve` and `keel embed`: vectors come
//! back in input order whatever the passes, and match the float64 reference.

use keel_engine::embedder::config::EmbedderConfig;
use keel_engine::embedder::workers::EmbedderWorkers;

use crate::common::repo_root;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn workers_return_vectors_in_input_order_from_many_small_passes() {
    let reference =
        std::fs::read_to_string(repo_root().join("crates/model/tests/data/minilm-reference.jsonl"))
            .unwrap();
    let refs: Vec<(String, Vec<f32>)> = reference
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let e = v["embedding"].as_array().unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                e.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            )
        })
        .collect();
    // Two workers, tiny passes: both take several and finish out of order.
    let mut cfg = EmbedderConfig {
        model_dir: repo_root().join("models/all-MiniLM-L6-v2"),
        ..Default::default()
    };
    cfg.cpu.workers = 2;
    cfg.cpu.max_batch_rows = 3;
    let groups = cfg.load_models().unwrap();
    let dim = groups[0].0.dim();
    let workers = EmbedderWorkers::start(groups, 16).unwrap();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let got = workers.handle().embed_blocking(&texts, 2).unwrap();
    assert_eq!(got.len(), texts.len() * dim);
    for ((text, expected), v) in refs.iter().zip(got.chunks_exact(dim)) {
        assert!(cosine(v, expected) > 0.99999, "{text:?} out of place");
    }
    let stats = workers.handle().stats();
    assert_eq!(stats.rows, texts.len() as u64);
    assert!(stats.passes >= (texts.len() / 3) as u64, "{stats:?}");
    workers.shutdown(std::time::Duration::from_secs(5));
}
