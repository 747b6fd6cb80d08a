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
