//! `scripts/device-check.sh --dry-run` end to end on this machine's Vulkan (lavapipe in CI):
//! the script a GPU machine runs, with a tiny BERT in the bundle so that it finishes in
//! minutes on a software adapter. Checks that it writes its report with every part filled.

use crate::common::*;

#[test]
fn the_device_check_dry_run_writes_a_full_report() {
    let bundle = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let keep = tempfile::tempdir().unwrap();
    let b = bundle.path();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_keel"), b.join("keel")).unwrap();
    let tiny = tiny_bert();
    std::fs::rename(tiny.path(), b.join("model")).unwrap_or_else(|_| {
        copy_dir(tiny.path(), &b.join("model"));
    });
    let texts: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "TP53 chr17:{} C>T missense_variant{}",
                7_670_000 + i,
                " x".repeat(i)
            )
        })
        .collect();
    std::fs::write(b.join("texts.txt"), texts.join("\n") + "\n").unwrap();
    // The reference: the CPU backend's vectors of the tiny model.
    let model =
        keel_model::SentenceModel::load(&b.join("model"), keel_model::Backend::Cpu).unwrap();
    let refs: Vec<&str> = texts[..6].iter().map(String::as_str).collect();
    let vectors = model
        .embed(
            &refs,
            keel_model::BatchLimits {
                max_rows: 8,
                max_tokens: 1024,
            },
        )
        .unwrap();
    let lines: Vec<String> = refs
        .iter()
        .zip(vectors.chunks_exact(model.dim()))
        .map(|(t, v)| serde_json::json!({ "text": t, "embedding": v }).to_string())
        .collect();
    std::fs::write(b.join("reference.jsonl"), lines.join("\n") + "\n").unwrap();

    let status = std::process::Command::new(repo_root().join("scripts/device-check.sh"))
        .arg(b)
        .arg(out.path())
        .arg("--dry-run")
        .arg(format!("--keep={}", keep.path().display()))
        .status()
        .unwrap();
    let log = std::fs::read_to_string(out.path().join("log.txt")).unwrap_or_default();
    assert!(status.success(), "device-check failed; its log:\n{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let parity = &report["parity"]["wgpu_f32_vs_cpu"];
    assert!(parity["max_abs_diff"].as_f64().unwrap() <= 1e-5, "{report}");
    // The check's CPU parity runs f32 on the FMA kernels; this reference was made in this
    // process on the default f32 path, which on an AMX CPU is bf16×3 on the tiles: the two
    // agree within ~2e-6 (1.6e-6 measured on an AMX VM; exact f32's bound is 1e-4), the
    // same kernels bit for bit.
    assert!(
        report["parity"]["cpu_vs_float64"]["max_abs_diff"]
            .as_f64()
            .unwrap()
            <= 1e-5,
        "{report}"
    );
    assert!(
        report["keel_embed"][0]["texts_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["keel_embed"][0]["device_mb_reserved"].is_number(),
        "{report}"
    );
    // `keel embed --rounds 2`: the first round (kernels compiled) is reported apart.
    assert!(
        report["keel_embed"][0]["first_round_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let serve = &report["keel_serve"];
    assert!(
        serve["keel_produce_rows_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(serve["warm_up_ms"].is_number(), "{report}");
    let peak = serve["device_memory_at_peak"]["reserved_bytes"]
        .as_u64()
        .unwrap();
    let after = serve["device_memory_after_cleanup"]["reserved_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        after < peak,
        "a full cleanup kept {after} of {peak} reserved bytes: {report}"
    );
    // The host's CPUs: every precision against the reference, keel embed on the best
    // kernels and capped at AVX-512.
    let cpu = &report["cpu_host"];
    if let Some(fma) = cpu["parity"].get("cpu_f32_fma_vs_float64") {
        // Where f32 runs as bf16×3 by default, the FMA path's parity names the FMA kernels.
        assert_eq!(fma["device"], cpu["kernels_f32"], "{report}");
    }
    for precision in ["f32", "bf16", "int8"] {
        let cosine = cpu["parity"][format!("cpu_{precision}_vs_float64")]["min_cosine"]
            .as_f64()
            .unwrap();
        assert!(cosine > 0.99, "{precision}: {report}");
        for kernels in ["best", "avx512"] {
            assert!(
                cpu["keel_embed"].as_array().unwrap().iter().any(|r| {
                    r["precision"] == precision
                        && r["kernels"] == kernels
                        && r["texts_per_s"].as_f64().unwrap_or(0.0) > 0.0
                }),
                "{precision} on {kernels} kernels: {report}"
            );
        }
    }
    // This build has no `vulkan` feature: the backend is refused with one line naming it.
    let refusal = &report["vulkan_refusal"];
    assert_ne!(refusal["exit"], 0, "{report}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("--features vulkan"),
        "{report}"
    );
    // What `backend: auto` picks there, with its reason.
    let auto = report["auto"]["keel"].as_str().unwrap();
    assert!(
        auto.contains("auto picks") && auto.contains("not vulkan"),
        "{report}"
    );
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    // The CPUs the 2-core figures were pinned to, and a plain bundle kept for a second run.
    assert_eq!(
        report["two_cores"]["cpus"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    assert!(keep.path().join("keel").is_file(), "{report}");
    assert!(keep.path().join("model/config.json").is_file(), "{report}");
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        md.contains("## Parity")
            && md.contains("## keel serve")
            && md.contains("## The host's CPUs"),
        "{md}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
