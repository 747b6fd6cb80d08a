"""Compact vectors: what each precision (and fewer dimensions) keeps, measured through a
real `keel serve`.

    .cache/venv/bin/python scripts/bench-compact.py target/release/keel [--rows 20000] [--queries 200]

(the venv of scripts/test.sh, with `pip install ./python`). Texts are the sample VCF's
annotation fields recombined (genes, positions, alleles, consequences and predictions
drawn apart and put together again), so no two rows are the same record. One run:
- the same rows embedded in f32 and in each format (DoExchange): min and mean cosine of
  each format's vectors, read back as f32, to the f32 ones;
- a dataset of the rows stored in each format (DoPut): bytes per vector (FlightInfo),
  and, for held-out query texts, recall@10 of the `search` action on that dataset
  against the f32 dataset's top 10, and the search's latency (p50, p99; an exact scan).
Prints a Markdown table with the machine and the arguments.
"""
import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from keel_client.local import LocalKeel  # noqa: E402


def start_server(binary, data_dir):
    """`keel serve` with configs/default.yaml on a free port."""
    keel = LocalKeel(binary, config=os.path.join(ROOT, "configs/default.yaml"), data_dir=data_dir,
                     env={"KEEL_EMBEDDER__MODEL_DIR": os.path.join(ROOT, "models/all-MiniLM-L6-v2"),
                          "KEEL_STORAGE__FLUSH_ROWS": "100"}, timeout=60)
    return keel.proc, flight.connect(keel.address), keel.port

FORMATS = [("f32", None), ("f16", None), ("int8", None), ("binary", None), ("int8", 128),
           ("f32", 128)]


def recombined(binary, n, seed):
    lines = subprocess.run([binary, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    fields = [l.split(" ") for l in lines]
    genes = sorted({f[0] for f in fields})
    alleles = sorted({f[2] for f in fields if ">" in f[2]})
    consequences = sorted({f[3] for f in fields if len(f) > 3})
    tails = sorted({" ".join(f[4:]) for f in fields if len(f) > 4})
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        pos = rng.randrange(1_000_000, 155_000_000)
        tail = rng.choice(tails) if rng.random() < 0.5 else ""
        out.add(f"{rng.choice(genes)} chrX:{pos} {rng.choice(alleles)} "
                f"{rng.choice(consequences)} {tail}".strip())
    return sorted(out)


def vectors(table):
    meta = table.schema.field("embedding").metadata
    d = int(meta[b"keel.dimensions"])
    precision = meta[b"keel.precision"].decode()
    emb = table.column("embedding").combine_chunks()
    if precision == "binary":
        bits = np.frombuffer(emb.buffers()[1], np.uint8).reshape(len(emb), -1)
        return np.unpackbits(bits, axis=1)[:, :d].astype(np.float32) * 2 - 1
    v = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), d).astype(np.float32)
    if precision == "int8":
        v = v * table.column("embedding_scale").to_numpy()[:, None]
    return v


def exchange(client, texts, cmd):
    desc = flight.FlightDescriptor.for_path("embed", json.dumps(cmd))
    writer, reader = client.do_exchange(desc)
    table = pa.table({"text": texts})
    out = []
    import threading
    t = threading.Thread(target=lambda: out.extend(c.data for c in reader))
    t.start()
    writer.begin(table.schema)
    writer.write_table(table, max_chunksize=4096)
    writer.done_writing()
    t.join()
    writer.close()
    return pa.Table.from_batches(out)


def put(client, name, texts, cmd):
    table = pa.table({"text": texts})
    desc = flight.FlightDescriptor.for_path("datasets", name, json.dumps(cmd))
    writer, reader = client.do_put(desc, table.schema)
    writer.write_table(table, max_chunksize=4096)
    writer.done_writing()
    while reader.read() is not None:
        pass
    writer.close()


def search(client, name, text, k=10):
    body = json.dumps({"dataset": name, "text": text, "k": k}).encode()
    t = time.perf_counter()
    r = json.loads(next(client.do_action(flight.Action("search", body))).body.to_pybytes())
    return [x["row"] for x in r["results"]], time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target/release/keel"))
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    all_texts = recombined(args.binary, args.rows + args.queries, seed=7)
    rng = random.Random(11)
    rng.shuffle(all_texts)
    queries, rows = all_texts[:args.queries], all_texts[args.queries:]
    work = tempfile.mkdtemp(prefix="keel-bench-compact-")
    os.environ["KEEL_METRICS__ENABLED"] = "false"
    os.environ["KEEL_CACHE__MAX_BYTES"] = str(512 << 20)  # every row's f32 vector stays cached
    proc, client, _ = start_server(args.binary, os.path.join(work, "data"))
    results = []
    try:
        started = time.time()
        full = vectors(exchange(client, rows, {}))
        embed_s = time.time() - started
        name = lambda p, d: f"{p}-{d or 'full'}"  # noqa: E731
        for precision, dims in FORMATS:
            cmd = {"precision": precision} | ({"dimensions": dims} if dims else {})
            put(client, name(precision, dims), rows, cmd)
        truth = {q: search(client, name("f32", None), q)[0] for q in queries}
        for precision, dims in FORMATS:
            cmd = {"precision": precision} | ({"dimensions": dims} if dims else {})
            got = vectors(exchange(client, rows[:2000], cmd))
            ref = full[:2000, :got.shape[1]]
            cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
            info = client.get_flight_info(flight.FlightDescriptor.for_path("datasets", name(precision, dims)))
            meta = json.loads(info.app_metadata)
            recalls, times = [], []
            for q in queries:
                found, secs = search(client, name(precision, dims), q)
                recalls.append(len(set(found) & set(truth[q])) / 10)
                times.append(secs * 1000)
            results.append((precision, dims or full.shape[1], meta["vector_bytes_per_row"],
                             float(cos.min()), float(cos.mean()), float(np.mean(recalls)),
                             float(np.percentile(times, 50)), float(np.percentile(times, 99))))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"\nMachine: {os.cpu_count()} cores, {platform.machine()}; {len(rows)} rows, "
          f"{len(queries)} held-out queries; f32 embedding of the rows took {embed_s:.0f} s\n")
    print("| precision | dims | bytes/vector | × smaller | cosine to f32 (min / mean, 2 000 rows) "
          "| recall@10 vs f32 search | search p50 / p99 (exact scan) |")
    print("|---|---|---|---|---|---|---|")
    base = results[0][2]
    for p, d, b, cmin, cmean, rec, p50, p99 in results:
        cut = " (vs the first dims of f32)" if d != full.shape[1] else ""
        print(f"| {p} | {d} | {b} | {base / b:.1f} | {cmin:.4f} / {cmean:.4f}{cut} | {rec:.3f} "
              f"| {p50:.0f} / {p99:.0f} ms |")


if __name__ == "__main__":
    main()
