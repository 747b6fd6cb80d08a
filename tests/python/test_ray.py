"""Keel fleets driven by Ray Data: a local Ray cluster of three nodes on this machine
(ray.cluster_utils.Cluster), one `keel serve` per node sharing one redis-server, and a
Parquet file of variant texts with repeats through `Dataset.map_batches(KeelEmbedder)`.
Ray from PyPI in the test venv.

Checks: every row comes back once, in a Parquet output, with `keel embed`'s vector for
its text; the fleet embedded each distinct text once (the replicas' embedded rows add up
to the distinct texts: the shared cache's leases); and with one Keel killed mid-run the
pipeline still completes with every row once and the right vectors.
"""
import json
import os
import random
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import MODEL_DIR, ROOT
from keel_client import KeelClient


def reference(binary, texts):
    """`keel embed`'s vector for each text."""
    out = subprocess.run([binary, "embed", "--config", os.path.join(ROOT, "configs/default.yaml"),
                          "--model", MODEL_DIR],
                         input="\n".join(texts) + "\n", capture_output=True, text=True, check=True,
                         env=dict(os.environ, RUST_LOG="warn"))
    lines = out.stdout.splitlines()
    assert len(lines) == len(texts), (len(lines), len(texts))
    return {t: np.asarray(json.loads(l)["embedding"], dtype=np.float32) for t, l in zip(texts, lines)}


def dataset(binary, tag, distinct, rows, seed):
    """`rows` variant texts over `distinct` distinct ones (the sample VCF's, tagged)."""
    base = subprocess.run([binary, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    texts = [f"{base[i % len(base)]} [{tag} {i}]" for i in range(distinct)]
    rng = random.Random(seed)
    # Every distinct text at least once, the rest repeats drawn with a skew.
    picks = list(range(distinct)) + [min(int(rng.paretovariate(1.2)) - 1, distinct - 1)
                                     if rng.random() < 0.5 else rng.randrange(distinct)
                                     for _ in range(rows - distinct)]
    rng.shuffle(picks)
    return pa.table({"id": list(range(rows)), "text": [texts[p] for p in picks]}), texts


def min_cosine(binary, out, vecs, texts):
    """The least cosine between each output row's vector and `keel embed`'s for its text."""
    ref = reference(binary, texts)
    want = np.stack([ref[t] for t in out.column("text").to_pylist()])
    cos = np.sum(vecs * want, axis=1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(want, axis=1))
    return float(cos.min())


def read_output(path):
    out = pq.read_table(path).sort_by("id")
    vecs = np.asarray(out.column("embedding").to_pylist(), dtype=np.float32)
    return out, vecs


def embedded(addresses):
    return {a: KeelClient(a, timeout=30).stats()["embedded_rows"] for a in addresses}


def run_pipeline(ray, src, dst, node_addresses):
    from keel_client.ray import KeelEmbedder

    # Blocks of a few hundred rows, so that every node's actor gets some.
    ds = ray.data.read_parquet(src).repartition(24)
    ds = ds.map_batches(KeelEmbedder, batch_format="pyarrow", batch_size=250,
                        fn_constructor_kwargs={"addresses": node_addresses, "timeout": 300},
                        compute=ray.data.ActorPoolStrategy(size=3),
                        # One actor per node: each node offers one "keel" slot.
                        num_cpus=0, resources={"keel": 1})
    ds.write_parquet(dst)


@pytest.fixture(scope="module")
def fleet(start_keel, redis_url, tmp_path_factory):
    """Three Keels sharing one redis-server, and a 3-node Ray cluster, one Keel per node."""
    import ray
    from ray.cluster_utils import Cluster

    env = {"KEEL_CACHE__SHARED__URL": redis_url, "RUST_LOG": "warn",
           # A loaded 2-core machine runs Ray, three Keels and Redis: a slow lookup must
           # stay a lookup (a timeout would embed the text again, and be counted).
           "KEEL_CACHE__SHARED__TIMEOUT_MS": "5000",
           # Each Keel is one replica of a fleet on a shared machine: one model each.
           "KEEL_EMBEDDER__CPU__WORKERS": "1"}
    keels = [start_keel(env=env) for _ in range(3)]
    node_args = {"num_cpus": 2, "resources": {"keel": 1}, "object_store_memory": 256 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, include_dashboard=False))
    try:
        for _ in range(2):
            cluster.add_node(**node_args)
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(nodes) == 3, nodes
        yield ray, keels, dict(zip(nodes, (k.address for k in keels))), tmp_path_factory.mktemp("ray")
    finally:
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()


def test_every_row_once_with_keel_embeds_vector_and_each_text_embedded_once(fleet, keel_binary):
    ray, keels, node_addresses, work = fleet
    table, texts = dataset(keel_binary, "ray", distinct=1500, rows=6000, seed=1)
    src = str(work / "variants.parquet")
    pq.write_table(table, src)
    started = time.time()
    run_pipeline(ray, src, str(work / "out1"), node_addresses)
    elapsed = time.time() - started
    out, vecs = read_output(str(work / "out1"))
    assert out.column("id").to_pylist() == list(range(6000)), out.num_rows
    worst = min_cosine(keel_binary, out, vecs, texts)
    assert worst >= 0.99999, f"min cosine {worst:.7f}"
    counts = embedded([k.address for k in keels])
    assert sum(counts.values()) == len(texts), f"{counts} for {len(texts)} distinct"
    assert all(v > 0 for v in counts.values()), counts
    print(f"6000 rows ({len(texts)} distinct) in {elapsed:.1f} s; embedded per replica: "
          f"{list(counts.values())}")


def test_a_keel_killed_mid_run_loses_no_row(fleet, keel_binary):
    ray, keels, node_addresses, work = fleet
    table, texts = dataset(keel_binary, "kill", distinct=3000, rows=6000, seed=2)
    src = str(work / "variants2.parquet")
    pq.write_table(table, src)
    victim = keels[2]
    killed, done = threading.Event(), threading.Event()

    def killer():
        # As soon as the victim has embedded rows of this run, and before the end.
        base = KeelClient(victim.address, timeout=10).stats()["embedded_rows"]
        while not done.is_set():
            try:
                if KeelClient(victim.address, timeout=10).stats()["embedded_rows"] > base:
                    victim.proc.kill()
                    killed.set()
                    return
            except Exception:  # noqa: BLE001 - stats may fail under load; ask again
                pass
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    try:
        run_pipeline(ray, src, str(work / "out2"), node_addresses)
    finally:
        done.set()
        t.join()
    assert killed.is_set(), "one Keel was killed while the pipeline ran"
    out, vecs = read_output(str(work / "out2"))
    assert out.column("id").to_pylist() == list(range(6000)), out.num_rows
    worst = min_cosine(keel_binary, out, vecs, texts)
    assert worst >= 0.99999, f"min cosine {worst:.7f}"
