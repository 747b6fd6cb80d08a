"""Search at scale: a dataset's index (the `index` action) in each quantization, with and
without rescoring and through a PCA projection, against the exact scan, measured through
a real `keel serve`.

    .cache/venv/bin/python scripts/bench-index.py target/release/keel [--rows 1000000]
        [--queries 1000] [--exact-queries 20] [--work .cache/bench-compact]

(scripts/bench-compact.sh runs it.) Texts are the sample VCF's annotation fields
recombined (scripts/bench-compact.py's generator: genes, positions, alleles,
consequences and predictions drawn apart and put together again); the first `--queries`
are held out as queries. The rows are embedded once into dataset `variants-ROWS` under
`--work` (`keel produce --resume`: an interrupted run goes on where it stopped; embedding
a million rows takes hours on 2 cores), then for each index configuration: build time,
memory, bytes per vector, recall@10 against the exact f32 top 10 (computed here with
numpy from the stored vectors), and the search action's latency p50 / p99 with the query
vectors already cached (query embedding is timed apart). Prints a Markdown table.
"""
import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from keel_client.local import LocalKeel  # noqa: E402


def start_server(binary, data_dir):
    """`keel serve` with configs/default.yaml on a free port."""
    keel = LocalKeel(binary, config=os.path.join(ROOT, "configs/default.yaml"), data_dir=data_dir,
                     env={"KEEL_EMBEDDER__MODEL_DIR": os.path.join(ROOT, "models/all-MiniLM-L6-v2"),
                          "KEEL_STORAGE__FLUSH_ROWS": "100"}, timeout=60)
    return keel.proc, flight.connect(keel.address), keel.port

_spec = importlib.util.spec_from_file_location("bench_compact", os.path.join(ROOT, "scripts", "bench-compact.py"))
bench_compact = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_compact)

# (graph quantization, projection, rescore, search expansion or None for the configured
# storage.index.expansion_search): the rows of the table. One index is built per graph
# and projection; rescore and expansion are the search's own (the `search` action's
# "rescore" and "expansion"), so rows that share a graph search the same index.
CONFIGS = [
    ("f16", None, 0, None),
    ("int8", None, 0, None),
    ("int8", None, 50, None),
    ("int8", None, 50, 128),
    ("int8", None, 200, None),
    ("binary", None, 0, None),
    ("binary", None, 200, None),
    ("int8", "pca128", 0, None),
    ("int8", "pca128", 50, None),
]
# storage.index.expansion_search in configs/default.yaml: the breadth of a search that
# names none (widened to the search's rescore when that is larger).
DEFAULT_EXPANSION = 64


def texts(binary, work, rows, queries):
    """rows-N.parquet and queries-Q.parquet under work, made once."""
    rows_path = os.path.join(work, f"rows-{rows}.parquet")
    queries_path = os.path.join(work, f"queries-{queries}.parquet")
    if not (os.path.exists(rows_path) and os.path.exists(queries_path)):
        all_texts = bench_compact.recombined(binary, rows + queries, seed=7)
        random.Random(11).shuffle(all_texts)
        pq.write_table(pa.table({"text": all_texts[queries:]}), rows_path)
        pq.write_table(pa.table({"text": all_texts[:queries]}), queries_path)
    return rows_path, pq.read_table(queries_path).column("text").to_pylist()


def action(client, name, body):
    result = client.do_action(flight.Action(name, json.dumps(body).encode()))
    return json.loads(next(result).body.to_pybytes())


def search(client, dataset, text, mode, k=10, rescore=None, expansion=None):
    body = {"dataset": dataset, "text": text, "k": k, "mode": mode}
    if rescore is not None:
        body["rescore"] = rescore
    if expansion:
        body["expansion"] = expansion
    t = time.perf_counter()
    r = action(client, "search", body)
    return [x["row"] for x in r["results"]], (time.perf_counter() - t) * 1000


def stored_vectors(client, dataset):
    reader = client.do_get(flight.Ticket(dataset.encode()))
    chunks = []
    for chunk in reader:
        emb = chunk.data.column("embedding")
        d = emb.type.list_size
        chunks.append(emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), d))
    return np.concatenate(chunks)


