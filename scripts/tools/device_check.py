"""The GPU check: parity, throughput and device memory of Keel on this machine's GPU, beside
sentence-transformers on the same GPU in the same run; then the host's CPUs: the kernel
tests (AMX where the host has it), every CPU precision against the float64 reference and
beside ONNX Runtime, OpenVINO and sentence-transformers on all cores. Run through
scripts/device-check.sh.

usage: device_check.py BUNDLE OUT [--dry-run]
  BUNDLE  a folder made by scripts/device-bundle.sh: keel (or keel.xz), model/ (MiniLM
          with f16 weights), texts.txt (variant texts), reference.jsonl (20 texts with
          their float64 vectors).
  OUT     where report.md and report.json go.
  --dry-run  a few texts and one pass size, a software GPU adapter allowed: proves the
          script end to end on a machine without a GPU (Mesa's lavapipe).

Standard library only; sentence-transformers and pyarrow are used when importable.
"""
import json, lzma, math, os, re, shutil, socket, subprocess, sys, tempfile, time

args = [a for a in sys.argv[1:] if not a.startswith("--")]
DRY = "--dry-run" in sys.argv
if len(args) != 2:
    sys.exit(__doc__)
BUNDLE, OUT = (os.path.abspath(a) for a in args)
os.makedirs(OUT, exist_ok=True)
WORK = tempfile.mkdtemp(prefix="keel-device-check-")
MODEL = os.path.join(BUNDLE, "model")
LOG = open(os.path.join(OUT, "log.txt"), "w")
report = {"dry_run": DRY, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def log(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def keel_binary():
    plain = os.path.join(BUNDLE, "keel")
    if os.path.exists(plain):
        return plain
    packed = os.path.join(BUNDLE, "keel.xz")
    out = os.path.join(WORK, "keel")
    with lzma.open(packed) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(out, 0o755)
    return out


KEEL = keel_binary()
# Every run: the bundle's model; on a dry run, a software adapter is accepted.
BASE_ENV = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
BASE_ENV["KEEL_EMBEDDER__MODEL_DIR"] = MODEL
if DRY:
    # A software adapter runs kernels at under 1 GFLOP/s: small passes, few warm-up shapes.
    BASE_ENV["KEEL_EMBEDDER__GPU__ALLOW_SOFTWARE"] = "true"
    BASE_ENV["KEEL_EMBEDDER__GPU__MAX_BATCH_ROWS"] = "4"
    BASE_ENV["KEEL_EMBEDDER__GPU__MAX_BATCH_TOKENS"] = "64"

texts_all = [l.rstrip("\n") for l in open(os.path.join(BUNDLE, "texts.txt")) if l.strip()]
reference = [json.loads(l) for l in open(os.path.join(BUNDLE, "reference.jsonl"))]
N = 24 if DRY else min(len(texts_all), 16000)
texts = (texts_all * (N // max(len(texts_all), 1) + 1))[:N]
texts_file = os.path.join(WORK, "texts.txt")
with open(texts_file, "w") as f:
    f.write("\n".join(texts) + "\n")
ref_file = os.path.join(WORK, "reference.txt")
with open(ref_file, "w") as f:
    f.write("\n".join(r["text"] for r in reference) + "\n")
BATCHES = [4] if DRY else [64, 256, 1024]
PRECISIONS = ["f32"] if DRY else ["f32", "f16"]
report["texts"] = N


def run(cmd, env=None, stdin=None, timeout=900):
    log("$", " ".join(cmd))
    p = subprocess.run(cmd, env=env or BASE_ENV, stdin=stdin, capture_output=True, timeout=timeout)
    err = p.stderr.decode(errors="replace")
    LOG.write(err)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:2]} failed ({p.returncode}): {err[-2000:]}")
    return p.stdout, err


def embed(path, backend, batch=None, precision="f32", fusion=True):
    cmd = [KEEL, "embed", "--backend", backend, "--precision", precision]
    env = dict(BASE_ENV)
    # Kernel fusion is one setting per process: off, every operation is its own kernel.
    env["KEEL_EMBEDDER__GPU__FUSION"] = "true" if fusion else "false"
    if DRY:
        # Each keel embed is a new process that would warm up anew; keel serve's warm-up
        # below is the one a dry run exercises.
        env["KEEL_EMBEDDER__GPU__WARM_UP"] = "false"
    if batch:
        cmd += ["--batch", str(batch)]
        if not DRY:
            cmd += ["--gpu-batch-tokens", str(max(batch * 64, 4096))]
    with open(path, "rb") as f:
        out, err = run(cmd, env=env, stdin=f)
    vectors = [json.loads(l)["embedding"] for l in out.decode().splitlines()]
    # texts/s from the count and the seconds: the printed rate is rounded to a whole
    # number, 0 for a first pass that compiles its kernels on a loaded software adapter.
    m = re.search(r"(\d+) texts in ([\d.]+) s \([\d.]+ texts/s; start-up ([\d.]+) s", err)
    mem = re.search(r"device memory (\d+) MB in use, (\d+) MB reserved", err)
    return vectors, {
        "texts_per_s": round(int(m.group(1)) / max(float(m.group(2)), 1e-3), 3) if m else None,
        "startup_s": float(m.group(3)) if m else None,
        "device_mb_in_use": int(mem.group(1)) if mem else None,
        "device_mb_reserved": int(mem.group(2)) if mem else None,
    }


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def compare(got, want):
    return {
        "max_abs_diff": max(max(abs(x - y) for x, y in zip(g, w)) for g, w in zip(got, want)),
        "min_cosine": min(cosine(g, w) for g, w in zip(got, want)),
    }


# 1. The machine.
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, timeout=30)
    report["gpu"] = smi.stdout.decode().strip() or None
except (OSError, subprocess.TimeoutExpired):
    report["gpu"] = None
report["cpu"] = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                      if l.startswith("model name")), "?")
report["cores"] = os.cpu_count()

