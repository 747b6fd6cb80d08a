#!/usr/bin/env bash
# Soak presets. Each writes a report folder (samples.csv, report.json, memory.png,
# report.md) under reports/ and exits non-zero if a criterion fails.
#
#   scripts/soak.sh quick   # ≈ 3.5 min: mixed workload (memory, cache, cleanups judged), then bursts
#   scripts/soak.sh hour    # 1 h mixed workload, then 10 min of bursts
#   scripts/soak.sh long    # 100 000 ops of the mixed workload (≈ 1 h here) with heap
#                           # profiles every 25 000 ops, then 10 min of bursts
#   scripts/soak.sh day     # 24 h mixed workload; run it again after an interruption
#                           # and it resumes from reports/day-mixed/samples.csv
#
# long and day sample heap profiles (jemalloc prof, one sample per 256 KiB allocated:
# no measurable cost); scripts/heap-diff.sh compares two.
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
        # No throughput comparison (--compare-secs): a ratio of timings is reported by the
        # benchmark presets below, never judged in CI.
        "$keel" soak --config "$config" --workload mixed --duration 150s --report reports/quick-mixed
        "$keel" soak --config "$config" --workload burst --duration 65s --report reports/quick-burst
        ;;
    hour)
        "$keel" soak --config "$config" --workload mixed --duration 1h --compare-secs 60 --report reports/hour-mixed
        "$keel" soak --config "$config" --workload burst --duration 10m --report reports/hour-burst
        ;;
    long)
        _RJEM_MALLOC_CONF=prof:true,lg_prof_sample:18 \
            "$keel" soak --config "$config" --workload mixed --ops 100000 --compare-secs 60 \
            --heap-profile-every 25000 --report reports/long-mixed
        "$keel" soak --config "$config" --workload burst --duration 10m --report reports/long-burst
        ;;
    day)
        # --resume: continues an interrupted run (a fresh engine, its own warm-up); starts
        # one when reports/day-mixed holds none. Remove the folder to start over.
        _RJEM_MALLOC_CONF=prof:true,lg_prof_sample:18 \
            "$keel" soak --config "$config" --workload mixed --duration 24h \
            --heap-profile-every 250000 --resume --report reports/day-mixed
        ;;
    *)
        echo "usage: scripts/soak.sh quick|hour|long|day" >&2
        exit 2
        ;;
esac
