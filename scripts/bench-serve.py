"""Throughput of `keel serve` through DoExchange from pyarrow, against `keel embed`.

usage: .cache/venv/bin/python scripts/bench-serve.py [--rows N]
Starts the release binary on a free port, then measures:
  cached:  the sample's variant texts repeated to N rows (cache warmed first), rows/s;
  unique:  the variant texts made distinct (4 copies) with the cache disabled, rows/s — and `keel embed`
           on the same texts in the same run, for the ratio.
"""
import argparse, os, subprocess, sys, threading, time

import pyarrow as pa
import pyarrow.flight as flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target/release/keel")
sys.path.insert(0, os.path.join(ROOT, "python"))
from keel_client.local import LocalKeel  # noqa: E402


def serve(extra_env):
    keel = LocalKeel(KEEL, config=os.path.join(ROOT, "configs/default.yaml"),
                     env=extra_env, stderr=subprocess.DEVNULL)
    return keel.proc, flight.connect(keel.address)


def exchange(client, table, chunk):
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"),
                                        options=flight.FlightCallOptions(timeout=600))
    rows = [0]

    def read():
        for c in reader:
            rows[0] += c.data.num_rows

    t = threading.Thread(target=read)
    t.start()
    writer.begin(table.schema)
    for b in table.to_batches(max_chunksize=chunk):
        writer.write_batch(b)
    writer.done_writing()
    t.join()
    writer.close()
    return rows[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--unique-copies", type=int, default=4,
                    help="the unique run embeds each text this many times, made distinct")
    args = ap.parse_args()
    texts = subprocess.run([KEEL, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    print(f"machine: {os.cpu_count()} cores; texts: {len(texts)} variant records")

    proc, client = serve({})
    try:
        base = pa.table({"text": texts})
        exchange(client, base, args.chunk)  # warm the cache
        reps = max(1, args.rows // len(texts))
        table = pa.concat_tables([base] * reps).combine_chunks()
        t = time.perf_counter()
        n = exchange(client, table, args.chunk)
        dt = time.perf_counter() - t
        print(f"cached: {n} rows in {dt:.2f} s = {n / dt:,.0f} rows/s (batches of {args.chunk})")
    finally:
        proc.terminate(); proc.wait()

    unique = [f"{t} copy {k}" for k in range(args.unique_copies) for t in texts]
    proc, client = serve({"KEEL_CACHE__MAX_BYTES": "0"})
    try:
        table = pa.table({"text": unique})
        t = time.perf_counter()
        n = exchange(client, table, 256)
        dt = time.perf_counter() - t
        print(f"unique (keel serve, cache off): {n} rows in {dt:.2f} s = {n / dt:,.0f} rows/s")
    finally:
        proc.terminate(); proc.wait()
    out = subprocess.run([KEEL, "embed"], input="\n".join(unique) + "\n", capture_output=True, text=True)
    print("unique (keel embed, same texts): " + out.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
