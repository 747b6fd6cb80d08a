"""Keel over Arrow Flight from pyarrow, the client its users have.

Starts `keel serve` (the release binary) on a free port with a temporary data folder,
then speaks to it with pyarrow.flight only. Run by scripts/test.sh:
    python tests/python/test_flight.py target/release/keel
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight

from keel_client.local import LocalKeel, free_port  # noqa: F401 - free_port: for the other tests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = flight.FlightCallOptions(timeout=60)


def start_redis(port, workdir):
    """Debian's redis-server on a loopback port, no persistence; returns once it PONGs."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_server(binary, data_dir):
    """`keel serve` with configs/default.yaml on a free port (keel_client.local.LocalKeel)."""
    keel = LocalKeel(binary, config=os.path.join(ROOT, "configs/default.yaml"), data_dir=data_dir,
                     env={"KEEL_EMBEDDER__MODEL_DIR": os.path.join(ROOT, "models/all-MiniLM-L6-v2"),
                          "KEEL_STORAGE__FLUSH_ROWS": "100"}, timeout=60)
    return keel.proc, flight.connect(keel.address), keel.port


def auth_and_tls(binary, check):
    """Basic auth (pyarrow's authenticate_basic_token) over TLS (grpc+tls://) with a
    certificate made here by openssl."""
    d = tempfile.mkdtemp(prefix="keel-pytls-")
    cert, key, users = (os.path.join(d, n) for n in ("cert.pem", "key.pem", "users"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    with open(users, "w") as f:
        f.write("# username:password\nalice:wonderland\n")
    port = free_port()
    env = dict(os.environ)
    env.update({
        "KEEL_SERVER__LISTEN": f"127.0.0.1:{port}",
        "KEEL_STORAGE__DATA_DIR": os.path.join(d, "data"),
        "KEEL_EMBEDDER__MODEL_DIR": os.path.join(ROOT, "models/all-MiniLM-L6-v2"),
        "KEEL_METRICS__ENABLED": "false",
        "KEEL_SERVER__TLS__CERT": cert,
        "KEEL_SERVER__TLS__KEY": key,
        "KEEL_AUTH__MODE": "basic",
        "KEEL_AUTH__USERS_FILE": users,
    })
    proc = subprocess.Popen([binary, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with open(cert, "rb") as f:
            client = flight.connect(f"grpc+tls://localhost:{port}", tls_root_certs=f.read())
        deadline = time.time() + 60
        while True:
            try:
                header = client.authenticate_basic_token("alice", "wonderland", options=TIMEOUT)
                break
            except (flight.FlightUnavailableError, flight.FlightInternalError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("keel serve (TLS, basic auth) did not come up:\n" + proc.stderr.read())
                time.sleep(0.2)
        check("basic credentials give a bearer token", header[1].startswith(b"Bearer "), header)
        authed = flight.FlightCallOptions(timeout=60, headers=[header])
        table = pa.table({"text": ["BRCA1 frameshift over TLS", "TP53 missense"]})
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"), options=authed)
        writer.begin(table.schema)
        writer.write_table(table)
        writer.done_writing()
        out = reader.read_all()
        writer.close()
        check("an authenticated exchange over TLS works", out.num_rows == 2, out.num_rows)
        try:
            list(client.do_action(flight.Action("stats", b""), options=TIMEOUT))
            check("a call without the token is refused", False)
        except flight.FlightUnauthenticatedError:
            check("a call without the token is refused", True)
        try:
            client.authenticate_basic_token("alice", "looking-glass", options=TIMEOUT)
            check("a wrong password is refused", False)
        except flight.FlightUnauthenticatedError:
            check("a wrong password is refused", True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def exchange(client, table, descriptor):
    """DoExchange with the writer on this thread and the reader on another (a writer that
    does not read deadlocks once HTTP/2 windows fill)."""
    writer, reader = client.do_exchange(descriptor, options=TIMEOUT)
    out, errors = [], []

    def read():
        try:
            for chunk in reader:
                out.append(chunk.data)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    t = threading.Thread(target=read)
    t.start()
    try:
        writer.begin(table.schema)
        for batch in table.to_batches(max_chunksize=64):
            writer.write_batch(batch)
        writer.done_writing()
    except Exception as e:  # noqa: BLE001 - the server may end the stream early
        errors.append(e)
    t.join()
    writer.close()
    if errors:
        raise errors[0]
    return pa.Table.from_batches(out) if out else None


def main(binary):
    data_dir = tempfile.mkdtemp(prefix="keel-pytest-")
    proc, client, port = start_server(binary, data_dir)
    client_port = [port]
    failures = []

    def check(name, cond, detail=""):
        print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))
        if not cond:
            failures.append(name)

    try:
        texts = [f"BRCA1 variant {i} frameshift" for i in range(300)] + [None]
        table = pa.table({"id": pa.array(range(301), pa.int64()), "text": pa.array(texts, pa.string())})
        out = exchange(client, table, flight.FlightDescriptor.for_path("embed"))
        check("exchange returns every row", out.num_rows == 301, out.num_rows)
        check("rows come back in order", out.column("id").to_pylist() == list(range(301)))
        emb = out.column("embedding")
        check("embedding is FixedSizeList<float32, 384>",
              pa.types.is_fixed_size_list(emb.type) and emb.type.list_size == 384
              and emb.type.value_type == pa.float32(), emb.type)
        check("null text gives a null embedding", emb[300].as_py() is None and emb[0].as_py() is not None)
        norm = sum(v * v for v in emb[0].as_py()) ** 0.5
        check("vectors are unit length", abs(norm - 1) < 1e-4, norm)

        # Compressed IPC from pyarrow decodes.
        cmd = flight.FlightDescriptor.for_command(json.dumps({"template": "{gene} {pos}"}))
        t2 = pa.table({"gene": ["TP53", "CFTR"], "pos": [7675088, 117559590]})
        out2 = exchange(client, t2, cmd)
        check("template command works", out2.num_rows == 2)

        # Errors are precise.
        try:
            exchange(client, table, flight.FlightDescriptor.for_command(json.dumps({"text_column": "nope"})))
            check("missing column is InvalidArgument", False, "no error")
        except flight.FlightServerError as e:
            check("missing column is InvalidArgument", False, repr(e))
        except pa.ArrowInvalid as e:
            check("missing column is InvalidArgument", "nope" in str(e), str(e))

        # DoPut, then DoGet and GetFlightInfo.
        desc = flight.FlightDescriptor.for_path("datasets", "pyvariants")
        writer, meta_reader = client.do_put(desc, table.schema, options=TIMEOUT)
        acks = []
        for batch in table.to_batches(max_chunksize=50):
            writer.write_batch(batch)
        writer.done_writing()
        while True:
            buf = meta_reader.read()
            if buf is None:
                break
            acks.append(json.loads(buf.to_pybytes()))
        writer.close()
        check("put acknowledges every row", acks and acks[-1]["acknowledged_rows"] == 301, acks)
        info = client.get_flight_info(desc, options=TIMEOUT)
        check("flight info counts rows", info.total_records == 301, info.total_records)
        back = client.do_get(flight.Ticket(b"pyvariants"), options=TIMEOUT).read_all()
        check("get returns the dataset", back.num_rows == 301 and back.column("id").to_pylist() == list(range(301)))
        names = [f.descriptor.path for f in client.list_flights(options=TIMEOUT)]
        check("list_flights lists it", [b"datasets", b"pyvariants"] in names, names)

        # The Parquet example, as a user would run it.
        import pyarrow.parquet as pq
        src = os.path.join(data_dir, "in.parquet")
        dst = os.path.join(data_dir, "out.parquet")
        pq.write_table(pa.table({"gene": ["BRCA1"] * 1500, "pos": list(range(1500))}), src)
        port = client_port[0]
        run = subprocess.run([sys.executable, os.path.join(ROOT, "examples/stream_parquet.py"), src, dst,
                              "--template", "{gene} {pos}", "--server", f"grpc://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=300)
        ok = run.returncode == 0 and pq.read_table(dst).num_rows == 1500
        check("examples/stream_parquet.py streams a Parquet file", ok, run.stderr[-500:])

        stats = json.loads(next(iter(client.do_action(flight.Action("stats", b""), options=TIMEOUT))).body.to_pybytes())
        check("stats reports rows and cache", stats["rows"] >= 301 and "hits" in stats["cache"], stats)

        auth_and_tls(binary, check)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        check("SIGTERM stops the server with exit 0", code == 0, code)
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)
    print("all pyarrow checks passed")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/keel"))
