//! The `wgpu` backend, on whatever adapter the machine has. In CI that is Mesa's lavapipe
//! (software Vulkan, which `scripts/test.sh` installs), so the GPU code path — WGSL kernels,
//! sequence-length buckets, f16, the warm-up, device memory, the adapter check — is proven
//! on machines without a GPU. Speed is not judged here.
//!
//! lavapipe runs burn's kernels on one CPU thread at under 1 GFLOP/s (measured: a
//! 64 × 384 · 384 × 1536 matmul takes ~100 ms), so a MiniLM pass over the 20 reference
//! texts, two of them 256 tokens long, takes over seven minutes there (compiling and
//! autotuning included). The tests therefore run MiniLM on the 18 reference texts of up
//! to 32 tokens, with kernel fusion on (in this process) and off (`keel embed` in a
//! process of its own), and a tiny BERT with random weights — same architecture, same
//! code, MiniLM's tokenizer — wherever a test needs many passes, a server or every pass
//! shape. `scripts/device-check.sh` runs all 20 reference texts on a real GPU.

use std::path::Path;

use keel_engine::embedder::config::Backends;
use keel_model::{
    Backend, BatchLimits, DeviceOptions, ModelDevice, ModelError, Precision, SentenceModel,
};

use crate::common::*;

fn options(precision: Precision) -> DeviceOptions {
    DeviceOptions {
        allow_software_gpu: true,
        precision,
        fusion: true,
    }
}

fn gpu_model(dir: &Path, precision: Precision) -> SentenceModel {
    let device = ModelDevice::open(Backend::Wgpu, options(precision)).expect(
        "a Vulkan adapter (install Mesa's lavapipe: apt-get install mesa-vulkan-drivers; \
         scripts/test.sh does)",
    );
    SentenceModel::load_on(dir, device).expect("the model loads on the GPU backend")
}

fn cpu_model(dir: &Path) -> SentenceModel {
    SentenceModel::load(dir, Backend::Cpu).unwrap()
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

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// The reference texts the tests run MiniLM on: all but the two of 256 tokens (18 of 20,
/// 3 to 30 tokens, four sequence buckets). Those two alone take lavapipe over seven
/// minutes (see the module note); `scripts/device-check.sh` runs all 20 on a GPU.
const REFERENCE_TOKENS: usize = 32;

const LIMITS: BatchLimits = BatchLimits {
    max_rows: 64,
    max_tokens: 8192,
};

/// Variant-like texts of many lengths (3 to ~60 tokens): several sequence buckets.
fn variant_texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut t = format!(
                "BRCA{} chr17:{} C>T missense_variant",
                i % 3,
                43_000_000 + i
            );
            for _ in 0..(i % 9) {
                t.push_str(" p.Arg1699Trp deleterious");
            }
            t
        })
        .collect()
}

/// MiniLM on the GPU backend (fusion on) against the float64 reference: the reference
/// texts of up to 32 tokens (see the module note for why not all), over four buckets.
#[test]
fn minilm_on_the_gpu_backend_matches_the_float64_reference() {
    let model = gpu_model(&repo_root().join("models/all-MiniLM-L6-v2"), Precision::F32);
    let refs: Vec<(String, Vec<f32>)> = reference()
        .into_iter()
        .filter(|(t, _)| model.tokenize(t).unwrap().len() <= REFERENCE_TOKENS)
        .collect();
    assert!(refs.len() >= 10, "{} reference texts", refs.len());
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let got = model.embed(&texts, LIMITS).unwrap();
    for ((text, expected), v) in refs.iter().zip(got.chunks_exact(model.dim())) {
        let diff = max_diff(v, expected);
        assert!(diff <= 1e-4, "{text:?}: max |diff| {diff:.2e}");
        assert!(cosine(v, expected) >= 0.99999, "{text:?}");
    }
}

