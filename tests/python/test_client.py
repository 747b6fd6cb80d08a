"""The Python client package (python/, `pip install ./python`) against real Keel servers,
and the standard gRPC health service through grpcio-health-checking. Run by
scripts/test.sh:
    python tests/python/test_client.py target/release/keel
"""
import os
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_flight import ROOT, start_server  # noqa: E402

from keel_client import KeelClient, KeelError  # noqa: E402
from keel_client import contract  # noqa: E402

failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name)
    if not cond:
        failures.append(name)
        if detail:
            print("     ", str(detail)[:800])


def vectors(table):
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1)


def grpc_health(port):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {service: health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)
                for service in ("", "arrow.flight.protocol.FlightService")}


def main(binary):
    work = tempfile.mkdtemp(prefix="keel-pyclient-")
    os.environ["KEEL_METRICS__ENABLED"] = "false"  # two servers: no shared metrics port
    servers = [start_server(binary, os.path.join(work, f"data{i}")) for i in range(2)]
    (proc_a, _, port_a), (proc_b, _, port_b) = servers
    a, b = f"grpc://127.0.0.1:{port_a}", f"grpc://127.0.0.1:{port_b}"
    try:
        client = KeelClient(a, timeout=120)
        texts = [f"GENE{i % 23} chr2:{1000 + i} C>T missense_variant" for i in range(600)]
        table = pa.table({"id": list(range(600)), "text": texts})
        out = client.embed(table)
        check("embed returns every row in order with its embedding",
              out.num_rows == 600 and out.column("id").to_pylist() == list(range(600))
              and out.schema.field("embedding").type.list_size == 384)
        v = vectors(out)
        check("vectors are unit length", np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4))

        templ = client.embed(pa.table({"gene": ["BRCA1", "TP53"], "pos": [41245000, 7673000]}),
                             template="{gene} {pos}")
        plain = client.embed(pa.table({"text": ["BRCA1 41245000", "TP53 7673000"]}))
        check("a template embeds the text it renders",
              np.allclose(vectors(templ), vectors(plain), atol=1e-6))

        src = os.path.join(work, "in.parquet")
        pq.write_table(table.rename_columns(["id", "description"]), src)
        from_file = client.embed(src, text_column="description")
        check("a Parquet path with text_column", np.allclose(vectors(from_file), v, atol=1e-6))
        dst = os.path.join(work, "out.parquet")
        n = client.embed_to_parquet(src, dst, text_column="description", chunk_rows=250)
        check("embed_to_parquet writes every row",
              n == 600 and np.allclose(vectors(pq.read_table(dst)), v, atol=1e-6))

        try:
            client.embed(pa.table({"other": ["x"]}))
            check("a missing text column raises KeelError", False)
        except KeelError as e:
            check("a missing text column raises KeelError with the server's message",
                  "not found" in str(e) and e.code == "InvalidArgument" and e.address == a,
                  (e.code, str(e)))

        compact = KeelClient(a, timeout=120, precision="int8", dimensions=128).embed(table.slice(0, 10))
        q = compact.column("embedding").combine_chunks().values.to_numpy().reshape(10, 128)
        deq = q * compact.column("embedding_scale").to_numpy()[:, None]
        cut = v[:10, :128] / np.linalg.norm(v[:10, :128], axis=1, keepdims=True)
        cos = np.sum(deq * cut, axis=1) / np.linalg.norm(deq, axis=1)
        check("precision and dimensions: int8 of the first 128 dimensions, as documented",
              compact.schema.field("embedding").type.value_type == pa.int8() and cos.min() > 0.999,
              cos.min())

        # binary, read back the way docs/FLIGHT.md shows
        result = KeelClient(a, timeout=120, precision="binary").embed(table.slice(0, 10))
        emb = result.column("embedding").combine_chunks()
        d = int(result.schema.field("embedding").metadata[b"keel.dimensions"])
        bits = np.frombuffer(emb.buffers()[1], np.uint8).reshape(len(emb), -1)
        signs = np.unpackbits(bits, axis=1)[:, :d].astype(np.float32) * 2 - 1
        check("binary vectors are the signs of the f32 ones (numpy unpackbits order)",
              d == 384 and np.array_equal(signs, np.where(v[:10] > 0, 1.0, -1.0)))

        rows = client.put(table.slice(0, 100), "pyclient")
        check("put stores the rows durably", rows == 100, rows)
        back = client.read("pyclient")
        check("read returns the dataset", back.num_rows == 100 and "embedding" in back.column_names)
        found = client.action("search", {"dataset": "pyclient", "text": texts[5], "k": 3})
        check("search through the client", found["results"][0]["text"] == texts[5], found)
        typed = client.action("search", contract.body(
            contract.SearchRequest(dataset="pyclient", text=texts[5], k=3, mode="exact")))
        check("a search built from the contract's SearchRequest",
              typed["mode"] == "exact" and typed["results"][0]["text"] == texts[5], typed)
        listed = tuple(a.type for a in client._client(a).list_actions())
        check("the contract's ACTIONS are the server's ListActions",
              sorted(listed) == sorted(contract.ACTIONS), listed)

        # Two servers: the table split over both, every row once; then one goes away
        # mid-run and its slices go to the other.
        fleet = KeelClient([a, b], timeout=120, batch_rows=100)
        both = fleet.embed(table)
        check("a spread over two servers keeps every row once, in order",
              both.column("id").to_pylist() == list(range(600))
              and np.allclose(vectors(both), v, atol=1e-6))
        served = [client.stats(address=x)["rows"] for x in (a, b)]
        check("both servers took part", all(s > 0 for s in served), served)

        big = pa.table({"id": list(range(6000)),
                        "text": [f"failover row {i} GENE{i % 31}" for i in range(6000)]})
        killer = threading.Timer(1.0, proc_b.kill)
        killer.start()
        started = time.time()
        survived = fleet.embed(big)
        killer.join()
        check("a server killed mid-run: every row comes back once",
              survived.column("id").to_pylist() == list(range(6000)),
              f"{survived.num_rows} rows in {time.time() - started:.1f} s")
        check("failover rows match the surviving server's",
              np.allclose(vectors(survived)[:5], vectors(client.embed(big.slice(0, 5))), atol=1e-6))

        status = grpc_health(port_a)
        check("grpc.health.v1 says SERVING for the server and the Flight service",
              status == {"": "SERVING", "arrow.flight.protocol.FlightService": "SERVING"}, status)
    finally:
        for proc, _, _ in servers:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)
    print("all client checks passed")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/keel"))
