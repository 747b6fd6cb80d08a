#!/usr/bin/env bash
# The GPU check, ONE prepared script for a machine with a GPU (x86-64, one NVIDIA card,
# the driver's Vulkan ICD present, the Vulkan loader possibly missing; Python, optionally
# PyTorch + sentence-transformers + pyarrow; no Rust, no network).
#
#   here:   scripts/device-bundle.sh .device           # build the binary, the f16 model, texts
#   there:  scripts/device-check.sh .device OUT        # parity, throughput, device memory
#   here, without a GPU (Mesa's lavapipe):  scripts/device-check.sh .device OUT --dry-run
#
# Writes OUT/report.md, OUT/report.json, OUT/log.txt and OUT/serve.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="${1:?usage: device-check.sh BUNDLE OUT [--dry-run]}"
out="${2:?usage: device-check.sh BUNDLE OUT [--dry-run]}"
shift 2

# The Vulkan loader: the bundle carries Debian's libvulkan1 as .debs for machines without it.
# (Read whole, not piped into `grep -q`: under pipefail, grep's early exit would make
# ldconfig die of SIGPIPE and the loader look missing.)
loaders="$(ldconfig -p 2>/dev/null || true)"
if ! grep -q 'libvulkan\.so\.1' <<<"$loaders"; then
    if compgen -G "$bundle/debs/*.deb" >/dev/null; then
        for deb in "$bundle"/debs/*.deb; do dpkg -x "$deb" /; done
        ldconfig
    else
        echo "device-check: no Vulkan loader (libvulkan.so.1) and no .debs in $bundle/debs" >&2
        exit 1
    fi
fi
# The NVIDIA driver's ICD where the container mounts it outside the usual paths.
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$nvidia_icd" ]]; then
    export VK_DRIVER_FILES="$nvidia_icd"
fi
export PYTHONUNBUFFERED=1
exec python3 "$root/scripts/tools/device_check.py" "$bundle" "$out" "$@"
