"""The shared cache's figures, on one machine: Keel replicas and a redis-server on loopback.

    .cache/venv/bin/python scripts/bench-fleet.py target/release/keel [--rows 3000] [--rounds 3]

(the venv of scripts/test.sh, with `pip install ./python`). Measures, in one run:
- replica A, cold: rows/s through the model (every text new), and A again: rows/s from
  its own first-level cache;
- replica B (fresh, same Redis), the same rows: rows/s from the second level, against A's
  own cache-hit speed; then B again on other rows A wrote (a replica whose memory is
  already in use); what the second level adds per micro-batch; the Redis lookup of one
  small stream alone and of the slices of a large one (mean and longest);
- Redis killed: replica B on new texts, against replica N with no cache at all (the
  no-cache speed); Redis restarted: how long until B's lookups succeed again.
Prints a Markdown table; every figure names the run it came from.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
from keel_client import KeelClient  # noqa: E402
from keel_client.local import LocalKeel, free_port, start_redis  # noqa: E402


def start_keel(binary, workdir, name, redis_url=None, cache_bytes=None):
    env = {"KEEL_EMBEDDER__MODEL_DIR": os.path.join(ROOT, "models/all-MiniLM-L6-v2"),
           "KEEL_METRICS__ENABLED": "false", "RUST_LOG": "warn"}
    if redis_url:
        env["KEEL_CACHE__SHARED__URL"] = redis_url
    if cache_bytes is not None:
        env["KEEL_CACHE__MAX_BYTES"] = str(cache_bytes)
    keel = LocalKeel(binary, config=os.path.join(ROOT, "configs/default.yaml"),
                     data_dir=os.path.join(workdir, name), env=env, timeout=120)
    return keel.proc, KeelClient(keel.address, timeout=600)


def texts(tag, n):
    base = subprocess.run([BINARY, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    return [f"{base[i % len(base)]} [{tag} {i}]" for i in range(n)]


def redis_call(port, *args):
    """One command over a raw socket (no client library): the raw reply bytes."""
    import socket
    req = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a), a) for a in (x if isinstance(x, bytes) else str(x).encode()
                                                  for x in args))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(req)
        buf = b""
        while True:
            chunk = s.recv(1 << 22)
            buf += chunk
            if not chunk or buf.endswith(b"\r\n") and _complete(buf):
                return buf


def _complete(buf):
    """Whether a RESP reply (a bulk string, an integer, a status, or an array of bulk
    strings) is whole."""
    if buf[:1] != b"*":
        return True
    n, pos = int(buf[1:buf.index(b"\r\n")]), buf.index(b"\r\n") + 2
    for _ in range(n):
        if pos >= len(buf):
            return False
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(buf[pos + 1:end])
        pos = end + 2 + (size + 2 if size >= 0 else 0)
    return pos <= len(buf)


def command_stats(port):
    """usec_per_call of each command since the last CONFIG RESETSTAT."""
    out = {}
    for line in redis_call(port, "INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[8:].split(":", 1)
            out[name] = float(dict(f.split("=") for f in fields.split(","))["usec_per_call"])
    return out


def bare_mget_ms(port, prefix, n=1000):
    """One MGET of the n first vectors Keel wrote, over a raw socket: Redis and the
    loopback alone, no Keel. The median of five."""
    # The reply is "*N", then "$LEN", KEY for each key.
    keys = [k.split(b"\r\n")[1] for k in redis_call(port, "KEYS", prefix + "*").split(b"$")[1:]]
    keys = [k for k in keys if b"lease" not in k][:n]
    assert len(keys) == n and all(len(k) == len(prefix) + 32 for k in keys), keys[:3]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        redis_call(port, "MGET", *keys)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), len(keys)


def rate(client, rows):
    table = pa.table({"text": rows})
    started = time.perf_counter()
    out = client.embed(table)
    elapsed = time.perf_counter() - started
    assert out.num_rows == len(rows)
    return len(rows) / elapsed


def main():
    global BINARY
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target/release/keel"))
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    BINARY = args.binary
    work = tempfile.mkdtemp(prefix="keel-bench-fleet-")
    rport = free_port()
    redis, url = start_redis(work, rport)
    procs = []
    results = {"cold": [], "own": [], "shared": [], "lookup_ms": [], "lookup_max_ms": [],
               "alone_ms": [], "added_ms": [], "shared_warm": [], "down": [], "nocache": []}
    try:
        for r in range(args.rounds):
            a_proc, a = start_keel(BINARY, work, f"a{r}", url)
            b_proc, b = start_keel(BINARY, work, f"b{r}", url)
            n_proc, n = start_keel(BINARY, work, f"n{r}", None, cache_bytes=0)
            procs += [a_proc, b_proc, n_proc]
            rows = texts(f"round{r}", args.rows)
            alone = texts(f"alone{r}", 250)
            second = texts(f"second{r}", args.rows)
            results["cold"].append(rate(a, rows))
            a.embed(pa.table({"text": alone}))
            a.embed(pa.table({"text": second}))
            own = statistics.median(rate(a, rows) for _ in range(3))
            results["own"].append(own)
            # Wait for A's write-back to land before B reads.
            deadline = time.time() + 30
            while (a.stats()["cache"]["shared"]["writes"] < 2 * args.rows + len(alone)
                   and time.time() < deadline):
                time.sleep(0.05)
            redis_call(rport, "CONFIG", "RESETSTAT")
            shared = rate(b, rows)
            results["shared"].append(shared)
            cs = command_stats(rport)
            results.setdefault("mget_us", []).append(cs.get("mget", 0.0))
            ms, nkeys = bare_mget_ms(rport, "keel:v1:")
            results.setdefault("bare_ms", []).append(ms)
            sb = b.stats()
            sh = sb["cache"]["shared"]
            assert sb["embedded_rows"] == 0, sb
            results["lookup_ms"].append(sh["lookup_micros_total"] / max(sh["lookups"], 1) / 1000)
            results["lookup_max_ms"].append(sh["lookup_micros_max"] / 1000)
            # What the second level adds per micro-batch (25 rows): B's time less A's.
            micro = b.stats()["ops"]
            results["added_ms"].append((args.rows / shared - args.rows / own) * 1000 / micro)
            # B again on other rows from Redis: a replica that has run a while (its memory
            # already mapped; a fresh process pays page faults for what it first stores).
            results["shared_warm"].append(rate(b, second))
            s1 = b.stats()["cache"]["shared"]
            # One small stream alone (25 rows, one lookup): ten, one after the other.
            for i in range(0, len(alone), 25):
                b.embed(pa.table({"text": alone[i:i + 25]}))
            s2 = b.stats()["cache"]["shared"]
            assert s2["hits"] - s1["hits"] == len(alone), s2
            results["alone_ms"].append((s2["lookup_micros_total"] - s1["lookup_micros_total"])
                                       / (s2["lookups"] - s1["lookups"]) / 1000)
            # Redis away: B on new texts, against no cache at all (same texts, N first).
            fresh = texts(f"down{r}", args.rows // 2)
            results["nocache"].append(rate(n, fresh))
            redis.kill()
            redis.wait()
            results["down"].append(rate(b, fresh))
            redis, _ = start_redis(work, rport)
            started = time.time()
            probe = 0
            while True:
                b.embed(pa.table({"text": [f"probe {r} {probe}"]}))
                probe += 1
                s = b.stats()["cache"]["shared"]
                if not s["breaker_open"] and s["misses"] + s["hits"] > sh["misses"] + sh["hits"] + 1:
                    break
                time.sleep(0.1)
            results.setdefault("recovered_s", []).append(time.time() - started)
            for p in (a_proc, b_proc, n_proc):
                p.terminate()
                p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        redis.kill()

    def fmt(xs, unit=""):
        return f"{statistics.median(xs):,.0f}{unit} ({min(xs):,.0f}–{max(xs):,.0f})"

    own, shared = statistics.median(results["own"]), statistics.median(results["shared"])
    down, nocache = statistics.median(results["down"]), statistics.median(results["nocache"])
    print(f"\nMachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"{args.rounds} rounds of {args.rows} rows; median (min–max)\n")
    print("| figure | value |\n|---|---|")
    print(f"| replica A, cold (every text through the model) | {fmt(results['cold'], ' rows/s')} |")
    print(f"| replica A again (its own first-level hits) | {fmt(results['own'], ' rows/s')} |")
    print(f"| replica B, same rows (second-level hits from Redis) | {fmt(results['shared'], ' rows/s')} |")
    print(f"| B's speed / A's own cache-hit speed | {shared / own:.2f} |")
    warm = statistics.median(results["shared_warm"])
    print(f"| replica B again, other rows (second-level hits, B's memory already in use) | "
          f"{fmt(results['shared_warm'], ' rows/s')} |")
    print(f"| that / A's own cache-hit speed | {warm / own:.2f} |")
    print(f"| time the second level adds per micro-batch (B's time less A's, per micro-batch) | "
          f"{statistics.median(results['added_ms']):.3f} ms |")
    print(f"| Redis lookup of a 25-row stream alone (one MGET of 25 keys), mean | "
          f"{statistics.median(results['alone_ms']):.3f} ms |")
    print(f"| Redis lookup per slice of a {args.rows}-row stream (MGET of up to 1 024 keys, "
          f"slices concurrent), mean | {statistics.median(results['lookup_ms']):.3f} ms |")
    print(f"| Redis lookup, longest | {max(results['lookup_max_ms']):.1f} ms |")
    print(f"| Redis's own time per MGET during B's pass (INFO commandstats) | "
          f"{statistics.median(results['mget_us']):.0f} µs |")
    print(f"| a bare MGET of 1 000 stored vectors over a raw socket (Redis and loopback, "
          f"no Keel; median of 5) | {statistics.median(results['bare_ms']):.2f} ms |")
    print(f"| no cache at all, new texts | {fmt(results['nocache'], ' rows/s')} |")
    print(f"| replica B with Redis killed, new texts | {fmt(results['down'], ' rows/s')} |")
    print(f"| Redis down / no cache | {down / nocache:.2f} |")
    print(f"| Redis restarted → B's lookups answered again | "
          f"{statistics.median(results['recovered_s']):.1f} s |")


if __name__ == "__main__":
    main()
