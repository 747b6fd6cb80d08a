#!/usr/bin/env bash
# Keel's model throughput next to sentence-transformers, on the same texts, back to back.
#
#   scripts/bench-model.sh [ROUNDS]
#
# Texts: the sample VCF's records rendered with the default variant template (keel texts).
# Keel: `keel embed` at 25 and 64 rows per pass, 2 workers × 1 thread (the default on two
# cores) and 1 worker. Baseline: scripts/tools/st_baseline.py (sentence-transformers +
# PyTorch, CPU) in the Python given by ST_PYTHON, or in a venv this script makes in
# .cache/bench-venv (pip install sentence-transformers psutil: a large download, once).
# Rounds interleave the two stacks so that both see the same machine load. Prints one
# line per measurement.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rounds="${1:-2}"
st_script="$root/scripts/tools/st_baseline.py"
if [[ -n "${ST_PYTHON:-}" ]]; then
    st_python="$ST_PYTHON"
else
    venv="$root/.cache/bench-venv"
    st_python="$venv/bin/python"
    if ! "$st_python" -c "import sentence_transformers, psutil" 2>/dev/null; then
        echo "bench-model: installing sentence-transformers into $venv (once)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check sentence-transformers psutil
    fi
fi

scripts/fetch-model.sh
cargo build --release --quiet
texts="$(mktemp)"
trap 'rm -f "$texts"' EXIT
./target/release/keel texts data/test-haploidX.vcf > "$texts" 2>/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); texts: $(wc -l < "$texts") variant records"

for round in $(seq "$rounds"); do
    for cfg in "2 25" "2 64" "1 25" "1 64"; do
        set -- $cfg
        line=$(./target/release/keel embed --workers "$1" --batch "$2" < "$texts" 2>&1 >/dev/null | tail -1)
        echo "round $round keel workers=$1 batch=$2: $(grep -o '([0-9]* texts/s' <<<"$line" | tr -d '(') rss=$(grep -o 'RSS [0-9]* MB' <<<"$line")"
    done
    if [[ -x "$st_python" ]]; then
        "$st_python" "$st_script" models/all-MiniLM-L6-v2 "$texts" 25 64 2>/dev/null \
            | grep '^batch' | sed "s/^/round $round sentence-transformers /"
    else
        echo "round $round sentence-transformers: skipped ($st_python not found; set ST_PYTHON)"
    fi
done