/// The GPU backend computes what the CPU backend computes, pass after pass, over several
/// sequence buckets, in f32 (1e-5) and in f16 (stated bound: cosine ≥ 0.999).
#[test]
fn the_gpu_backend_matches_the_cpu_backend_in_f32_and_f16() {
    let tiny = tiny_bert();
    let cpu = cpu_model(tiny.path());
    let texts = variant_texts(40);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let limits = BatchLimits {
        max_rows: 16,
        max_tokens: 1024,
    };
    let expected = cpu.embed(&refs, limits).unwrap();
    let dim = cpu.dim();
    let f32_model = gpu_model(tiny.path(), Precision::F32);
    let got = f32_model.embed(&refs, limits).unwrap();
    for (i, (v, e)) in got
        .chunks_exact(dim)
        .zip(expected.chunks_exact(dim))
        .enumerate()
    {
        assert!(
            max_diff(v, e) <= 1e-5,
            "row {i}: f32 differs by {:.2e}",
            max_diff(v, e)
        );
    }
    let f16_model = match ModelDevice::open(Backend::Wgpu, options(Precision::F16)) {
        Ok(device) => SentenceModel::load_on(tiny.path(), device).unwrap(),
        // An adapter without shader-f16 is refused with a reason, never run wrong.
        Err(e @ ModelError::Precision(_)) => {
            assert!(e.to_string().contains("f16"), "{e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let got = f16_model.embed(&refs, limits).unwrap();
    let mut worst = 1.0f64;
    for (v, e) in got.chunks_exact(dim).zip(expected.chunks_exact(dim)) {
        worst = worst.min(cosine(v, e));
    }
    assert!(worst >= 0.999, "f16: worst cosine to f32 {worst:.6}");
    // It is f16: the rounding shows.
    assert!(max_diff(&got, &expected) > 1e-6);
}

#[test]
fn a_vector_does_not_depend_on_its_batch_or_bucket_on_the_gpu_backend() {
    let tiny = tiny_bert();
    let model = gpu_model(tiny.path(), Precision::F32);
    let texts = variant_texts(24);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let together = model.embed(&refs, LIMITS).unwrap();
    let dim = model.dim();
    for (i, text) in refs.iter().enumerate().step_by(5) {
        let alone = model.embed(&[text], LIMITS).unwrap();
        let diff = max_diff(&alone, &together[i * dim..(i + 1) * dim]);
        assert!(
            diff <= 1e-5,
            "{text:?}: alone vs in a batch differ by {diff:.2e}"
        );
    }
}

#[test]
fn passes_are_padded_to_sequence_buckets_on_the_gpu_and_not_on_the_host() {
    let tiny = tiny_bert();
    let gpu = gpu_model(tiny.path(), Precision::F32);
    let cpu = cpu_model(tiny.path());
    assert_eq!(gpu.padded_length(9), 16);
    assert_eq!(gpu.padded_length(33), 48);
    assert_eq!(cpu.padded_length(9), 9);
    // The warm-up runs every (bucket, power-of-two rows) shape the limits allow.
    let limits = BatchLimits {
        max_rows: 4,
        max_tokens: 64,
    };
    let passes = gpu.warm_up(limits);
    // Buckets 8..=64 with rows 1, 2, 4 (capped by 64 tokens): 8→3, 16→3, 24→2 (1, 2),
    // 32→2, 48→1, 64→1; above 64 tokens a bucket still gets its one-row pass.
    let buckets_above: usize = keel_model::LENGTH_BUCKETS
        .iter()
        .filter(|&&b| b > 64 && b <= gpu.spec().max_seq_length)
        .count();
    assert_eq!(passes, 3 + 3 + 2 + 2 + 1 + 1 + buckets_above);
    assert_eq!(cpu.warm_up(limits), 1);
}

#[test]
fn a_cleanup_returns_pooled_device_memory() {
    let tiny = tiny_bert();
    let model = gpu_model(tiny.path(), Precision::F32);
    let texts = variant_texts(64);
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
            assert!(message.contains("embedder.gpu.allow_software"), "{message}");
        }
        Err(e) => panic!("{e}"),
    }
}

/// `keel serve` with GPU and CPU workers side by side on one queue: health answers only
/// once the GPU worker is warm, every row comes back with the CPU backend's vector
/// whichever worker ran it, device memory shows in stats, and a cleanup returns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_gpu_and_cpu_workers_answers_with_the_cpu_backends_vectors() {
    let tiny = tiny_bert();
    let dir = tiny.path().to_path_buf();
    let server = TestServer::start(|s| {
        s.embedder.model_dir = dir.clone();
        s.embedder.backend = Backends::Both;
        s.embedder.gpu.allow_software = true;
        s.embedder.gpu.max_batch_rows = 8;
        s.embedder.gpu.max_batch_tokens = 256;
        s.embedder.cpu.workers = 1;
        s.embedder.cpu.max_batch_rows = 4;
        s.cache.max_bytes = 0;
    })
    .await;
    let mut client = server.client().await;
    // Health answers Unavailable while the GPU worker compiles its kernels, then ok.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let health = loop {
        match keel_client::flight::action::<serde_json::Value>(&mut client, "health", Vec::new())
            .await
        {
            Ok(health) => break health,
            Err(e) => {
                assert!(format!("{e:#}").contains("warming up"), "{e:#}");
                assert!(std::time::Instant::now() < deadline, "still warming: {e:#}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(health["status"], "ok", "{health}");
    let stats = action(&mut client, "stats", "").await;
    let embedder = &stats["embedder"];
    assert_eq!(embedder["warming"], false, "{embedder}");
    assert!(
        embedder["warm_up_passes"].as_u64().unwrap() > 0,
        "{embedder}"
    );
    assert!(
        embedder["device"].as_str().unwrap().contains("host"),
        "{embedder}"
    );

    let texts = variant_texts(60);
    let batches: Vec<_> = texts
        .chunks(10)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    let out = exchange(&mut client, embed_path(), batches).await.unwrap();
    let stats = action(&mut client, "stats", "").await;
    let reserved = stats["embedder"]["device_memory"]["reserved_bytes"]
        .as_u64()
        .unwrap();
    assert!(reserved > 0, "{}", stats["embedder"]);
    let cleanup = action(&mut client, "cleanup", r#"{"level": "full"}"#).await;
    let after =
        action(&mut client, "stats", "").await["embedder"]["device_memory"]["reserved_bytes"]
            .as_u64()
            .unwrap();
    assert!(
        after < reserved,
        "reserved {reserved} before the cleanup, {after} after: {cleanup}"
    );
    server.stop().await;

    let cpu = cpu_model(&dir);
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
            let diff = max_diff(&v, &expected[row * dim..(row + 1) * dim]);
            assert!(
                diff <= 1e-5,
                "row {row}: differs from the CPU backend by {diff:.2e}"
            );
            row += 1;
        }
    }
    assert_eq!(row, texts.len());
}

/// Texts on stdin through `keel embed --backend wgpu` (a process of its own, since fusion
/// is one setting per process), with `KEEL_*` settings; the vectors in input order.
fn keel_embed_on_the_gpu(model: &Path, texts: &[&str], env: &[(&str, &str)]) -> Vec<Vec<f32>> {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["embed", "--backend", "wgpu", "--model"])
        .arg(model)
        .env("KEEL_EMBEDDER__GPU__ALLOW_SOFTWARE", "true")
        .env("KEEL_EMBEDDER__GPU__WARM_UP", "false")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for t in texts {
        writeln!(stdin, "{t}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keel embed failed:\n{stderr}");
    let vectors: Vec<Vec<f32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), texts.len(), "{stderr}");
    vectors
}

