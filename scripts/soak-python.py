"""The Python stack on the soak's mixed workload, for contrast with `keel soak`.

sentence-transformers (PyTorch, CPU) encodes batches of the same rows Keel's first soak
producer sends (the same generator: 70 % repeat, 20 % Zipf(1.1), 10 % unique over the
sample VCF's texts, xorshift seed 0x5eed), every row, as a Python embedding service
without a cache would. Samples RSS every few batches and prints throughput and memory
growth; writes a CSV.

usage: soak-python.py MODEL_DIR TEXTS_FILE [--seconds N] [--batch-rows 100] [--csv OUT]
(TEXTS_FILE: one text per line, e.g. `keel texts data/test-haploidX.vcf > texts.txt`)
"""
import argparse
import bisect
import csv
import gc
import time

import psutil
from sentence_transformers import SentenceTransformer

MASK = (1 << 64) - 1


class Generator:
    """crates/client/src/soak/workload.rs, line for line."""

    def __init__(self, base, seed):
        self.base = base
        weights = [1.0 / (r ** 1.1) for r in range(1, len(base) + 1)]
        total = sum(weights)
        acc, self.cdf = 0.0, []
        for w in weights:
            acc += w / total
            self.cdf.append(acc)
        self.counter = 0
        self.state = seed | 1

    def random(self):
        s = self.state
        s ^= (s << 13) & MASK
        s ^= s >> 7
        s ^= (s << 17) & MASK
        self.state = s
        return (s >> 11) / float(1 << 53)

    def repeat(self):
        self.counter += 1
        return self.base[self.counter % len(self.base)]

    def unique(self):
        self.counter += 1
        return f"{self.base[self.counter % len(self.base)]} #{self.counter}"

    def zipf(self):
        u = self.random()
        return self.base[min(bisect.bisect_left(self.cdf, u), len(self.base) - 1)]

    def mixed(self, rows):
        out = []
        for _ in range(rows):
            u = self.random()
            out.append(self.repeat() if u < 0.7 else self.zipf() if u < 0.9 else self.unique())
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("texts")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--batch-rows", type=int, default=100)
    ap.add_argument("--csv", default="reports/python-mixed.csv")
    a = ap.parse_args()
    base = [l.rstrip("\n") for l in open(a.texts) if l.strip()]
    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / 1e6
    model = SentenceTransformer(a.model_dir, device="cpu")
    gen = Generator(base, 0x5EED)
    model.encode(gen.mixed(64), batch_size=64)  # warm-up
    print(f"model loaded, rss {rss():.1f} MB, {len(base)} base texts", flush=True)
    samples = []
    rows, batches, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < a.seconds:
        model.encode(gen.mixed(a.batch_rows), batch_size=64, normalize_embeddings=True)
        rows += a.batch_rows
        batches += 1
        if batches % 10 == 0:
            samples.append((time.perf_counter() - start, batches, rows, rss()))
    elapsed = time.perf_counter() - start
    gc.collect()
    with open(a.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "batches", "rows", "rss_mb"])
        w.writerows(samples)
    # Growth after a warm-up of a fifth of the run: least-squares slope of RSS on rows.
    post = samples[len(samples) // 5:]
    n = len(post)
    if n >= 3:
        mx = sum(s[2] for s in post) / n
        my = sum(s[3] for s in post) / n
        sxx = sum((s[2] - mx) ** 2 for s in post)
        slope = sum((s[2] - mx) * (s[3] - my) for s in post) / sxx if sxx else 0.0
    else:
        slope = float("nan")
    print(f"{rows} rows in {elapsed:.0f} s: {rows / elapsed:.1f} rows/s")
    print(f"RSS: after warm-up {samples[0][3]:.1f} MB, peak {max(s[3] for s in samples):.1f} MB, "
          f"end {samples[-1][3]:.1f} MB; slope after the first fifth "
          f"{slope * 25_000:.3f} MB per 1000 ops of 25 rows")


if __name__ == "__main__":
    main()
