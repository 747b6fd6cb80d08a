"""The Python client package (python/, `pip install ./python`) against real Keel servers,
and the standard gRPC health service through grpcio-health-checking."""
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keel_client import KeelClient, KeelError
from keel_client import contract

TEXTS = [f"GENE{i % 23} chr2:{1000 + i} C>T missense_variant" for i in range(600)]
TABLE = pa.table({"id": list(range(600)), "text": TEXTS})


@pytest.fixture(scope="module")
def servers(start_keel):
    """Two servers: the second is killed by the last test of this module."""
    return start_keel(), start_keel()


@pytest.fixture(scope="module")
def address(servers):
    return servers[0].address


@pytest.fixture(scope="module")
def client(address):
    return KeelClient(address, timeout=120)


@pytest.fixture(scope="module")
def embedded(client):
    return client.embed(TABLE)


def vectors(table):
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1)


def test_embed_returns_every_row_in_order_at_unit_length(embedded):
    assert embedded.num_rows == 600 and embedded.column("id").to_pylist() == list(range(600))
    assert embedded.schema.field("embedding").type.list_size == 384
    assert np.allclose(np.linalg.norm(vectors(embedded), axis=1), 1.0, atol=1e-4)


def test_a_calls_own_template_replaces_the_clients_text_column(address):
    by_column = KeelClient(address, timeout=120, text_column="description")
    table = pa.table({"gene": ["BRCA1"], "pos": [41245000], "description": ["x"]})
    templ = by_column.embed(table, template="{gene} {pos}")
    plain = by_column.embed(pa.table({"description": ["BRCA1 41245000"]}))
    assert np.allclose(vectors(templ), vectors(plain), atol=1e-6)


def test_a_template_embeds_the_text_it_renders(client):
    templ = client.embed(pa.table({"gene": ["BRCA1", "TP53"], "pos": [41245000, 7673000]}),
                         template="{gene} {pos}")
    plain = client.embed(pa.table({"text": ["BRCA1 41245000", "TP53 7673000"]}))
    assert np.allclose(vectors(templ), vectors(plain), atol=1e-6)


