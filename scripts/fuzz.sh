#!/usr/bin/env bash
# Fuzz one target for a given time (not part of the test command: it runs for as long as
# asked). Targets: flight_data (raw FlightData → validated micro-batch texts), vcf (the
# VCF record parser). Crashes land in fuzz/artifacts/TARGET/; the corpus grows in
# fuzz/corpus/TARGET/ (seed-* files are kept in git).
#
#   scripts/fuzz.sh flight_data 1800
#   scripts/fuzz.sh vcf 600
#
# cargo-fuzz wants a nightly compiler for its sanitizer flags; RUSTC_BOOTSTRAP lets the
# pinned stable toolchain accept them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${1:?usage: scripts/fuzz.sh flight_data|vcf SECONDS}"
seconds="${2:-60}"
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cd fuzz
# The corpus a previous run grew, saved as one archive; new entries stay local.
if [[ -f "corpus-$target.tar.gz" && ! -f "corpus/$target/.unpacked" ]]; then
    tar xzf "corpus-$target.tar.gz" -C corpus && touch "corpus/$target/.unpacked"
fi
cargo fuzz run "$target" --release -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
