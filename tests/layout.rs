//! The repository stands alone: nothing it builds, tests, benchmarks or runs reads a file
//! outside it, so a fresh clone with nothing beside it passes its own tests.

use std::path::{Path, PathBuf};

use crate::common::repo_root;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["rs", "sh", "py", "toml", "yaml", "yml"].contains(&e))
        {
            out.push(path);
        }
    }
}

#[test]
fn no_source_script_or_configuration_reads_outside_the_repository() {
    let root = repo_root();
    let mut all = Vec::new();
    for dir in [
        "src", "crates", "tests", "benches", "scripts", "fuzz", "examples", "configs", ".ci",
    ] {
        if root.join(dir).is_dir() {
            files(&root.join(dir), &mut all);
        }
    }
    files_at_top(&root, &mut all);
    assert!(all.len() > 50, "walked only {} files", all.len());
    // Spelled in two pieces so that this file does not name what it looks for.
    let outside = [["..", "/shared"].concat(), ["/work", "/"].concat()];
    let offenders: Vec<String> = all
        .iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            outside.iter().any(|o| text.contains(o.as_str()))
        })
        .map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "these read files outside the repository: {offenders:?}"
    );
}

fn files_at_top(root: &Path, out: &mut Vec<PathBuf>) {
    for name in ["Cargo.toml", "rust-toolchain.toml"] {
        out.push(root.join(name));
    }
}

/// `deploy/kubernetes`: the ConfigMap is configs/default.yaml as scripts/k8s-configmap.sh
/// makes it, `keel validate` accepts it, and the Deployment's memory limit is at least twice
/// the bound it prints (Keel budgets half of its cgroup limit).
#[test]
fn the_kubernetes_configmap_is_current_and_valid_and_the_memory_limit_fits_it() {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("configmap.yaml");
    let made = std::process::Command::new(root.join("scripts/k8s-configmap.sh"))
        .arg(&fresh)
        .status()
        .unwrap();
    assert!(made.success());
    let committed = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    assert_eq!(
        committed,
        std::fs::read_to_string(&fresh).unwrap(),
        "deploy/kubernetes/configmap.yaml is stale: run scripts/k8s-configmap.sh"
    );
    // The embedded keel.yaml, un-indented.
    let (_, body) = committed.split_once("  keel.yaml: |\n").unwrap();
    let yaml: String = body
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let config = dir.path().join("keel.yaml");
    std::fs::write(&config, yaml).unwrap();
    // The pod's model path does not exist here: validate with the repository's model.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["validate", "--config"])
        .arg(&config)
        .env(
            "KEEL_EMBEDDER__MODEL_DIR",
            root.join("models/all-MiniLM-L6-v2"),
        )
        .env("KEEL_EMBEDDER__CPU__WORKERS", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keel validate refused the ConfigMap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bound: u64 = stdout
        .split_once("memory bound: ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no memory bound printed: {stdout}"));
    let deployment =
        std::fs::read_to_string(root.join("deploy/kubernetes/deployment.yaml")).unwrap();
    let limit_line = deployment
        .lines()
        .find(|l| l.trim_start().starts_with("limits:"))
        .unwrap();
    let mib: u64 = limit_line
        .split("memory: ")
        .nth(1)
        .and_then(|r| r.trim_end_matches(['}', ' ']).strip_suffix("Mi"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no memory limit in {limit_line:?}"));
    assert!(
        mib << 20 >= 2 * bound,
        "the Deployment's memory limit {mib} MiB is under twice the bound {bound} B"
    );
    assert!(deployment.contains("grpc: {port: 50051}"), "gRPC probes");
    assert!(committed.contains("listen: 0.0.0.0:50051"));
}

/// The features `cargo tree` resolves for a build of `edges`, one `name version features`
/// line per crate.
fn resolved_features(edges: &str) -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args([
            "tree",
            "--workspace",
            "--features",
            "gpu",
            "--locked",
            "--offline",
        ])
        .args(["-e", edges, "--prefix", "none", "-f", "{p} {f}"])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches(" (*)").to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// scripts/run.sh builds the binary (`cargo build`), scripts/test.sh the tests: both must
/// resolve every crate they share with the same features, or the second compiles burn
/// again (~15 minutes on 2 cores). A crate only the tests use is fine.
#[test]
fn the_run_and_test_builds_share_one_feature_set() {
    let build = resolved_features("normal,build");
    let tests = resolved_features("normal,build,dev");
    let name = |l: &String| l.split(" ").take(2).collect::<Vec<_>>().join(" ");
    let built: std::collections::BTreeSet<String> = build.iter().map(name).collect();
    let drift: Vec<&String> = tests
        .iter()
        .filter(|l| built.contains(&name(l)) && !build.contains(*l))
        .collect();
    assert!(
        drift.is_empty(),
        "the test build turns on features the run build lacks (pin them in Cargo.toml's \
         [dependencies]): {drift:#?}"
    );
}

/// `keel serve` with its log in a pipe (`scripts/run.sh > log`): plain text, no colour
/// codes, and the metrics line names the address it listens on.
#[test]
fn a_log_written_to_a_pipe_is_plain_text_and_names_the_metrics_address() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .env("KEEL_SERVER__LISTEN", "127.0.0.1:0")
        .env("KEEL_METRICS__LISTEN", "127.0.0.1:0")
        .env("KEEL_HTTP__LISTEN", "127.0.0.1:0")
        .env("KEEL_STORAGE__DATA_DIR", data.path())
        .env(
            "KEEL_EMBEDDER__MODEL_DIR",
            repo_root().join("models/all-MiniLM-L6-v2"),
        )
        .env("KEEL_EMBEDDER__CPU__WORKERS", "1")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("keel serve starts");
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("keel serving Arrow Flight");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = lines.join("\n");
    assert!(!log.contains('\x1b'), "colour codes in a piped log:\n{log}");
    let metrics = lines
        .iter()
        .find(|l| l.contains("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line:\n{log}"));
    assert!(
        metrics.contains("metrics on http://127.0.0.1:") && !metrics.contains("ADDRESS"),
        "{metrics}"
    );
}

/// The server library links none of the client tools' crates: input readers (noodles),
/// plots (plotters), progress bars (indicatif).
#[test]
fn the_server_links_no_client_tool() {
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args([
            "tree",
            "-p",
            "keel-server",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--locked", "--offline", "-f", "{p}"])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let linked: Vec<&str> = tree
        .lines()
        .filter(|l| {
            ["noodles", "plotters", "indicatif", "keel-client"]
                .iter()
                .any(|c| l.starts_with(&format!("{c} ")))
        })
        .collect();
    assert!(linked.is_empty(), "keel-server links {linked:?}");
}
