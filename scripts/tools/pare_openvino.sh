#!/usr/bin/env bash
# Pare OpenVINO's PyPI wheel down to a CPU-only package that fits a device run's carry.
#
# usage: scripts/tools/pare_openvino.sh WHEEL_DIR OUT_TAR_XZ
#
# Why: a GPU machine's device run carries at most 64 MiB and has no network, while
# OpenVINO's wheel alone is 59 MB (183 MB unpacked: GPU and NPU plugins, six model
# frontends, C/C++ headers, the ovc converter). scripts/tools/ort_baseline.py only needs
# `import openvino; Core().read_model(<onnx>); compile_model(..., "CPU", ...)`, so this
# keeps libopenvino, the CPU plugin, the ONNX frontend and TBB (+ hwloc/tbbbind,
# tbbmalloc) and the pure-Python API, and drops everything else:
#   - plugins: GPU, NPU, AUTO, HETERO, BATCH (the plugin list is compiled into
#     libopenvino, no plugins.xml; an absent plugin only fails when it is asked for)
#   - cache.json (GPU kernel tuning cache; the CPU plugin does not read it)
#   - frontends: IR, TensorFlow, TF Lite, PyTorch, Paddle, JAX, GGUF (C++ and Python)
#     and the Python ONNX frontend module (read_model loads the C++ ONNX frontend itself)
#   - libopenvino_c, libtbbmalloc_proxy, include/, cmake/, tbb.pc, tools/ (ovc, benchmark:
#     `import openvino` tolerates its absence), torch/, *.pyi stubs, the RECORD file
# The shared objects are already stripped in the wheel (strip --strip-unneeded saves ~2 KB),
# so they are kept byte-identical. openvino-telemetry (a Requires-Dist) is only imported
# by tools/ovc, which is dropped, so it is not packed.
#
# The tarball's top level is a site-packages folder:
#   mkdir -p /tmp/ovsite && tar xJf OUT_TAR_XZ -C /tmp/ovsite && export PYTHONPATH=/tmp/ovsite
# Needs numpy on the target (OpenVINO's only other runtime dependency). The wheel is cp312.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 WHEEL_DIR OUT_TAR_XZ" >&2
    exit 2
fi
wheel_dir=$1
out=$(realpath -m "$2")

shopt -s nullglob
wheels=("$wheel_dir"/openvino-[0-9]*-cp312-*manylinux*x86_64.whl)
shopt -u nullglob
if [ ${#wheels[@]} -ne 1 ]; then
    echo "expected exactly one openvino-*-cp312-*x86_64.whl in $wheel_dir, found ${#wheels[@]}" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
site=$work/site
mkdir -p "$site"
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "${wheels[0]}" "$site"

ov=$site/openvino
libs=$ov/libs
[ -f "$libs/libopenvino_intel_cpu_plugin.so" ] || { echo "no CPU plugin in ${wheels[0]}" >&2; exit 1; }

# Native libraries: keep an allow-list, drop the rest.
keep_lib() {
    case $1 in
        libopenvino.so.* | libopenvino_intel_cpu_plugin.so | libopenvino_onnx_frontend.so.* | \
        libtbb.so.* | libtbbmalloc.so.* | libtbbbind_*.so.* | libhwloc.so.*) return 0 ;;
        *) return 1 ;;
    esac
}
for f in "$libs"/*; do
    keep_lib "$(basename "$f")" || rm -rf "$f"
done

# Python side.
rm -rf "$ov"/include "$ov"/cmake "$ov"/tools "$ov"/torch
for fe in "$ov"/frontend/*/; do
    rm -rf "$fe"
done
find "$site" -name '*.pyi' -delete
find "$site" -name '__pycache__' -type d -prune -exec rm -rf {} +
for d in "$site"/openvino-*.dist-info; do
    rm -f "$d/RECORD"
    find "$d/licenses" -type f ! -name LICENSE -delete 2>/dev/null || true
    find "$d" -type d -empty -delete
done

# Sanity: everything left that links against something must find it inside the package
# or in the system's libc/libstdc++ set.
missing=$(find "$site" -name '*.so*' -type f -print0 | xargs -0 -n1 readelf -d 2>/dev/null \
    | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u | while read -r n; do
        case $n in
            libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | libstdc++.so.* | \
            libgcc_s.so.* | ld-linux-x86-64.so.*) ;;
            *) [ -e "$libs/$n" ] || echo "$n" ;;
        esac
    done)
if [ -n "$missing" ]; then
    echo "pared package lacks needed libraries: $missing" >&2
    exit 1
fi

# Reproducible tarball: fixed order, owner and mtime.
mkdir -p "$(dirname "$out")"
tar -C "$site" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2000-01-01 00:00Z' \
    -cf - . | xz -9e -T0 > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: $(du -b "$out" | cut -f1) bytes ($(du -sh "$site" | cut -f1) unpacked)"
