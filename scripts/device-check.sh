#!/usr/bin/env bash
# The GPU check, ONE prepared script for a machine with a GPU (x86-64, one NVIDIA card,
# the driver's Vulkan ICD present, the Vulkan loader possibly missing; Python, optionally
# PyTorch + sentence-transformers + pyarrow; no Rust, no network).
#
#   here:   scripts/device-bundle.sh .device           # build the binary, the f16 model, texts
#   there:  scripts/device-check.sh .device OUT        # parity, throughput, device memory
#   here, without a GPU (Mesa's lavapipe):  scripts/device-check.sh .device OUT --dry-run
#
# A device run carries at most 64 MiB: the bundle (~50 MB) and OpenVINO do not fit together.
# Two runs on one warm machine then: the GPU's steps keeping a plain copy of the bundle,
# then the host's CPU steps with a CPU-only OpenVINO (scripts/tools/pare_openvino.sh):
#   there:  scripts/device-check.sh .device OUT/gpu --gpu-only --keep=/tmp/keel-keep
#   there:  PYTHONPATH=<openvino> scripts/device-check.sh /tmp/keel-keep OUT/cpu --cpu-only
#
# Writes OUT/report.md, OUT/report.json, OUT/log.txt and OUT/serve.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="${1:?usage: device-check.sh BUNDLE OUT [--dry-run] [--gpu-only|--cpu-only] [--keep=DIR] [--budget-s=S]}"
out="${2:?usage: device-check.sh BUNDLE OUT [--dry-run] [--gpu-only|--cpu-only] [--keep=DIR] [--budget-s=S]}"
shift 2

# The Vulkan loader and the GL dispatch libraries the NVIDIA driver's Vulkan ICD loads
# (libvulkan1, libglvnd0, libegl1, libgl1, libglx0, libopengl0, libgles2): the bundle
# carries Debian's as .debs, unpacked where the machine's image lacks any of them.
# (ldconfig's list is read whole, not piped into `grep -q`: under pipefail, grep's early
# exit would make ldconfig die of SIGPIPE and the library look missing.)
loaders="$(ldconfig -p 2>/dev/null || true)"
missing=0
for lib in libvulkan.so.1 libGLdispatch.so.0 libEGL.so.1 libGLX.so.0; do
    grep -q "$lib" <<<"$loaders" || missing=1
done
if [[ $missing == 1 ]]; then
    if compgen -G "$bundle/debs/*.deb" >/dev/null; then
        for deb in "$bundle"/debs/*.deb; do dpkg -x "$deb" /; done
        ldconfig
    elif ! grep -q 'libvulkan\.so\.1' <<<"$loaders"; then
        echo "device-check: no Vulkan loader (libvulkan.so.1) and no .debs in $bundle/debs" >&2
        exit 1
    fi
fi
# The NVIDIA driver's ICD (and EGL vendor file) where the container mounts them outside
# the usual paths.
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$nvidia_icd" ]]; then
    export VK_DRIVER_FILES="$nvidia_icd"
fi
nvidia_egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
if [[ -z "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" && -f "$nvidia_egl" ]]; then
    export __EGL_VENDOR_LIBRARY_FILENAMES="$nvidia_egl"
fi
export PYTHONUNBUFFERED=1
exec python3 "$root/scripts/tools/device_check.py" "$bundle" "$out" "$@"
