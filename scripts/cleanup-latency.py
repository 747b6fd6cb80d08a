"""Cleanup latency of a running engine: broadcast to last ack (allocator purge included).

usage: .cache/venv/bin/python scripts/cleanup-latency.py [--n 50]
Starts the release binary, streams the sample's variant texts to fill the cache, then asks
for N gentle and N full cleanups (the `cleanup` action) and prints p50 / p99 / max of the
total and of each actor.
"""
import argparse, json, os, socket, subprocess, threading, time

import pyarrow as pa
import pyarrow.flight as flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target/release/keel")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = dict(os.environ, KEEL_SERVER__LISTEN=f"127.0.0.1:{port}", KEEL_METRICS__ENABLED="false",
               KEEL_HTTP__ENABLED="false",
               KEEL_SUPERVISOR__ACT="false")
    proc = subprocess.Popen([KEEL, "serve", "--config", os.path.join(ROOT, "configs/default.yaml")],
                            env=env, stderr=subprocess.DEVNULL)
    client = flight.connect(f"grpc://127.0.0.1:{port}")
    try:
        for _ in range(300):
            try:
                list(client.do_action(flight.Action("health", b""))); break
            except flight.FlightUnavailableError:
                time.sleep(0.1)
        texts = subprocess.run([KEEL, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"))
        t = threading.Thread(target=lambda: [None for _ in reader]); t.start()
        table = pa.table({"text": texts})
        writer.begin(table.schema); writer.write_table(table); writer.done_writing(); t.join(); writer.close()
        for level in ["gentle", "full"]:
            totals, per_actor = [], {}
            for _ in range(args.n):
                body = json.dumps({"level": level}).encode()
                rec = json.loads(next(iter(client.do_action(flight.Action("cleanup", body)))).body.to_pybytes())
                totals.append(rec["total_micros"])
                for a in rec["acks"]:
                    per_actor.setdefault(a["actor"], []).append(a["duration"])
            def q(xs, p):
                xs = sorted(xs); return xs[min(len(xs) - 1, int(p * len(xs)))]
            print(f"{level}: n={args.n} total p50 {q(totals, .5)} µs, p99 {q(totals, .99)} µs, max {max(totals)} µs; "
                  + ", ".join(f"{k} p99 {q(v, .99)} µs" for k, v in sorted(per_actor.items())))
    finally:
        proc.terminate(); proc.wait()


if __name__ == "__main__":
    main()
