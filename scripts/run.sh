#!/usr/bin/env bash
# The main job on a fresh machine: fetch the model if missing, build Keel, render the
# sample VCF's variant records as texts and embed them, printing throughput and memory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/fetch-model.sh
cargo build --release --quiet

vcf="${1:-data/test-haploidX.vcf}"
out="${KEEL_OUT:-target/sample-embeddings.jsonl}"
./target/release/keel texts "$vcf" | ./target/release/keel embed --config configs/default.yaml > "$out"
echo "run: $(wc -l < "$out") embeddings written to $out" >&2