# 2. Parity: the GPU against the CPU backend on the same (f16-stored) weights, and
# both against the float64 reference of the f32 weights.
cpu_ref, _ = embed(ref_file, "cpu")
f64 = [r["embedding"] for r in reference]
report["parity"] = {"cpu_vs_float64": compare(cpu_ref, f64)}
for precision in PRECISIONS:
    gpu_ref, info = embed(ref_file, "wgpu", precision=precision)
    report["parity"][f"wgpu_{precision}_vs_cpu"] = compare(gpu_ref, cpu_ref)
    report["parity"][f"wgpu_{precision}_vs_float64"] = compare(gpu_ref, f64)
    report.setdefault("startup_s", {})[precision] = info["startup_s"]
# burn's fusion has had wrong-result reports on Vulkan (burn #5257): both ways, compared.
gpu_ref, _ = embed(ref_file, "wgpu", fusion=False)
report["parity"]["wgpu_f32_no_fusion_vs_float64"] = compare(gpu_ref, f64)
log("parity", json.dumps(report["parity"]))

# 3. keel embed throughput (texts in, vectors out, tokenization included).
report["keel_embed"] = []
for precision in PRECISIONS:
    for batch in BATCHES:
        _, info = embed(texts_file, "wgpu", batch, precision)
        row = {"precision": precision, "batch": batch, **info}
        report["keel_embed"].append(row)
        log("keel embed", json.dumps(row))
# What fusion buys: f32 at the largest pass size without it.
_, info = embed(texts_file, "wgpu", BATCHES[-1], "f32", fusion=False)
row = {"precision": "f32", "batch": BATCHES[-1], "fusion": False, **info}
report["keel_embed"].append(row)
log("keel embed", json.dumps(row))
if not DRY:
    _, info = embed(texts_file, "cpu", 25)
    report["keel_embed_cpu"] = {"batch": 25, **info}

# 4. sentence-transformers on the same GPU, same texts, same run.
st = {"status": "not run"}
try:
    import torch
    from sentence_transformers import SentenceTransformer
    if not torch.cuda.is_available():
        st["status"] = "not run: torch sees no CUDA device"
    else:
        st = {"status": "ran", "device": torch.cuda.get_device_name(0), "runs": []}
        for precision in PRECISIONS:
            m = SentenceTransformer(MODEL, device="cuda")
            if precision == "f16":
                m = m.half()
            m.encode(texts[:512], batch_size=64)
            for batch in BATCHES:
                torch.cuda.synchronize()
                t = time.perf_counter()
                m.encode(texts, batch_size=batch, normalize_embeddings=True)
                torch.cuda.synchronize()
                st["runs"].append({"precision": precision, "batch": batch,
                                   "texts_per_s": N / (time.perf_counter() - t)})
                log("sentence-transformers", json.dumps(st["runs"][-1]))
            del m
            torch.cuda.empty_cache()
except ImportError as e:
    st["status"] = f"not run: {e}"
report["sentence_transformers"] = st


# 5. keel serve: warm-up, throughput through DoExchange (keel produce; pyarrow if present),
# device memory after warm-up, at peak, after a cleanup.
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def action(addr, name, body=""):
    out, _ = run([KEEL, "action", name, "--to", addr, "--body", body, "--wait", "600"])
    return json.loads(out)


