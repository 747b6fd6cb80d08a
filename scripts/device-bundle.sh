#!/usr/bin/env bash
# Builds what scripts/device-check.sh carries to a GPU machine, into one folder
# (default .device, git-ignored), about 50 MB (a device run carries at most 64 MiB with the
# repository): the release binary with the GPU backend, a second one built with the
# `vulkan` feature (burn's SPIR-V path) and the model crate's test binary (the CPU kernel
# tests, for the host's AMX), stripped, in one xz stream (binaries.tar.xz),
# MiniLM with f16 weights (`keel convert`; the vocabulary rows no text of the check uses
# zeroed, then xz-compressed) and Debian's Vulkan loader as .debs. The texts and the
# float64 reference come from the repository, which travels with the bundle.
#
#   scripts/device-bundle.sh [DIR] [--uncompressed] [--no-vulkan]
#     --uncompressed: plain binary and weights, for the dry run here
#     --no-vulkan: skip the vulkan build (it compiles burn's GPU stack a second time)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir="${1:-.device}"
mkdir -p "$dir"
scripts/fetch-model.sh

# The binaries go into one xz stream (x86 filter, a dictionary larger than a binary): the
# two keel builds share most of their code, so the second costs a third of the first.
stage="$(mktemp -d)"
texts="$(mktemp)"
trap 'rm -rf "$stage" "$texts"' EXIT
# The vulkan build first: it shares the target folder (its own artefacts beside the
# default build's), and the default build after it leaves its binary in target/release.
if [[ " $* " != *" --no-vulkan "* ]]; then
    cargo build --release --features vulkan --bin keel
    strip -o "$stage/keel-vulkan" target/release/keel
fi
# The same feature set as the tests' build (scripts/test.sh), so neither rebuilds burn.
cargo build --release --features gpu --all-targets
keel=target/release/keel
strip -o "$stage/keel" "$keel"
# The model crate's unit tests (the CPU kernels, AMX forms included), for the host's CPUs.
tests=$(cargo test --release --workspace --features gpu -p keel-model --lib --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "keel_model" and m.get("executable"):
        print(m["executable"])')
[[ -n "$tests" ]] && strip -o "$stage/model-tests" "$tests"
rm -f "$dir"/keel "$dir"/keel-vulkan "$dir"/model-tests "$dir"/*.xz "$dir/binaries.tar.xz"
if [[ " $* " == *" --uncompressed "* ]]; then
    cp "$stage"/* "$dir/"
else
    (cd "$stage" && tar cf - ./*) | xz -T1 --x86 --lzma2=preset=9e,dict=256MiB >"$dir/binaries.tar.xz"
fi

# The check's texts (made there from the repository's sample VCF, as device_check.py
# does: each rendered text repeated to 16 000 lines with a distinct suffix), here only
# to know which vocabulary rows they use; the float64 reference is the repository's.
"$keel" texts data/test-haploidX.vcf 2>/dev/null \
    | awk '{ t[NR] = $0 } END { for (i = 0; i < 16000; i++) print t[i % NR + 1] " #" i }' >"$texts"
rm -f "$dir/texts.txt" "$dir/reference.jsonl"

rm -rf "$dir/model"
"$keel" convert models/all-MiniLM-L6-v2 "$dir/model" --precision f16
# Only what the engine and sentence-transformers read.
rm -f "$dir/model/README.md" "$dir/model/data_config.json"
if [[ " $* " != *" --uncompressed "* ]]; then
    # Rows of the vocabulary that no text of the check (nor the int8 calibration set)
    # looks up are zeroed: the texts' vectors are the same, and the weights compress to half.
    py="$root/.cache/venv/bin/python"
    [[ -x "$py" ]] || python3 -m venv "$root/.cache/venv"
    "$py" -c 'import tokenizers, numpy' 2>/dev/null \
        || "$py" -m pip install --quiet tokenizers==0.22.2 numpy
    "$py" scripts/tools/trim_vocab.py "$dir/model" "$texts" crates/model/tests/data/minilm-reference.jsonl \
        --rust-strings crates/model/src/calibration.rs
    xz -6 -T0 "$dir/model/model.safetensors"
fi

# Debian's Vulkan loader and GL dispatch libraries (the NVIDIA Vulkan ICD needs them), for
# GPU machines whose image lacks them.
mkdir -p "$dir/debs"
if command -v apt-get >/dev/null 2>&1; then
    (cd "$dir/debs" && apt-get download libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libopengl0 \
        libgles2 >/dev/null 2>&1) \
        || echo "device-bundle: could not download the Vulkan loader (the GPU machine must have it)" >&2
fi
du -sh "$dir" "$dir"/* >&2
