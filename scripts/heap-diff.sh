#!/usr/bin/env bash
# What grew between two jemalloc heap profiles of one keel process (written by the
# heap-profile action, or by `keel soak --heap-profile-every N` into REPORT/heap/):
# the allocation sites holding more live bytes in NEW than in OLD, largest first.
#
#   scripts/heap-diff.sh OLD.heap NEW.heap [BINARY]     # BINARY: target/release/keel
#
# Needs jeprof (Debian: libjemalloc-dev, installed here when missing). Profiles are
# sampled (one sample per 2^lg_prof_sample bytes): small sites show up statistically.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ $# -ge 2 ]] || { sed -n 2,9p "$0" >&2; exit 2; }
old="$1" new="$2" bin="${3:-$root/target/release/keel}"
if ! command -v jeprof >/dev/null; then
    apt_get=(apt-get); [[ $(id -u) -eq 0 ]] || apt_get=(sudo apt-get)
    "${apt_get[@]}" install -y -q libjemalloc-dev >/dev/null
fi
# --inuse_space: live bytes; --base: subtract OLD; --cum: sites by what they and their
# callees hold (the release build has no line tables: functions, not lines).
jeprof --text --cum --inuse_space --nodecount=60 --base="$old" "$bin" "$new" 2>/dev/null