port = free_port()
addr = f"grpc://127.0.0.1:{port}"
serve_env = dict(BASE_ENV, KEEL_SERVER__LISTEN=f"127.0.0.1:{port}", KEEL_EMBEDDER__BACKEND="wgpu",
                 KEEL_CACHE__MAX_BYTES="0", KEEL_STORAGE__DATA_DIR=os.path.join(WORK, "data"),
                 KEEL_METRICS__ENABLED="false", KEEL_HTTP__ENABLED="false")
if not DRY:
    serve_env["KEEL_EMBEDDER__GPU__MAX_BATCH_ROWS"] = "256"
server_log = open(os.path.join(OUT, "serve.log"), "w")
t0 = time.perf_counter()
server = subprocess.Popen([KEEL, "serve"], env=serve_env, stderr=server_log)
try:
    action(addr, "health")
    serve = {"ready_s": time.perf_counter() - t0}
    after_warm = action(addr, "stats")["embedder"]
    serve["warm_up_ms"] = after_warm.get("warm_up_ms")
    serve["device_memory_after_warm_up"] = after_warm.get("device_memory")
    _, err = run([KEEL, "produce", "--input", texts_file, "--to", addr, "--exchange",
                  "--rows-per-batch", "2048"], env=BASE_ENV)
    m = re.search(r"\(([\d.]+) rows/s\)", err)
    serve["keel_produce_rows_per_s"] = float(m.group(1)) if m else None
    try:
        import pyarrow as pa
        import pyarrow.flight as flight
        client = flight.connect(addr)
        table = pa.table({"text": texts})
        t = time.perf_counter()
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"))
        writer.begin(table.schema)
        rows = 0

        import threading

        def read():
            global rows
            for chunk in reader:
                rows += chunk.data.num_rows
        th = threading.Thread(target=read)
        th.start()
        for batch in table.to_batches(max_chunksize=2048):
            writer.write_batch(batch)
        writer.done_writing()
        th.join()
        writer.close()
        serve["pyarrow_rows_per_s"] = rows / (time.perf_counter() - t)
    except ImportError as e:
        serve["pyarrow_rows_per_s"] = f"not run: {e}"
    peak = action(addr, "stats")["embedder"]
    serve["device_memory_at_peak"] = peak.get("device_memory")
    serve["cleanup"] = action(addr, "cleanup", '{"level": "full"}')
    serve["device_memory_after_cleanup"] = action(addr, "stats")["embedder"].get("device_memory")
    report["keel_serve"] = serve
    log("keel serve", json.dumps(serve))
finally:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()

# 6. The host's CPUs (the GPU machine's 16-core Xeon, AMX): the kernel tests (AMX forms
# included, where the bundle carries the model crate's test binary), parity of every CPU
# precision with the float64 reference, keel embed on all cores at every precision on the
# best kernels and capped at AVX-512, and the CPU peers (ONNX Runtime, OpenVINO,
# sentence-transformers) on the same texts and threads, where importable.
cpu = {"parity": {}, "keel_embed": [], "peers": []}
tests = os.path.join(BUNDLE, "model-tests.xz")
if os.path.exists(tests):
    binary = os.path.join(WORK, "model-tests")
    with lzma.open(tests) as src, open(binary, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(binary, 0o755)
    p = subprocess.run([binary, "kernels::", "--nocapture", "--test-threads", "1"],
                       capture_output=True, timeout=600)
    text = (p.stdout + p.stderr).decode(errors="replace")
    LOG.write(text)
    cpu["kernel_tests"] = {"exit": p.returncode,
                           "summary": next((l for l in text.splitlines() if l.startswith("test result")), "?"),
                           "skipped": sorted(set(l for l in text.splitlines() if l.startswith("SKIPPED")))}
    log("kernel tests", json.dumps(cpu["kernel_tests"]))
CPU_PRECISIONS = ["f32", "bf16", "int8"]
for precision in CPU_PRECISIONS:
    got, _ = embed(ref_file, "cpu", precision=precision)
    cpu["parity"][f"cpu_{precision}_vs_float64"] = compare(got, f64)
cpu_texts = os.path.join(WORK, "cpu-texts.txt")
with open(cpu_texts, "w") as f:
    f.write("\n".join(texts[:24 if DRY else 4000]) + "\n")
for kernels in ["best", "avx512"]:
    for precision in CPU_PRECISIONS:
        for batch in ([4] if DRY else [25, 64, 256]):
            if kernels == "best":
                _, info = embed(cpu_texts, "cpu", batch, precision)
            else:
                BASE_ENV["KEEL_CPU_KERNELS"] = kernels
                try:
                    _, info = embed(cpu_texts, "cpu", batch, precision)
                finally:
                    del BASE_ENV["KEEL_CPU_KERNELS"]
            row = {"kernels": kernels, "precision": precision, "batch": batch,
                   "texts_per_s": info["texts_per_s"]}
            cpu["keel_embed"].append(row)
            log("keel embed (cpu)", json.dumps(row))
if not DRY:
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)))
    peer_env = dict(os.environ, BENCH_THREADS=str(os.cpu_count()))
    for script, extra in [("ort_baseline.py", [os.path.join(WORK, "ort")]), ("st_baseline.py", []),
                          ("st_baseline.py", ["--bf16"])]:
        cmd = [sys.executable, os.path.join(tools, script), MODEL, cpu_texts, *extra, "25", "64", "256"]
        p = subprocess.run(cmd, env=peer_env, capture_output=True, timeout=1800)
        LOG.write(p.stderr.decode(errors="replace"))
        for line in p.stdout.decode(errors="replace").splitlines():
            if line.startswith(("onnxruntime", "openvino", "batch")):
                name = line.split(" batch")[0] if not line.startswith("batch") else \
                    ("sentence-transformers bf16" if "--bf16" in extra else "sentence-transformers fp32")
                m = re.search(r"batch (\d+): ([\d.]+)", line)
                if m:
                    cpu["peers"].append({"stack": name, "batch": int(m.group(1)),
                                         "texts_per_s": float(m.group(2))})
        if p.returncode != 0:
            cpu["peers"].append({"stack": script + " " + " ".join(extra), "error": p.stderr.decode()[-500:]})
    log("cpu peers", json.dumps(cpu["peers"]))
