#!/usr/bin/env bash
# The main job on a fresh machine: fetch the model if missing, build Keel, start
# `keel serve` with configs/default.yaml, stream the sample VCF's variant records through
# it (DoExchange) twice — the second pass is served from the cache — and store them as a
# dataset (DoPut). Prints throughput, memory and cache figures; stops the server.
#
#   scripts/run.sh [FILE.vcf|FILE.parquet|FILE.txt]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/fetch-model.sh
cargo build --release --quiet

input="${1:-data/test-haploidX.vcf}"
port="${KEEL_RUN_PORT:-50051}"
out="target/sample-embeddings.parquet"
export KEEL_SERVER__LISTEN="127.0.0.1:$port"
keel=./target/release/keel

# The dataset this job stores is rebuilt on every run (DoPut appends).
rm -rf data/datasets/sample
$keel serve --config configs/default.yaml &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT

echo "== pass 1: embed $input (DoExchange) → $out" >&2
$keel produce --input "$input" --to "grpc://127.0.0.1:$port" --exchange --out "$out"
echo "== pass 2: the same records again (cache hits)" >&2
$keel produce --input "$input" --to "grpc://127.0.0.1:$port" --exchange
echo "== store them as dataset 'sample' (DoPut)" >&2
$keel produce --input "$input" --to "grpc://127.0.0.1:$port" --dataset sample
echo "== the 5 stored rows nearest \"MXRA5 missense_variant\" (search action)" >&2
$keel search --to "grpc://127.0.0.1:$port" --dataset sample -k 5 "MXRA5 missense_variant"

kill -TERM "$server"
wait "$server"
trap - EXIT
echo "run: done; embeddings in $out, dataset in data/datasets/sample/" >&2
