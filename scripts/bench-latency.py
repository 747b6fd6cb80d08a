"""Latency of a single query against `keel serve` over Arrow Flight, idle and beside a bulk
DoPut, with the fast lane on and off, in one run.

usage: .cache/venv/bin/python scripts/bench-latency.py [--queries N] [--bulk-rows N]

For each setting (`ingest.fast_lane_rows` 8, the default, and 0) it starts the release
binary on a free port and measures:
  model:   the model's own time for one text: the server's busy time per pass over the
           idle queries (stats.embedder.busy_ms / passes), timed in the same process;
  idle:    one-row DoExchange of an unseen text, end to end from pyarrow (p50, p99);
  loaded:  the same while a DoPut of --bulk-rows unseen texts runs beside it;
  bulk:    the DoPut's rows/s alone and with the queries beside it;
  search:  the `search` action for an unseen query text over the stored rows (p50, p99).
Prints one table; the targets of issue 26 are p50 <= 1.5x and p99 <= 3x the model's time
idle, p99 <= 4x the model's time plus one pass loaded, and bulk throughput down <= 10 %.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target/release/keel")
sys.path.insert(0, os.path.join(ROOT, "python"))
from keel_client.local import LocalKeel  # noqa: E402


def serve(data_dir, extra_env):
    keel = LocalKeel(KEEL, config=os.path.join(ROOT, "configs/default.yaml"), data_dir=data_dir,
                     env={"KEEL_METRICS__ENABLED": "false", **extra_env}, stderr=subprocess.DEVNULL)
    return keel.proc, keel.port


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
    proc, port = serve(data, {"KEEL_INGEST__FAST_LANE_ROWS": str(fast_lane_rows)})
    try:
        client = flight.connect(f"grpc://127.0.0.1:{port}")
        for i in range(10):  # warm-up: connections, allocator, caches of the CPU
            one_row(client, f"warm-up query {i}")
        before = action(client, "stats")["embedder"]
        idle = [one_row(client, f"idle query {i}: BRCA{i % 2 + 1} frameshift_variant")
                for i in range(queries)]
        after = action(client, "stats")["embedder"]
        passes = max(1, after["passes"] - before["passes"])
        model_ms = (after["busy_ms"] - before["busy_ms"]) / passes

        alone = put(client, "alone", bulk_rows, "alone")
        loaded, done = [], threading.Event()
        bulk = {}

        def bulk_put():
            bulk["rate"] = put(flight.connect(f"grpc://127.0.0.1:{port}"), "beside", bulk_rows, "beside")
            done.set()

        t = threading.Thread(target=bulk_put)
        t.start()
        time.sleep(0.5)
        i = 0
        while not done.is_set():
            loaded.append(one_row(client, f"loaded query {i}: TP53 stop_gained {time.time()}"))
            i += 1
        t.join()
        final = action(client, "stats")["embedder"]
        searches = []
        for i in range(min(queries, 50)):
            body = json.dumps({"dataset": "alone", "text": f"search {i}: GENE{i} splice_region", "k": 10})
            started = time.perf_counter()
            action(client, "search", body.encode())
            searches.append(time.perf_counter() - started)
        return {
            "fast_lane_rows": fast_lane_rows,
            "model_ms": model_ms,
            "idle_p50": pct(idle, 50), "idle_p99": pct(idle, 99),
            "loaded_p50": pct(loaded, 50) if loaded else None,
            "loaded_p99": pct(loaded, 99) if loaded else None,
            "loaded_n": len(loaded),
            "bulk_alone": alone, "bulk_beside": bulk.get("rate"),
            "search_p50": pct(searches, 50), "search_p99": pct(searches, 99),
            "fast_jobs": final.get("fast_jobs"),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--bulk-rows", type=int, default=20000)
    args = ap.parse_args()
    rows = [measure(n, args.queries, args.bulk_rows) for n in (8, 0)]
    print(f"{'fast_lane_rows':>14} {'model ms':>9} {'idle p50':>9} {'idle p99':>9} {'loaded p50':>11} "
          f"{'loaded p99':>11} {'bulk alone':>11} {'bulk beside':>12} {'search p50':>11} {'search p99':>11}")
    for r in rows:
        print(f"{r['fast_lane_rows']:>14} {r['model_ms']:>9.2f} {r['idle_p50']:>9.2f} {r['idle_p99']:>9.2f} "
              f"{r['loaded_p50'] or 0:>11.2f} {r['loaded_p99'] or 0:>11.2f} {r['bulk_alone']:>11.0f} "
              f"{r['bulk_beside'] or 0:>12.0f} {r['search_p50']:>11.2f} {r['search_p99']:>11.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
