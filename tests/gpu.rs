//! The `wgpu` backend, on whatever adapter the machine has. In CI that is Mesa's lavapipe
//! (software Vulkan, which `scripts/test.sh` installs), so the GPU code path — WGSL kernels,
//! device memory, the adapter check — is proven on machines without a GPU. Speed is not
//! judged here: lavapipe runs the kernels on the CPU.

use keel_model::{Backend, BatchLimits, DeviceOptions, ModelDevice, ModelError, SentenceModel};

use crate::common::*;

const SOFTWARE_OK: DeviceOptions = DeviceOptions {
    allow_software_gpu: true,
};

fn model_dir() -> std::path::PathBuf {
    repo_root().join("models/all-MiniLM-L6-v2")
}

fn gpu_model() -> SentenceModel {
    let device = ModelDevice::open(Backend::Wgpu, SOFTWARE_OK).expect(
        "a Vulkan adapter (install Mesa's lavapipe: apt-get install mesa-vulkan-drivers; \
         scripts/test.sh does)",
    );
    SentenceModel::load_on(&model_dir(), device).expect("the model loads on the GPU backend")
}

fn reference() -> Vec<(String, Vec<f32>)> {
    let text =
        std::fs::read_to_string(repo_root().join("crates/model/tests/data/minilm-reference.jsonl"))
            .unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let e = v["embedding"].as_array().unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                e.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            )
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

const LIMITS: BatchLimits = BatchLimits {
    max_rows: 64,
    max_tokens: 8192,
};

#[test]
fn reference_texts_match_the_float64_reference_on_the_gpu_backend() {
    let model = gpu_model();
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let got = model.embed(&texts, LIMITS).unwrap();
    for ((text, expected), v) in refs.iter().zip(got.chunks_exact(model.dim())) {
        let diff = v
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "{text:?}: max |diff| {diff:.2e}");
        assert!(cosine(v, expected) >= 0.99999, "{text:?}");
    }
}

#[test]
fn a_vector_does_not_depend_on_its_batch_on_the_gpu_backend() {
    let model = gpu_model();
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let together = model.embed(&texts, LIMITS).unwrap();
    let dim = model.dim();
    for (i, text) in texts.iter().enumerate().step_by(5) {
        let alone = model.embed(&[text], LIMITS).unwrap();
        let diff = alone
            .iter()
            .zip(&together[i * dim..(i + 1) * dim])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-5,
            "{text:?}: alone vs in a batch differ by {diff:.2e}"
        );
    }
}

#[test]
fn a_cleanup_returns_pooled_device_memory() {
    let model = gpu_model();
    let texts: Vec<String> = (0..64)
        .map(|i| format!("BRCA{i} missense variant p.Arg{i}Trp in exon {}", i % 11))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    model.embed(&refs, LIMITS).unwrap();
    let before = model
        .device()
        .memory()
        .expect("the GPU backend reports its pool");
    assert!(before.reserved_bytes >= before.in_use_bytes, "{before:?}");
    assert!(model.release_pooled_memory());
    let after = model.device().memory().unwrap();
    assert!(
        after.reserved_bytes < before.reserved_bytes,
        "reserved {} before the cleanup, {} after",
        before.reserved_bytes,
        after.reserved_bytes
    );
    // The weights stay: the model still embeds.
    assert_eq!(
        model.embed(&refs[..2], LIMITS).unwrap().len(),
        2 * model.dim()
    );
}

#[test]
fn a_software_adapter_is_refused_unless_allowed() {
    match ModelDevice::open(Backend::Wgpu, DeviceOptions::default()) {
        // A machine with a GPU: the adapter is a hardware one.
        Ok(device) => assert!(!device.adapter.contains(", Cpu,"), "{}", device.adapter),
        Err(e @ ModelError::NoGpu { .. }) => {
            let message = e.to_string();
            assert!(message.contains("allow_software_gpu"), "{message}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_gpu_backend_answers_with_the_cpu_backends_vectors() {
    let server = TestServer::start(|s| {
        s.embedder.backend = Backend::Wgpu;
        s.embedder.allow_software_gpu = true;
        s.embedder.workers = 1;
    })
    .await;
    let mut client = server.client().await;
    let texts: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "TP53 chr17:{} C>T missense_variant {}",
                7_670_000 + i,
                i % 7
            )
        })
        .collect();
    let batch = text_batch(&texts.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    let out = exchange(&mut client, embed_path(), vec![batch])
        .await
        .unwrap();
    let stats = action(&mut client, "stats", "").await;
    assert!(
        stats["embedder"]["device_memory"]["reserved_bytes"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        stats["embedder"]
    );
    server.stop().await;

    let cpu = SentenceModel::load(&model_dir(), Backend::Cpu).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let expected = cpu.embed(&refs, LIMITS).unwrap();
    let dim = cpu.dim();
    let mut row = 0;
    for b in &out {
        let list = b
            .column_by_name("embedding")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::FixedSizeListArray>()
            .unwrap();
        for i in 0..b.num_rows() {
            let v = list.value(i);
            let v = v
                .as_any()
                .downcast_ref::<arrow_array::Float32Array>()
                .unwrap()
                .values()
                .to_vec();
            let c = cosine(&v, &expected[row * dim..(row + 1) * dim]);
            assert!(c >= 0.99999, "row {row}: cosine {c}");
            row += 1;
        }
    }
    assert_eq!(row, texts.len());
}
