#!/usr/bin/env bash
# Soak presets. Each writes a report folder (samples.csv, report.json, memory.png,
# report.md) under reports/ and exits non-zero if a criterion fails.
#
#   scripts/soak.sh quick   # ≈ 4.5 min: mixed workload with the throughput comparison, then bursts
#   scripts/soak.sh hour    # 1 h mixed workload, then 10 min of bursts
#   scripts/soak.sh day     # 24 h mixed workload
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
preset="${1:-quick}"
keel="${SOAK_KEEL_BIN:-$root/target/release/keel}"
[[ -x "$keel" ]] || { scripts/fetch-model.sh; cargo build --release --quiet; }
scripts/fetch-model.sh
config="${SOAK_CONFIG:-configs/default.yaml}"
# The soak starts its own engines; keep the metrics port of a running server free.
export KEEL_METRICS__ENABLED=false

case "$preset" in
    quick)
        "$keel" soak --config "$config" --workload mixed --duration 150s --compare-secs 15 --report reports/quick-mixed
        "$keel" soak --config "$config" --workload burst --duration 40s --report reports/quick-burst
        ;;
    hour)
        "$keel" soak --config "$config" --workload mixed --duration 1h --compare-secs 60 --report reports/hour-mixed
        "$keel" soak --config "$config" --workload burst --duration 10m --report reports/hour-burst
        ;;
    day)
        "$keel" soak --config "$config" --workload mixed --duration 24h --compare-secs 300 --report reports/day-mixed
        ;;
    *)
        echo "usage: scripts/soak.sh quick|hour|day" >&2
        exit 2
        ;;
esac
