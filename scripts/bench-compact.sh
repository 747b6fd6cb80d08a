#!/usr/bin/env bash
# Compact vectors, measured: what each stored precision keeps (scripts/bench-compact.py,
# 20 000 rows stored in every format), then search at scale through a dataset's index
# (scripts/bench-index.py, 1 000 000 rows by default). Tables in docs/BENCHMARKS.md.
#
#   scripts/bench-compact.sh [--rows N] [--queries Q]     (arguments go to bench-index.py)
#
# Needs the release binary and the test venv (scripts/test.sh makes both). The million
# rows are embedded once into .cache/bench-compact (hours on 2 cores; an interrupted run
# goes on where it stopped), and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.cache/venv/bin/python
BIN=target/release/keel
[ -x "$BIN" ] || cargo build --release --workspace --features gpu
"$PY" scripts/bench-compact.py "$BIN" --rows 20000 --queries 200
"$PY" scripts/bench-index.py "$BIN" "$@"
