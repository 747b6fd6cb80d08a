#!/usr/bin/env bash
# Keel's model, in every CPU precision, next to its peers: throughput and accuracy on the
# same texts, rounds interleaved so that every stack sees the same machine load.
#
#   scripts/bench-model.sh [ROUNDS] [TEXTS]        (defaults: 3 rounds, 2000 texts)
#
# Texts: scripts/tools/variant_texts.py (the sample VCF's records, then their annotation
# fields recombined). Keel: `keel embed --precision P --batch B` (2 workers × 1 thread, the
# default on two cores) for P in f32, bf16, int8. Peers, in the venv this script makes in
# .cache/bench-venv (pip install sentence-transformers psutil onnxruntime onnx openvino: a
# large download, once; or the Python given by BENCH_PYTHON): sentence-transformers +
# PyTorch with fp32 and with bf16 weights (scripts/tools/st_baseline.py), and on one ONNX
# export of the same weights ONNX Runtime fp32 and int8 (its dynamic quantization) and
# OpenVINO with its default hints (bf16 where the CPU has AMX or AVX-512 BF16) and with
# the f32 hint (scripts/tools/ort_baseline.py). Batch sizes 25, 64, 256. Accuracy
# (scripts/tools/precision_accuracy.py): min/mean cosine to sentence-transformers fp32 and
# recall@10 of each text's neighbours among the others. Prints one line per measurement,
# then Markdown tables (median and range over the rounds).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rounds="${1:-3}"
count="${2:-2000}"
work="$root/.cache/bench-model"
mkdir -p "$work"
if [[ -n "${BENCH_PYTHON:-}" ]]; then
    py="$BENCH_PYTHON"
else
    venv="$root/.cache/bench-venv"
    py="$venv/bin/python"
    if ! "$py" -c "import sentence_transformers, psutil, onnxruntime, onnx, openvino" 2>/dev/null; then
        echo "bench-model: installing sentence-transformers, onnxruntime, openvino into $venv (once)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            sentence-transformers psutil onnxruntime onnx openvino
    fi
fi

scripts/fetch-model.sh
# The same build as the tests (scripts/test.sh): another feature set would rebuild burn.
cargo build --release --workspace --features gpu --all-targets --quiet
keel=./target/release/keel
model=models/all-MiniLM-L6-v2
texts="$work/texts.txt"
python3 scripts/tools/variant_texts.py "$keel" "$count" > "$texts"
results="$work/results.tsv"
: > "$results"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); texts: $(wc -l < "$texts") variant texts; commit $(git rev-parse --short HEAD)"

for round in $(seq "$rounds"); do
    for batch in 25 64 256; do
        for p in f32 bf16 int8; do
            out=/dev/null
            if [[ $round == 1 && $batch == 64 ]]; then out="$work/keel-$p.jsonl"; fi
            line=$("$keel" embed --precision "$p" --batch "$batch" < "$texts" 2>&1 > "$out" | tail -1)
            rate=$(grep -o '([0-9]* texts/s' <<<"$line" | tr -dc '0-9')
            echo "round $round keel $p batch=$batch: $rate texts/s, $(grep -o 'weights [0-9.]* MB' <<<"$line"), $(grep -o 'RSS [0-9]* MB' <<<"$line")"
            printf 'Keel %s\t%s\t%s\n' "$p" "$batch" "$rate" >> "$results"
        done
    done
    for dtype in fp32 bf16; do
        flags=(); [[ $dtype == bf16 ]] && flags=(--bf16)
        [[ $round == 1 ]] && flags+=(--save "$work/st-$dtype.npy")
        # The first batch size saves its vectors (round 1): 64, as for Keel.
        "$py" scripts/tools/st_baseline.py "$model" "$texts" "${flags[@]}" 64 25 256 2>/dev/null \
            | grep '^batch' | while read -r _ b rate _; do
                echo "round $round sentence-transformers $dtype batch=${b%:}: $rate texts/s"
                printf 'sentence-transformers %s\t%s\t%.0f\n' "$dtype" "${b%:}" "$rate" >> "$results"
            done
    done
    "$py" scripts/tools/ort_baseline.py "$model" "$texts" "$work/ort" 25 64 256 2>/dev/null \
        | grep -E '^(onnxruntime|openvino)' | while read -r stack _ kind _ b rate _; do
            case $stack in onnxruntime) name="ONNX Runtime $kind" ;; *) name="OpenVINO $kind" ;; esac
            echo "round $round $name batch=${b%:}: $rate texts/s"
            printf '%s\t%s\t%.0f\n' "$name" "${b%:}" "$rate" >> "$results"
        done
done

echo
"$py" - "$results" <<'PY'
import collections, statistics, sys
rates = collections.defaultdict(list)
for line in open(sys.argv[1]):
    stack, batch, rate = line.rstrip("\n").split("\t")
    rates[(stack, int(batch))].append(float(rate))
stacks = list(dict.fromkeys(s for s, _ in rates))
print("texts/s, median of the rounds (range):\n")
print("| stack | 25 rows per pass | 64 | 256 |")
print("|---|---|---|---|")
for s in stacks:
    cells = []
    for b in (25, 64, 256):
        r = rates.get((s, b), [])
        cells.append(f"{statistics.median(r):.0f} ({min(r):.0f}–{max(r):.0f})" if r else "–")
    print(f"| {s} | " + " | ".join(cells) + " |")
PY
echo
"$py" scripts/tools/precision_accuracy.py "$work"
