"""Keel over Arrow Flight from pyarrow, the client its users have: `keel serve` (the
release binary) on a free port with a data folder of its own, spoken to with
pyarrow.flight only."""
import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import ROOT

TIMEOUT = flight.FlightCallOptions(timeout=60)


@pytest.fixture(scope="module")
def keel(start_keel):
    return start_keel(env={"KEEL_STORAGE__FLUSH_ROWS": "100"})


@pytest.fixture(scope="module")
def client(keel):
    return keel.connect()


def exchange(client, table, descriptor, options=TIMEOUT):
    """DoExchange with the writer on this thread and the reader on another (a writer that
    does not read deadlocks once HTTP/2 windows fill)."""
    writer, reader = client.do_exchange(descriptor, options=options)
    out, errors = [], []

    def read():
        try:
            for chunk in reader:
                out.append(chunk.data)
        except Exception as e:  # noqa: BLE001 - raised below
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


TEXTS = [f"BRCA1 variant {i} frameshift" for i in range(300)] + [None]
TABLE = pa.table({"id": pa.array(range(301), pa.int64()), "text": pa.array(TEXTS, pa.string())})


def test_an_exchange_returns_every_row_in_order_with_its_vector(client):
    out = exchange(client, TABLE, flight.FlightDescriptor.for_path("embed"))
    assert out.num_rows == 301
    assert out.column("id").to_pylist() == list(range(301))
    emb = out.column("embedding")
    assert pa.types.is_fixed_size_list(emb.type), emb.type
    assert emb.type.list_size == 384 and emb.type.value_type == pa.float32(), emb.type
    assert emb[300].as_py() is None, "a null text gives a null embedding"
    assert emb[0].as_py() is not None
    norm = sum(v * v for v in emb[0].as_py()) ** 0.5
    assert abs(norm - 1) < 1e-4, "vectors are unit length"


def test_a_template_command_renders_each_row(client):
    cmd = flight.FlightDescriptor.for_command(json.dumps({"template": "{gene} {pos}"}))
    out = exchange(client, pa.table({"gene": ["TP53", "CFTR"], "pos": [7675088, 117559590]}), cmd)
    assert out.num_rows == 2


def test_a_missing_column_is_invalid_argument_naming_it(client):
    cmd = flight.FlightDescriptor.for_command(json.dumps({"text_column": "nope"}))
    with pytest.raises(pa.ArrowInvalid, match="nope"):
        exchange(client, TABLE, cmd)


def test_put_is_acknowledged_then_read_back_described_and_listed(client):
    desc = flight.FlightDescriptor.for_path("datasets", "pyvariants")
    writer, meta_reader = client.do_put(desc, TABLE.schema, options=TIMEOUT)
    for batch in TABLE.to_batches(max_chunksize=50):
        writer.write_batch(batch)
    writer.done_writing()
    acks = []
    while (buf := meta_reader.read()) is not None:
        acks.append(json.loads(buf.to_pybytes()))
    writer.close()
    assert acks and acks[-1]["acknowledged_rows"] == 301, acks
    assert client.get_flight_info(desc, options=TIMEOUT).total_records == 301
    back = client.do_get(flight.Ticket(b"pyvariants"), options=TIMEOUT).read_all()
    assert back.num_rows == 301 and back.column("id").to_pylist() == list(range(301))
    names = [f.descriptor.path for f in client.list_flights(options=TIMEOUT)]
    assert [b"datasets", b"pyvariants"] in names, names


def test_the_parquet_example_streams_a_file(keel, tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.table({"gene": ["BRCA1"] * 1500, "pos": list(range(1500))}), src)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples/stream_parquet.py"), str(src), str(dst),
                          "--template", "{gene} {pos}", "--server", keel.address],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-500:]
    assert pq.read_table(dst).num_rows == 1500


def test_stats_count_rows_and_the_cache(client):
    exchange(client, TABLE, flight.FlightDescriptor.for_path("embed"))
    result = next(iter(client.do_action(flight.Action("stats", b""), options=TIMEOUT)))
    stats = json.loads(result.body.to_pybytes())
    assert stats["rows"] >= 301 and "hits" in stats["cache"], stats


def test_basic_auth_over_tls(start_keel, tmp_path):
    """Basic auth (pyarrow's authenticate_basic_token) over TLS (grpc+tls://) with a
    certificate made here by openssl."""
    cert, key, users = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "users"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    users.write_text("# username:password\nalice:wonderland\n")
    keel = start_keel(env={"KEEL_AUTH__MODE": "basic", "KEEL_AUTH__USERS_FILE": str(users)},
                      tls_cert=str(cert), tls_key=str(key))
    client = keel.connect()
    header = client.authenticate_basic_token("alice", "wonderland", options=TIMEOUT)
    assert header[1].startswith(b"Bearer "), header
    authed = flight.FlightCallOptions(timeout=60, headers=[header])
    table = pa.table({"text": ["BRCA1 frameshift over TLS", "TP53 missense"]})
    out = exchange(client, table, flight.FlightDescriptor.for_path("embed"), options=authed)
    assert out.num_rows == 2
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.do_action(flight.Action("stats", b""), options=TIMEOUT))
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.authenticate_basic_token("alice", "looking-glass", options=TIMEOUT)


def test_sigterm_stops_the_server_with_exit_0(start_keel):
    keel = start_keel()
    exchange(keel.connect(), TABLE.slice(0, 10), flight.FlightDescriptor.for_path("embed"))
    assert keel.stop() == 0
