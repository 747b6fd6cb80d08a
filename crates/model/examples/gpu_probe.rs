use keel_model::{Backend, BatchLimits, DeviceOptions, ModelDevice, Precision, SentenceModel};
use std::time::Instant;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let n: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(4);
    let precision = if std::env::args().nth(3).as_deref() == Some("f16") {
        Precision::F16
    } else {
        Precision::F32
    };
    let t0 = Instant::now();
    let dev = ModelDevice::open(
        Backend::Wgpu,
        DeviceOptions {
            allow_software_gpu: true,
            precision,
        },
    )
    .unwrap();
    eprintln!("open {:?} {}", t0.elapsed(), dev.adapter);
    let m = SentenceModel::load_on(&dir, dev).unwrap();
    eprintln!("load {:?}", t0.elapsed());
    let texts: Vec<String> = if n == 0 {
        std::fs::read_to_string("crates/model/tests/data/minilm-reference.jsonl")
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["text"].as_str().unwrap().to_string()
            })
            .collect()
    } else {
        (0..n)
            .map(|i| format!("BRCA{i} missense variant p.Arg{i}Trp in exon {}", i % 11))
            .collect()
    };
    let lens: Vec<usize> = texts.iter().map(|t| m.tokenize(t).unwrap().len()).collect();
    eprintln!("lengths {lens:?}");
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for round in 0..3 {
        let t = Instant::now();
        let v = m
            .embed(
                &refs,
                BatchLimits {
                    max_rows: 64,
                    max_tokens: 8192,
                },
            )
            .unwrap();
        eprintln!("round {round}: {:?} ({} floats)", t.elapsed(), v.len());
    }
}