report["cpu_host"] = cpu

report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
with open(os.path.join(OUT, "report.json"), "w") as f:
    json.dump(report, f, indent=2)

# A readable summary.
lines = [f"# Keel GPU check ({'dry run' if DRY else 'full'}), {report['started']}", "",
         f"GPU: {report['gpu']}; CPU: {report['cpu']} ({report['cores']} cores); {N} texts.", "",
         "## Parity", "", "| comparison | max abs diff | min cosine |", "|---|---|---|"]
for k, v in report["parity"].items():
    lines.append(f"| {k} | {v['max_abs_diff']:.2e} | {v['min_cosine']:.7f} |")
lines += ["", "## Throughput (texts/s, tokenization included)", "",
          "| engine | precision | batch | texts/s |", "|---|---|---|---|"]
for r in report["keel_embed"]:
    engine = "keel embed (wgpu)" if r.get("fusion", True) else "keel embed (wgpu, fusion off)"
    lines.append(f"| {engine} | {r['precision']} | {r['batch']} | {r['texts_per_s']} |")
if "keel_embed_cpu" in report:
    r = report["keel_embed_cpu"]
    lines.append(f"| keel embed (cpu, {report['cores']} cores) | f32 | {r['batch']} | {r['texts_per_s']} |")
for r in st.get("runs", []):
    lines.append(f"| sentence-transformers (cuda) | {r['precision']} | {r['batch']} | {r['texts_per_s']:.0f} |")
if st["status"] != "ran":
    lines.append(f"\nsentence-transformers: {st['status']}")
s = report["keel_serve"]
lines += ["", "## keel serve", "",
          f"- ready (warm) after {s['ready_s']:.1f} s (warm-up {s['warm_up_ms']} ms)",
          f"- keel produce DoExchange: {s['keel_produce_rows_per_s']} rows/s; pyarrow: {s['pyarrow_rows_per_s']}",
          f"- device memory after warm-up {s['device_memory_after_warm_up']}, at peak {s['device_memory_at_peak']}, "
          f"after a full cleanup {s['device_memory_after_cleanup']}"]
c = report["cpu_host"]
lines += ["", f"## The host's CPUs ({report['cores']} cores)", ""]
if "kernel_tests" in c:
    k = c["kernel_tests"]
    lines.append(f"- kernel tests (AMX forms where the CPU has them): exit {k['exit']}, {k['summary']}; "
                 f"skipped: {', '.join(k['skipped']) or 'none'}")
for name, v in c["parity"].items():
    lines.append(f"- {name}: max abs diff {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.7f}")
lines += ["", "| stack | batch | texts/s |", "|---|---|---|"]
for r in c["keel_embed"]:
    lines.append(f"| keel embed {r['precision']} ({r['kernels']} kernels) | {r['batch']} | {r['texts_per_s']} |")
for r in c["peers"]:
    if "error" in r:
        lines.append(f"| {r['stack']} | failed | |")
    else:
        lines.append(f"| {r['stack']} | {r['batch']} | {r['texts_per_s']:.0f} |")
with open(os.path.join(OUT, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
log("\n".join(lines))
shutil.rmtree(WORK, ignore_errors=True)
