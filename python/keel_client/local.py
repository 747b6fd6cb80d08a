"""A `keel serve` on a free loopback port, started from a binary: for tests, benchmarks
and notebooks.

    from keel_client.local import LocalKeel
    with LocalKeel("target/release/keel", env={"KEEL_CACHE__MAX_BYTES": "0"}) as keel:
        KeelClient(keel.address).embed(table)

The server reads `config` (default: none, the built-in defaults) plus `KEEL_*` variables;
`env` adds or overrides them; `tls_cert`/`tls_key` (PEM files) serve TLS on
`grpc+tls://localhost:PORT`. It is up once its `health` action answers (a server with
authentication on is up once it refuses a call without credentials).
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from typing import IO, Mapping, Optional, Union

import pyarrow.flight as flight


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalKeel:
    """`keel serve` as a child process on 127.0.0.1:PORT; `stop()` (or leaving the `with`
    block) sends SIGTERM and waits for it."""

    def __init__(self, binary: str = "keel", *, config: Optional[str] = None,
                 data_dir: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                 timeout: float = 120.0, stderr: Union[int, IO, None] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> None:
        self.port = free_port()
        #: PEM bytes of the server's certificate where it serves TLS (`tls_cert`).
        self.tls_root_certs = open(tls_cert, "rb").read() if tls_cert else None
        self.address = (f"grpc+tls://localhost:{self.port}" if tls_cert
                        else f"grpc://127.0.0.1:{self.port}")
        #: The HTTP front (OpenAI's embeddings API), on a free port of its own (https://
        #: with `tls_cert`, as Flight).
        self.http_port = free_port()
        self.http_address = (f"https://localhost:{self.http_port}" if tls_cert
                             else f"http://127.0.0.1:{self.http_port}")
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="keel-local-")
        full_env = dict(os.environ)
        full_env.update({"KEEL_SERVER__LISTEN": f"127.0.0.1:{self.port}",
                         "KEEL_HTTP__LISTEN": f"127.0.0.1:{self.http_port}",
                         "KEEL_STORAGE__DATA_DIR": self.data_dir})
        if tls_cert:
            full_env.update({"KEEL_SERVER__TLS__CERT": tls_cert, "KEEL_SERVER__TLS__KEY": tls_key or ""})
        full_env.update(env or {})
        args = [binary, "serve"] + (["--config", config] if config else [])
        self.proc = subprocess.Popen(args, env=full_env, stderr=stderr)
        self._wait(timeout)

    def connect(self) -> flight.FlightClient:
        """A pyarrow Flight client of this server (trusting its certificate under TLS)."""
        if self.tls_root_certs:
            return flight.connect(self.address, tls_root_certs=self.tls_root_certs)
        return flight.connect(self.address)

    def _wait(self, timeout: float) -> None:
        client = self.connect()
        deadline = time.time() + timeout
        options = flight.FlightCallOptions(timeout=10)
        while True:
            try:
                list(client.do_action(flight.Action("health", b""), options=options))
                return
            except flight.FlightUnauthenticatedError:
                return  # up, and asking for credentials
            except (flight.FlightUnavailableError, flight.FlightTimedOutError, OSError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"keel serve exited with {self.proc.returncode} before it "
                                       "was up")
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"keel serve was not up within {timeout:.0f} s")
                time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "LocalKeel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(workdir: str, port: Optional[int] = None) -> "tuple[subprocess.Popen, str]":
    """A `redis-server` (Keel's shared cache, `cache.shared.url`) on a loopback port with no
    persistence, files in `workdir`; returns the process and its URL once it answers PING."""
    port = port or free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start (is it installed? apt-get install redis-server)")
            time.sleep(0.05)
