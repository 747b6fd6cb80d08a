#!/usr/bin/env bash
# The test command (README, .ci/run): fetch what the tests need, then run every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/fetch-model.sh

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --release --workspace --no-fail-fast "$@"
else
    echo "test: cargo-nextest not found, using cargo test" >&2
    cargo test --release --workspace --no-fail-fast "$@"
fi
