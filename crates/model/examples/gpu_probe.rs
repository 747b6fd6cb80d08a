//! Times MiniLM's passes on the `wgpu` backend: the first (kernel compilation and
//! autotuning) and the next ones (compiled). A software adapter is accepted, so this is
//! how the lavapipe figures in docs/OPERATIONS.md were measured.
//!
//! ```sh
//! cargo run --release -p keel-model --features gpu --example gpu_probe -- MODEL_DIR [N [f16]]
//! ```
//! N texts of ~16 tokens (N = 0: the 20 reference texts of the model tests); `f16` computes
//! in half precision.

use std::time::Instant;

use keel_model::{Backend, BatchLimits, DeviceOptions, ModelDevice, Precision, SentenceModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: gpu_probe MODEL_DIR [N [f16]]")?);
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let precision = match args.next().as_deref() {
        Some("f16") => Precision::F16,
        _ => Precision::F32,
    };
    let started = Instant::now();
    let options = DeviceOptions {
        allow_software_gpu: true,
        precision,
        // KEEL_FUSION=0 runs every operation as its own kernel.
        fusion: std::env::var("KEEL_FUSION").map_or(true, |v| v != "0"),
    };
    let device = ModelDevice::open(Backend::Wgpu, options)?;
    eprintln!(
        "adapter {} opened in {:?}",
        device.adapter,
        started.elapsed()
    );
    let model = SentenceModel::load_on(&dir, device)?;
    eprintln!("model loaded at {:?}", started.elapsed());
    let texts: Vec<String> = if n == 0 {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/minilm-reference.jsonl"
        );
        std::fs::read_to_string(path)?
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map(|v| v["text"].as_str().unwrap_or("").to_string())
            })
            .collect::<Result<_, _>>()?
    } else {
        (0..n)
            .map(|i| format!("BRCA{i} missense variant p.Arg{i}Trp in exon {}", i % 11))
            .collect()
    };
    let lengths = texts
        .iter()
        .map(|t| model.tokenize(t).map(|ids| ids.len()))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!("{} texts, token lengths {lengths:?}", texts.len());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let limits = BatchLimits {
        max_rows: 64,
        max_tokens: 8192,
    };
    let mut got = Vec::new();
    // KEEL_ROUNDS passes (default 3): the first compiles and autotunes.
    let rounds: usize = std::env::var("KEEL_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for round in 0..rounds {
        let t = Instant::now();
        got = model.embed(&refs, limits)?;
        eprintln!("pass {round}: {:?}", t.elapsed());
    }
    // Against the CPU backend (f32) on the same weights.
    let expected = SentenceModel::load(&dir, Backend::Cpu)?.embed(&refs, limits)?;
    let dim = model.dim();
    let (mut worst_cosine, mut worst_diff) = (1.0f64, 0.0f32);
    for (a, b) in got.chunks_exact(dim).zip(expected.chunks_exact(dim)) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        worst_cosine = worst_cosine.min(dot / (norm(a) * norm(b)));
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        worst_diff = worst_diff.max(diff);
    }
    eprintln!(
        "{precision:?} against the cpu backend: min cosine {worst_cosine:.7}, max |diff| {worst_diff:.2e}"
    );
    Ok(())
}
