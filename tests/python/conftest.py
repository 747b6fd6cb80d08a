"""What every Python test shares: the `keel` binary under test (`--keel PATH`, or
$KEEL_BIN, default target/release/keel) and ONE fixture that starts `keel serve`.

    def test_x(start_keel):
        keel = start_keel(env={"KEEL_CACHE__MAX_BYTES": "0"})   # a LocalKeel, up and warm
        client = keel.connect()

Each server reads configs/default.yaml with the repository's MiniLM, gets a data folder
of its own and free ports (Flight and HTTP), metrics off; every server a module started is
stopped (SIGTERM) when the module ends.
"""
import os

import pytest

from keel_client.local import LocalKeel, start_redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "models/all-MiniLM-L6-v2")
CONFIG = os.path.join(ROOT, "configs/default.yaml")


def pytest_addoption(parser):
    parser.addoption("--keel", default=os.environ.get("KEEL_BIN", os.path.join(ROOT, "target/release/keel")),
                     help="the keel binary under test (default: $KEEL_BIN or target/release/keel)")


@pytest.fixture(scope="session")
def keel_binary(request):
    binary = request.config.getoption("--keel")
    if not os.access(binary, os.X_OK):
        pytest.exit(f"no keel binary at {binary} (cargo build --release, or --keel PATH)", returncode=2)
    return binary


@pytest.fixture(scope="module")
def start_keel(keel_binary, tmp_path_factory):
    """Starts `keel serve`; `env` adds or overrides KEEL_* settings, other arguments go to
    LocalKeel (timeout, tls_cert, tls_key, stderr)."""
    started = []

    def start(env=None, **kwargs):
        full_env = {"KEEL_EMBEDDER__MODEL_DIR": MODEL_DIR, "KEEL_METRICS__ENABLED": "false"}
        full_env.update(env or {})
        keel = LocalKeel(keel_binary, config=CONFIG, data_dir=str(tmp_path_factory.mktemp("keel-data")),
                         env=full_env, **kwargs)
        started.append(keel)
        return keel

    yield start
    for keel in started:
        keel.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """Debian's redis-server on a loopback port, no persistence."""
    proc, url = start_redis(str(tmp_path_factory.mktemp("redis")))
    yield url
    proc.kill()
    proc.wait()
