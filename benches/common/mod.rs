//! Shared fixtures of the benches: the model and real variant texts.

use std::path::{Path, PathBuf};

use keel_model::{Backend, SentenceModel};
use keel_wire::template::Template;
use keel_wire::variants::{DEFAULT_TEMPLATE, parse_vcf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The default model (`scripts/fetch-model.sh`), or `KEEL_BENCH_MODEL_DIR`.
pub fn model() -> SentenceModel {
    let dir = std::env::var_os("KEEL_BENCH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/all-MiniLM-L6-v2"));
    SentenceModel::load(&dir, Backend::Cpu)
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-model.sh first)"))
}

/// The 777 records of the sample VCF rendered with the default variant template.
pub fn variant_texts() -> Vec<String> {
    let path = std::env::var_os("KEEL_BENCH_VCF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("data/test-haploidX.vcf"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let template = Template::parse(DEFAULT_TEMPLATE).expect("the default template parses");
    parse_vcf(&text)
        .into_iter()
        .filter_map(Result::ok)
        .map(|r| r.render(&template))
        .collect()
}
