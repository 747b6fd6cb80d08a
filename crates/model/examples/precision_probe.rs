//! How far each reduced precision moves the sentence vectors, overall and layer by layer.
//!
//!     cargo run --release -p keel-model --features gpu --example precision_probe -- MODEL_DIR TEXTS_FILE [layers]
//!
//! Embeds every line of TEXTS_FILE in f32, bf16 and int8 on the CPU and prints the min and
//! mean cosine of each to f32. With `layers`, also each Linear layer alone in int8 (every
//! other layer f32): the per-layer sensitivity table of docs/BENCHMARKS.md.
use std::path::{Path, PathBuf};

use keel_model::{
    Backend, BatchLimits, DeviceOptions, LayerPrecision, LinearRole, ModelDevice, Precision,
    SentenceModel,
};

fn load(dir: &Path, precision: Precision, overrides: &[LayerPrecision]) -> SentenceModel {
    let device = ModelDevice::open(
        Backend::Cpu,
        DeviceOptions {
            precision,
            ..DeviceOptions::default()
        },
    )
    .expect("cpu device");
    SentenceModel::load_with(dir, device, overrides).expect("model loads")
}

fn cosines(a: &[f32], b: &[f32], dim: usize) -> (f64, f64) {
    let (min, mean, _) = cosines_at(a, b, dim);
    (min, mean)
}

/// Min and mean cosine, and the row of the min.
fn cosines_at(a: &[f32], b: &[f32], dim: usize) -> (f64, f64, usize) {
    let (mut min, mut sum, mut n, mut at) = (f64::MAX, 0.0, 0, 0);
    for (x, y) in a.chunks_exact(dim).zip(b.chunks_exact(dim)) {
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
        let c = dot / (nx * ny).max(1e-30);
        if c < min {
            min = c;
            at = n;
        }
        sum += c;
        n += 1;
    }
    (min, sum / n.max(1) as f64, at)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("MODEL_DIR"));
    let texts = std::fs::read_to_string(args.get(2).expect("TEXTS_FILE")).expect("texts");
    let texts: Vec<&str> = texts.lines().collect();
    let layers = args.get(3).map(String::as_str) == Some("layers");
    let except = args.get(3).map(String::as_str) == Some("except");
    let limits = BatchLimits {
        max_rows: 32,
        max_tokens: 8192,
    };
    let reference = load(&dir, Precision::F32, &[]);
    let dim = reference.dim();
    let f32v = reference.embed(&texts, limits).expect("embed");
    println!("texts: {}", texts.len());
    for precision in [Precision::Bf16, Precision::Int8] {
        let m = load(&dir, precision, &[]);
        let v = m.embed(&texts, limits).expect("embed");
        let (min, mean, at) = cosines_at(&f32v, &v, dim);
        println!(
            "{:>5}: min cosine {min:.5} (text {at}: {:?}), mean {mean:.6}, weights {:.1} MB, Linear {:.1} MB ({})",
            precision.name(),
            texts[at].chars().take(60).collect::<String>(),
            m.weight_bytes() as f64 / 1e6,
            m.linear_bytes() as f64 / 1e6,
            m.device().adapter
        );
    }
    if except {
        println!("kept in f32         min cosine  mean cosine   (every other layer int8)");
        let n = reference.spec().num_layers;
        let mut cases: Vec<(String, Vec<LayerPrecision>)> = LinearRole::ALL
            .iter()
            .map(|&role| {
                let keep = (0..n)
                    .map(|layer| LayerPrecision {
                        layer,
                        role,
                        precision: Precision::F32,
                    })
                    .collect();
                (format!("every {role:?}"), keep)
            })
            .collect();
        for layer in 0..n {
            cases.push((
                format!("layer {layer} Qkv"),
                vec![LayerPrecision {
                    layer,
                    role: LinearRole::Qkv,
                    precision: Precision::F32,
                }],
            ));
        }
        for (name, keep) in cases {
            let v = load(&dir, Precision::Int8, &keep)
                .embed(&texts, limits)
                .expect("embed");
            let (min, mean) = cosines(&f32v, &v, dim);
            println!("{name:<18} {min:.5}     {mean:.6}");
        }
    }
    if layers {
        println!("layer role       min cosine  mean cosine   (only this layer in int8)");
        for layer in 0..reference.spec().num_layers {
            for role in LinearRole::ALL {
                let only = [LayerPrecision {
                    layer,
                    role,
                    precision: Precision::Int8,
                }];
                let v = load(&dir, Precision::F32, &only)
                    .embed(&texts, limits)
                    .expect("embed");
                let (min, mean) = cosines(&f32v, &v, dim);
                println!(
                    "{layer:>5} {:<10} {min:.5}     {mean:.6}",
                    format!("{role:?}")
                );
            }
        }
    }
}
