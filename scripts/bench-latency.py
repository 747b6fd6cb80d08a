"""Latency of a single query against `keel serve` over Arrow Flight, idle and beside a bulk
DoPut, with the fast lane on and off, in one run.

usage: .cache/venv/bin/python scripts/bench-latency.py [--queries N] [--bulk-rows N]

For each setting (`ingest.fast_lane_rows` 8, the default, and 0) it starts the release
binary on a free port and measures:
  model:   the model's own time for one text: the server's busy time per pass over the
           idle queries (stats.embedder.busy_ms / passes), timed in the same process;
  pass:    the bulk passes' mean time (busy_ms / passes over the bulk DoPut alone);
  idle:    one uncached text, end to end: over HTTP (`POST /v1/embeddings`, one kept-alive
           connection) and as a one-row DoExchange from pyarrow (p50, p99);
  loaded:  the same while a DoPut of --bulk-rows unseen texts runs beside them (from a
           process of its own, as a bulk producer would be);
  bulk:    the DoPut's rows/s alone and with the queries beside it;
  search:  the `search` action for an unseen query text over the stored rows (p50, p99);
  batches: 2 000 unseen texts in batches of 32, over HTTP and over DoExchange (texts/s).
Prints one table; the targets are p50 <= 1.5x and p99 <= 3x the model's time idle, p99
<= 4x the model's time plus one pass loaded, bulk throughput down <= 10 %, and HTTP's
batches >= 0.8x DoExchange's.
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.flight as flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target/release/keel")
sys.path.insert(0, os.path.join(ROOT, "python"))
from keel_client.local import LocalKeel  # noqa: E402


def action(client, kind, body=b""):
    return json.loads(list(client.do_action(flight.Action(kind, body)))[0].body.to_pybytes())


def one_row(client, text):
    """Seconds for one one-row DoExchange, from the descriptor to the last answer."""
    table = pa.table({"text": [text]})
    started = time.perf_counter()
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"))
    writer.begin(table.schema)
    writer.write_table(table)
    writer.done_writing()
    got = reader.read_all()
    writer.close()
    elapsed = time.perf_counter() - started
    assert got.num_rows == 1
    return elapsed


def http_query(conn, text):
    """Seconds for one `POST /v1/embeddings` on a kept-alive connection."""
    body = json.dumps({"model": "all-MiniLM-L6-v2", "input": text})
    started = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - started
    assert response.status == 200, payload[:200]
    return elapsed


def http_batches(conn, texts, size=32):
    started = time.perf_counter()
    for i in range(0, len(texts), size):
        body = json.dumps({"model": "all-MiniLM-L6-v2", "input": texts[i:i + size]})
        conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    return len(texts) / (time.perf_counter() - started)


def flight_batches(client, texts, size=32):
    started = time.perf_counter()
    for i in range(0, len(texts), size):
        table = pa.table({"text": texts[i:i + size]})
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"))
        writer.begin(table.schema)
        writer.write_table(table)
        writer.done_writing()
        reader.read_all()
        writer.close()
    return len(texts) / (time.perf_counter() - started)


def put(client, name, rows, tag):
    table = pa.table({"text": [f"{tag} bulk variant {i} of GENE{i % 211} at chr{i % 22 + 1}:{1000 + i} "
                               f"C>T missense_variant" for i in range(rows)]})
    started = time.perf_counter()
    writer, meta = client.do_put(flight.FlightDescriptor.for_path("datasets", name), table.schema)
    for batch in table.to_batches(max_chunksize=1000):
        writer.write_batch(batch)
    writer.done_writing()
    while meta.read() is not None:
        pass
    writer.close()
    return rows / (time.perf_counter() - started)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] * 1000


def measure(fast_lane_rows, queries, bulk_rows):
    data = tempfile.mkdtemp(prefix="keel-latency-")
    keel = LocalKeel(KEEL, config=os.path.join(ROOT, "configs/default.yaml"), data_dir=data,
                     env={"KEEL_METRICS__ENABLED": "false",
                          "KEEL_INGEST__FAST_LANE_ROWS": str(fast_lane_rows)},
                     stderr=subprocess.DEVNULL)
    port = keel.port
    try:
        client = flight.connect(f"grpc://127.0.0.1:{port}")
        conn = http.client.HTTPConnection("127.0.0.1", keel.http_port, timeout=120)
        for i in range(10):  # warm-up: connections, allocator, caches of the CPU
            one_row(client, f"warm-up query {i}")
            http_query(conn, f"warm-up http query {i}")
        before = action(client, "stats")["embedder"]
        idle = [one_row(client, f"idle query {i}: BRCA{i % 2 + 1} frameshift_variant")
                for i in range(queries)]
        idle_http = [http_query(conn, f"idle http query {i}: BRCA{i % 2 + 1} frameshift_variant")
                     for i in range(queries)]
        after = action(client, "stats")["embedder"]
        passes = max(1, after["passes"] - before["passes"])
        model_ms = (after["busy_ms"] - before["busy_ms"]) / passes

        alone = put(client, "alone", bulk_rows, "alone")
        bulk_stats = action(client, "stats")["embedder"]
        pass_ms = (bulk_stats["busy_ms"] - after["busy_ms"]) / max(1, bulk_stats["passes"] - after["passes"])
        # The bulk producer in a process of its own (this one's threads would share its GIL).
        producer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bulk-only", str(port),
                                     str(bulk_rows)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        loaded, loaded_http = [], []
        i = 0
        while producer.poll() is None:
            loaded.append(one_row(client, f"loaded query {i}: TP53 stop_gained {time.time()}"))
            loaded_http.append(http_query(conn, f"loaded http query {i}: TP53 stop_gained {time.time()}"))
            i += 1
        out, _ = producer.communicate()
        beside = float(out.strip().splitlines()[-1])
        final = action(client, "stats")["embedder"]
        searches = []
        for i in range(min(queries, 50)):
            body = json.dumps({"dataset": "alone", "text": f"search {i}: GENE{i} splice_region", "k": 10})
            started = time.perf_counter()
            action(client, "search", body.encode())
            searches.append(time.perf_counter() - started)
        texts = [f"batch text {k} of GENE{k % 97} chr{k % 22 + 1}:{5000 + k} G>A" for k in range(4000)]
        batches_http = http_batches(conn, texts[:2000])
        batches_flight = flight_batches(client, texts[2000:])
        return {
            "fast_lane_rows": fast_lane_rows,
            "model_ms": model_ms, "pass_ms": pass_ms,
            "idle_p50": pct(idle, 50), "idle_p99": pct(idle, 99),
            "idle_http_p50": pct(idle_http, 50), "idle_http_p99": pct(idle_http, 99),
            "loaded_p50": pct(loaded, 50) if loaded else None,
            "loaded_p99": pct(loaded, 99) if loaded else None,
            "loaded_http_p50": pct(loaded_http, 50) if loaded_http else None,
            "loaded_http_p99": pct(loaded_http, 99) if loaded_http else None,
            "loaded_n": len(loaded),
            "bulk_alone": alone, "bulk_beside": beside,
            "search_p50": pct(searches, 50), "search_p99": pct(searches, 99),
            "batches_http": batches_http, "batches_flight": batches_flight,
            "fast_jobs": final.get("fast_jobs"),
        }
    finally:
        keel.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--bulk-rows", type=int, default=20000)
    ap.add_argument("--bulk-only", nargs=2, metavar=("PORT", "ROWS"),
                    help="(internal) run the bulk DoPut against PORT and print its rows/s")
    args = ap.parse_args()
    if args.bulk_only:
        port, rows = map(int, args.bulk_only)
        print(put(flight.connect(f"grpc://127.0.0.1:{port}"), "beside", rows, "beside"))
        return
    rows = [measure(n, args.queries, args.bulk_rows) for n in (8, 0)]
    f = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    print("fast_lane_rows | model ms | pass ms | idle p50/p99 http | idle p50/p99 flight | "
          "loaded p50/p99 http | loaded p50/p99 flight | bulk alone | bulk beside | "
          "search p50/p99 | batches of 32 http / flight (texts/s)")
    for r in rows:
        print(f"{r['fast_lane_rows']} | {f(r['model_ms'])} | {f(r['pass_ms'])} | "
              f"{f(r['idle_http_p50'])} / {f(r['idle_http_p99'])} | {f(r['idle_p50'])} / {f(r['idle_p99'])} | "
              f"{f(r['loaded_http_p50'])} / {f(r['loaded_http_p99'])} | "
              f"{f(r['loaded_p50'])} / {f(r['loaded_p99'])} | {r['bulk_alone']:.0f} | {r['bulk_beside']:.0f} | "
              f"{f(r['search_p50'])} / {f(r['search_p99'])} | {r['batches_http']:.0f} / {r['batches_flight']:.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