def test_parquet_paths_in_and_out(client, embedded, tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(TABLE.rename_columns(["id", "description"]), src)
    v = vectors(embedded)
    assert np.allclose(vectors(client.embed(str(src), text_column="description")), v, atol=1e-6)
    dst = tmp_path / "out.parquet"
    n = client.embed_to_parquet(str(src), str(dst), text_column="description", chunk_rows=250)
    assert n == 600 and np.allclose(vectors(pq.read_table(dst)), v, atol=1e-6)


def test_a_missing_text_column_raises_keel_error_with_the_servers_message(client, address):
    with pytest.raises(KeelError) as e:
        client.embed(pa.table({"other": ["x"]}))
    assert "not found" in str(e.value) and e.value.code == "InvalidArgument", (e.value.code, str(e.value))
    assert e.value.address == address


def test_rejected_exchanges_one_after_another_never_abort_the_process(client):
    # The writer thread ending its side (`done_writing`) while the reader met the server's
    # rejection aborted the whole Python process inside gRPC, about once in a few hundred
    # rejected calls; the writer now waits until its rows are answered or the reader
    # stopped. 400 calls: the old client aborted within them in 6 runs of 6.
    for _ in range(400):
        with pytest.raises(KeelError) as e:
            client.embed(pa.table({"other": ["x"]}))
        assert e.value.code == "InvalidArgument"


def test_a_source_that_fails_raises_its_error_and_is_not_taken_for_a_lost_server(client):
    # A caller's reader failing with a ConnectionError (a socket reset under it) is its
    # failure, not the server's: the stream used to fail over, find the source exhausted
    # and return its first rows as if they were all.
    def source():
        yield pa.record_batch({"text": TEXTS[:50]})
        yield pa.record_batch({"text": TEXTS[50:100]})
        raise ConnectionResetError("the caller's upstream reset")

    got = []
    with pytest.raises(ConnectionResetError, match="upstream reset"):
        for batch in client.embed_stream(source()):
            got.append(batch.num_rows)
    assert sum(got) <= 100


def test_a_stream_longer_than_the_call_timeout_is_not_cut(address):
    # `timeout` bounds unary calls; a stream (a Spark partition, a big file) may take
    # longer: it used to end with DeadlineExceeded once `timeout` passed.
    quick = KeelClient(address, timeout=1.0)

    def slow():
        for i in range(3):
            time.sleep(0.6)
            yield pa.record_batch({"text": TEXTS[i * 10:(i + 1) * 10]})

    rows = sum(b.num_rows for b in quick.embed_stream(slow()))
    assert rows == 30


def test_int8_of_the_first_128_dimensions_as_documented(address, embedded):
    compact = KeelClient(address, timeout=120, precision="int8", dimensions=128).embed(TABLE.slice(0, 10))
    assert compact.schema.field("embedding").type.value_type == pa.int8()
    q = compact.column("embedding").combine_chunks().values.to_numpy().reshape(10, 128)
    deq = q * compact.column("embedding_scale").to_numpy()[:, None]
    v = vectors(embedded)
    cut = v[:10, :128] / np.linalg.norm(v[:10, :128], axis=1, keepdims=True)
    cos = np.sum(deq * cut, axis=1) / np.linalg.norm(deq, axis=1)
    assert cos.min() > 0.999, cos.min()


def test_binary_vectors_are_the_signs_read_as_docs_flight_shows(address, embedded):
    result = KeelClient(address, timeout=120, precision="binary").embed(TABLE.slice(0, 10))
    emb = result.column("embedding").combine_chunks()
    d = int(result.schema.field("embedding").metadata[b"keel.dimensions"])
    bits = np.frombuffer(emb.buffers()[1], np.uint8).reshape(len(emb), -1)
    signs = np.unpackbits(bits, axis=1)[:, :d].astype(np.float32) * 2 - 1
    assert d == 384
    assert np.array_equal(signs, np.where(vectors(embedded)[:10] > 0, 1.0, -1.0))


def test_put_read_and_search_with_the_contracts_types(client, address):
    assert client.put(TABLE.slice(0, 100), "pyclient") == 100
    back = client.read("pyclient")
    assert back.num_rows == 100 and "embedding" in back.column_names
    found = client.action("search", {"dataset": "pyclient", "text": TEXTS[5], "k": 3})
    assert found["results"][0]["text"] == TEXTS[5], found
    typed = client.action("search", contract.body(
        contract.SearchRequest(dataset="pyclient", text=TEXTS[5], k=3, mode="exact")))
    assert typed["mode"] == "exact" and typed["results"][0]["text"] == TEXTS[5], typed
    listed = tuple(a.type for a in client._client(address).list_actions())
    assert sorted(listed) == sorted(contract.ACTIONS), listed


def test_refusals_carry_their_grpc_status_by_name(client, start_keel):
    # pyarrow raises several statuses as one Arrow error class; the client tells them apart.
    with pytest.raises(KeelError) as e:
        client.read("no-such-dataset")
    assert e.value.code == "NotFound", (e.value.code, str(e.value))
    rows = client.put(TABLE.slice(0, 10), "pyexpect")
    assert client.put(TABLE.slice(10, 10), "pyexpect", expect_rows=rows) == rows + 10
    with pytest.raises(KeelError) as e:
        client.put(TABLE.slice(10, 10), "pyexpect", expect_rows=rows)   # sent again: refused
    assert e.value.code == "FailedPrecondition", (e.value.code, str(e.value))
    assert client.read("pyexpect").num_rows == rows + 10

    import pyarrow.flight as flight
    one = start_keel(env={"KEEL_SERVER__MAX_STREAMS": "1"})
    holder = flight.connect(one.address)
    writer, reader = holder.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
    writer.begin(TABLE.schema)
    writer.write_batch(TABLE.to_batches()[0].slice(0, 1))
    reader.read_chunk()   # the stream holds the server's one slot
    with pytest.raises(KeelError) as e:
        KeelClient(one.address, timeout=30).embed(TABLE.slice(0, 5))
    assert e.value.code == "ResourceExhausted", (e.value.code, str(e.value))
    # A fleet sends a refused stream to the next server.
    fleet = KeelClient([one.address, client.addresses[0]], timeout=30)
    assert fleet.embed(TABLE.slice(0, 5)).num_rows == 5
    # Alone, it backs off and tries again: the slot is free by then.
    threading.Timer(0.15, lambda: (writer.done_writing(), writer.close())).start()
    assert KeelClient(one.address, timeout=30, retries=6).embed(TABLE.slice(0, 5)).num_rows == 5


def test_grpc_health_says_serving(servers):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{servers[0].port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = {service: health_pb2.HealthCheckResponse.ServingStatus.Name(
                      stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)
                  for service in ("", "arrow.flight.protocol.FlightService")}
    assert status == {"": "SERVING", "arrow.flight.protocol.FlightService": "SERVING"}, status


def test_a_stream_outlives_its_server_and_answers_every_row_once(start_keel, servers, client):
    doomed = start_keel()
    fleet = KeelClient([doomed.address, servers[0].address], timeout=120)
    rows = 4000

    def source():
        for i in range(0, rows, 100):
            if i == 1500:  # mid-stream: 1 500 rows sent, some of them answered
                doomed.proc.kill()
                doomed.proc.wait()
            ids = list(range(i, i + 100))
            yield pa.record_batch({"id": ids, "text": [f"stream row {j} GENE{j % 29}" for j in ids]})

    out = pa.Table.from_batches(list(fleet.embed_stream(source())))
    assert out.column("id").to_pylist() == list(range(rows))
    assert out.column("text").to_pylist()[1499:1502] == [f"stream row {j} GENE{j % 29}" for j in (1499, 1500, 1501)]
    first = out.slice(1495, 10).select(["id", "text"])
    assert np.allclose(vectors(out.slice(1495, 10)), vectors(client.embed(first)), atol=1e-6)

    # A consumer that stops early cancels the exchange; the client stays usable.
    stream = client.embed_stream(iter(TABLE.to_batches(max_chunksize=50)))
    assert next(stream).num_rows > 0
    stream.close()
    assert client.embed(TABLE.slice(0, 3)).num_rows == 3


def test_two_servers_share_a_table_and_one_killed_mid_run_loses_nothing(servers, client, embedded):
    a, b = servers
    fleet = KeelClient([a.address, b.address], timeout=120, batch_rows=100)
    both = fleet.embed(TABLE)
    assert both.column("id").to_pylist() == list(range(600))
    assert np.allclose(vectors(both), vectors(embedded), atol=1e-6)
    served = [client.stats(address=x.address)["rows"] for x in servers]
    assert all(s > 0 for s in served), served

    big = pa.table({"id": list(range(6000)), "text": [f"failover row {i} GENE{i % 31}" for i in range(6000)]})
    killer = threading.Timer(1.0, b.proc.kill)
    killer.start()
    started = time.time()
    survived = fleet.embed(big)
    killer.join()
    assert survived.column("id").to_pylist() == list(range(6000)), \
        f"{survived.num_rows} rows in {time.time() - started:.1f} s"
    assert np.allclose(vectors(survived)[:5], vectors(client.embed(big.slice(0, 5))), atol=1e-6)
