#!/usr/bin/env bash
# The test command (README, .ci/run): fetch what the tests need, then run every test —
# the Rust tests (unit and over real Flight) and the pyarrow client test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Everything the tests read is in this repository or made here (tests/layout.rs checks).
scripts/fetch-model.sh

# The GPU backend's tests run on Mesa's software Vulkan (lavapipe) where there is no GPU.
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq mesa-vulkan-drivers libvulkan1) >/dev/null 2>&1 \
            || sudo -n apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1 || true
    fi
    ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 \
        || { echo "test: a Vulkan driver is needed (apt-get install mesa-vulkan-drivers)" >&2; exit 1; }
fi

# The shared-cache tests start Debian's redis-server on free loopback ports.
if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 \
            || sudo -n apt-get install -y -qq redis-server >/dev/null 2>&1 || true
    fi
    command -v redis-server >/dev/null 2>&1 \
        || { echo "test: redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
fi

# The release build, the tests and the binaries all carry the GPU backend (feature gpu).
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --release --workspace --features gpu --no-fail-fast "$@"
else
    echo "test: cargo-nextest not found, using cargo test" >&2
    cargo test --release --workspace --features gpu --no-fail-fast "$@"
fi

# The TLS test makes its certificate with openssl.
if ! command -v openssl >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq openssl) >/dev/null 2>&1 \
            || sudo -n apt-get install -y -qq openssl >/dev/null 2>&1 || true
    fi
    command -v openssl >/dev/null 2>&1 || { echo "test: openssl is needed (apt-get install openssl)" >&2; exit 1; }
fi

# The Spark test runs pyspark, which runs the machine's Java (17 or newer).
if ! command -v java >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) >/dev/null 2>&1 \
            || sudo -n apt-get install -y -qq openjdk-17-jre-headless >/dev/null 2>&1 || true
    fi
    command -v java >/dev/null 2>&1 \
        || { echo "test: Java 17+ is needed (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
fi

# pyarrow, the client Keel's users have, in a venv of its own, with Keel's own client
# package (python/), grpcio's health checker, Ray Data (the fleet test), OpenAI's own Python
# client and LangChain's (the HTTP front's tests) and pyspark (the Spark test), under pytest.
venv="${KEEL_TEST_VENV:-$root/.cache/venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import pyarrow.flight, numpy, grpc_health, ray.data, openai, httpx, langchain_openai, pyspark, pytest" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "pyarrow>=20" numpy grpcio-health-checking "ray[data]>=2.9" "openai==3.60.0" httpx \
        "langchain-openai==1.8.1" "pyspark==4.0.1" "pytest>=8"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall ./python
# The integration tests built target/release/keel already (with the test build's feature
# set); a plain `cargo build` here would rebuild burn with another one.
[[ -x target/release/keel ]] || cargo build --release --features gpu --all-targets --quiet
# pyarrow.flight, the client package (two servers, failover), the HTTP front with OpenAI's
# client, and a 3-node local Ray cluster with one Keel per node and one shared redis-server;
# tests/python/conftest.py starts each server.
"$venv/bin/python" -m pytest tests/python --keel "$root/target/release/keel"

# The quick soak: memory flat, cache bounded, bursts recovered, cleanups fast. Fails the
# run if a criterion fails (reports in reports/quick-*).
SOAK_KEEL_BIN="$root/target/release/keel" scripts/soak.sh quick