def exact_top(matrix, queries, k=10):
    out = []
    for q in queries:
        scores = matrix @ q
        top = np.argpartition(-scores, k)[:k]
        out.append(set(int(i) for i in top[np.argsort(-scores[top])]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target/release/keel"))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=20)
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench-compact"))
    ap.add_argument("--dataset", help="measure this dataset of --work as it stands (no produce); "
                    "queries from --queries-file")
    ap.add_argument("--queries-file", help="Parquet file of held-out query texts (column text)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.dataset:
        dataset, rows_path = args.dataset, None
        queries = pq.read_table(args.queries_file).column("text").to_pylist()[:args.queries]
    else:
        rows_path, queries = texts(args.binary, args.work, args.rows, args.queries)
        dataset = f"variants-{args.rows}"
    os.environ["KEEL_METRICS__ENABLED"] = "false"
    os.environ["KEEL_STORAGE__INDEX__MAX_BYTES"] = str(8 << 30)
    proc, client, port = start_server(args.binary, os.path.join(args.work, "data"))
    results = []
    try:
        started = time.time()
        if rows_path:
            subprocess.run([args.binary, "produce", "--input", rows_path, "--dataset", dataset,
                            "--resume", "--text-column", "text", "--to", f"grpc://127.0.0.1:{port}"],
                           check=True)
        produce_s = time.time() - started
        stored = client.get_flight_info(flight.FlightDescriptor.for_path("datasets", dataset)).total_records
        assert args.dataset or stored == args.rows, f"{dataset} holds {stored} rows, not {args.rows}"
        # What embedding one new query costs (a one-row DoExchange each), then every
        # query's vector, cached by this: the searches below time the search alone.
        embed_ms = []
        for q in queries[:50]:
            t = time.perf_counter()
            bench_compact.exchange(client, [q], {})
            embed_ms.append((time.perf_counter() - t) * 1000)
        qv = bench_compact.vectors(bench_compact.exchange(client, queries, {}))
        matrix = stored_vectors(client, dataset)
        truth = exact_top(matrix, qv)
        del matrix
        exact_ms = [search(client, dataset, q, "exact")[1] for q in queries[:args.exact_queries]]
        reduced = action(client, "reduce", {"dataset": dataset, "dimensions": 128})
        built = None
        for quantization, projection, rescore, expansion in CONFIGS:
            body = {"dataset": dataset, "quantization": quantization, "rescore": 0}
            if projection:
                body["projection"] = projection
            if built is None or built[0] != body:  # the same graph, searched otherwise: kept
                built = (body, action(client, "index", body))
            report = built[1]
            recalls, times = [], []
            for q, want in zip(queries, truth):
                found, ms = search(client, dataset, q, "index", rescore=rescore, expansion=expansion)
                recalls.append(len(set(found) & want) / 10)
                times.append(ms)
            results.append((quantization, projection, rescore, expansion, report,
                            float(np.mean(recalls)),
                            float(np.percentile(times, 50)), float(np.percentile(times, 99))))
            print(results[-1], file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    d = qv.shape[1]
    exact_p50, exact_p99 = np.percentile(exact_ms, 50), np.percentile(exact_ms, 99)
    print(f"\nMachine: {os.cpu_count()} cores, {platform.machine()}; {stored} rows "
          f"(dataset {dataset}, f32, {d} dims), {len(queries)} held-out queries; produce "
          f"(embedding what was not stored yet) {produce_s:.0f} s.\n")
    print(f"Exact scan (`mode: exact`, {len(exact_ms)} queries): p50 {exact_p50:.0f} ms, "
          f"p99 {exact_p99:.0f} ms. Embedding one new query (a one-row DoExchange), which a "
          f"search of an uncached text adds: p50 {np.percentile(embed_ms, 50):.1f} ms. PCA to 128 dimensions (`reduce`, two "
          f"passes): {reduced['seconds']:.0f} s, variance kept {reduced['variance_kept']:.3f}.\n")
    print("| graph | dims | rescore | search breadth (ef) | bytes/vector in memory (× smaller than f32) | index memory "
          "| build | recall@10 vs exact f32 | search p50 / p99 | × faster than exact (p50) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for quantization, projection, rescore, expansion, report, recall, p50, p99 in results:
        vb = report["vector_bytes"]
        print(f"| {quantization}{' + ' + projection if projection else ''} | {report['dimensions']} "
              f"| {rescore or '-'} | {expansion or max(DEFAULT_EXPANSION, rescore)} | {vb} ({4 * d / vb:.0f}×) | {report['memory_bytes'] / 2**20:.0f} MiB "
              f"| {report['build_seconds']:.0f} s | {recall:.3f} | {p50:.1f} / {p99:.1f} ms "
              f"| {exact_p50 / p50:.0f}× |")


if __name__ == "__main__":
    main()