/// Fusion off (`embedder.gpu.fusion: false`, every operation its own kernel) computes
/// what fusion on computes: MiniLM through `keel embed` against the float64 reference.
#[test]
fn minilm_without_fusion_matches_the_float64_reference() {
    let model = repo_root().join("models/all-MiniLM-L6-v2");
    let tokenizer = cpu_model(&model);
    let refs: Vec<(String, Vec<f32>)> = reference()
        .into_iter()
        .filter(|(t, _)| tokenizer.tokenize(t).unwrap().len() <= REFERENCE_TOKENS)
        .collect();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let got = keel_embed_on_the_gpu(&model, &texts, &[("KEEL_EMBEDDER__GPU__FUSION", "false")]);
    for ((text, expected), v) in refs.iter().zip(&got) {
        let diff = max_diff(v, expected);
        assert!(diff <= 1e-4, "{text:?}: max |diff| {diff:.2e}");
        assert!(cosine(v, expected) >= 0.99999, "{text:?}");
    }
}

/// burn's fusion registry is one per process: a device asking for the other setting than
/// the process's first GPU device is refused with the reason, not silently ignored.
#[test]
fn fusion_is_one_setting_per_process() {
    let on = DeviceOptions {
        fusion: true,
        ..options(Precision::F32)
    };
    ModelDevice::open(Backend::Wgpu, on).expect("a Vulkan adapter");
    let off = DeviceOptions {
        fusion: false,
        ..on
    };
    match ModelDevice::open(Backend::Wgpu, off) {
        Err(e @ ModelError::Fusion(_)) => {
            assert!(e.to_string().contains("one setting"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("fusion off accepted in a process where it is on"),
    }
}

/// `backend: auto` on this machine: with a hardware GPU it picks a GPU backend; on a
/// software adapter only (lavapipe in CI) it picks `wgpu` where `gpu.allow_software` says
/// so and `cpu` otherwise, and says why in one line either way.
#[test]
fn auto_picks_the_gpu_backend_the_machine_offers_and_says_why() {
    use keel_engine::embedder::config::EmbedderConfig;
    let hardware = ModelDevice::open(Backend::Wgpu, DeviceOptions::default()).is_ok();
    let resolve = |allow_software: bool| {
        let mut c = EmbedderConfig {
            backend: Backends::Auto,
            ..EmbedderConfig::default()
        };
        c.gpu.allow_software = allow_software;
        let choice = c.resolve_backend();
        assert_eq!(choice.configured, Backends::Auto);
        assert_eq!(c.backend, choice.picked, "the config holds what was picked");
        assert!(c.groups().iter().all(|g| g.workers > 0));
        choice
    };
    let strict = resolve(false);
    let lenient = resolve(true);
    if hardware {
        assert_ne!(strict.picked, Backends::Cpu, "{}", strict.why);
        return;
    }
    assert_eq!(strict.picked, Backends::Cpu, "{}", strict.why);
    assert!(
        strict.why.contains("allow_software") && strict.why.contains("not vulkan"),
        "{}",
        strict.why
    );
    if cfg!(feature = "vulkan") {
        // A vulkan build refuses software adapters for wgpu too (its SPIR-V kernels crash them).
        assert_eq!(lenient.picked, Backends::Cpu, "{}", lenient.why);
    } else {
        assert_eq!(lenient.picked, Backends::Wgpu, "{}", lenient.why);
        assert!(
            lenient.why.contains(", Cpu,"),
            "the software adapter named: {}",
            lenient.why
        );
    }
    // Any other value is kept as configured.
    let mut c = EmbedderConfig::default();
    let kept = c.resolve_backend();
    assert_eq!(
        (kept.picked, kept.why.as_str()),
        (Backends::Cpu, "configured")
    );
}

/// `keel serve` with `backend: auto` runs what was picked and says so in `stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_auto_reports_what_it_picked_and_why() {
    let hardware = ModelDevice::open(Backend::Wgpu, DeviceOptions::default()).is_ok();
    let server = TestServer::start(|s| s.embedder.backend = Backends::Auto).await;
    let mut client = server.client().await;
    let stats = action(&mut client, "stats", "").await;
    let (backend, why) = (
        &stats["embedder"]["backend"],
        &stats["embedder"]["backend_why"],
    );
    if !hardware {
        assert_eq!(backend, "cpu", "{stats}");
        assert!(why.as_str().unwrap().contains("not wgpu"), "{why}");
        assert!(
            stats["embedder"]["device"]
                .as_str()
                .unwrap()
                .starts_with("host")
        );
    } else {
        assert_ne!(backend, "cpu", "{stats}");
    }
    assert_eq!(
        server.settings.embedder.backend,
        Backends::Auto,
        "as configured"
    );
    server.stop().await;
}
