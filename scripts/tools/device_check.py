"""The GPU check: parity, throughput and device memory of Keel on this machine's GPU, on both
GPU paths (burn's WGSL `wgpu` and, where the bundle carries a `vulkan` build, burn's SPIR-V
`vulkan` with cooperative matrices), beside sentence-transformers on the same GPU in the
same run; then the host's CPUs: the kernel tests (AMX where the host has it), every CPU
precision against the float64 reference, Keel and its CPU peers pinned to 2 cores (the
developers' VMs) and Keel on all cores. Run through scripts/device-check.sh.

usage: device_check.py BUNDLE OUT [--dry-run] [--gpu-only|--cpu-only] [--keep=DIR] [--budget-s=SECONDS]
  BUNDLE  a folder made by scripts/device-bundle.sh: binaries.tar.xz (keel, keel-vulkan,
          model-tests) or those binaries plain, model/ (MiniLM with f16 weights; model.safetensors may be .xz),
          optionally texts.txt (else made from data/test-haploidX.vcf) and reference.jsonl
          (20 texts with their float64 vectors; else the repository's).
  OUT     where report.md and report.json go (report.json is rewritten after every step,
          so a run cut short still leaves what it measured).
  --dry-run  a few texts and one pass size, a software GPU adapter allowed: proves the
          script end to end on a machine without a GPU (Mesa's lavapipe).
  --gpu-only  the GPU's steps only (parity, throughput, sentence-transformers, keel serve).
  --cpu-only  the host's steps only (kernel tests, CPU parity, Keel and its CPU peers on 2
          cores and on all cores). OpenVINO's rows need `openvino` importable (PYTHONPATH:
          scripts/tools/pare_openvino.sh makes a CPU-only copy small enough to carry).
  --keep=DIR  copy the unpacked binaries and model to DIR first: a plain bundle a second
          run on the same machine can use (`--cpu-only` with OpenVINO, say) without
          carrying the bundle again.
  --budget-s  seconds the whole check may take (default 520; a dry run 900): steps are
          taken most important first, and a step that would not fit is skipped and listed.

Standard library only; sentence-transformers, torch and pyarrow are used when importable.
A step that fails is recorded with its error and the next one runs.
"""
import json, lzma, math, os, re, shutil, socket, subprocess, sys, tarfile, tempfile, time, traceback

args = [a for a in sys.argv[1:] if not a.startswith("--")]
DRY = "--dry-run" in sys.argv
# Only the GPU's steps (and the CPU parity they compare against).
GPU_ONLY = "--gpu-only" in sys.argv
CPU_ONLY = "--cpu-only" in sys.argv
KEEP = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--keep=")), None)
BUDGET = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--budget-s=")),
              900.0 if DRY else 520.0)
T0 = time.monotonic()
if len(args) != 2:
    sys.exit(__doc__)
BUNDLE, OUT = (os.path.abspath(a) for a in args)
os.makedirs(OUT, exist_ok=True)
WORK = tempfile.mkdtemp(prefix="keel-device-check-")
MODEL = os.path.join(BUNDLE, "model")
LOG = open(os.path.join(OUT, "log.txt"), "w")
report = {"dry_run": DRY, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": BUDGET,
          "skipped": [], "errors": {}}


def log(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


def left():
    return BUDGET - (time.monotonic() - T0)


def save():
    report["elapsed_s"] = round(time.monotonic() - T0, 1)
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


CPU_STEPS = ("machine", "kernel tests", "parity cpu", "2 cores", "all cores")


def step(name, need_s, fn):
    """Runs fn unless fewer than need_s seconds of the budget are left; a failure is
    recorded, not raised."""
    if GPU_ONLY and name.startswith(("kernel tests", "2 cores", "all cores")):
        report["skipped"].append(f"{name} (--gpu-only)")
        return
    if CPU_ONLY and not name.startswith(CPU_STEPS):
        report["skipped"].append(f"{name} (--cpu-only)")
        return
    if left() < need_s:
        report["skipped"].append(f"{name} ({left():.0f} s left, needs ~{need_s} s)")
        log("skipped:", name)
        save()
        return
    t = time.monotonic()
    log(f"== {name} ({left():.0f} s left)")
    try:
        fn()
    except Exception as e:  # one step's failure must not cost the others
        report["errors"][name] = f"{type(e).__name__}: {e}"[-3000:]
        LOG.write(traceback.format_exc())
        log("failed:", name, str(e)[-500:])
    report.setdefault("step_s", {})[name] = round(time.monotonic() - t, 1)
    save()


# The binaries travel in one xz stream (device-bundle.sh); a dry run's bundle has them plain.
if os.path.exists(os.path.join(BUNDLE, "binaries.tar.xz")):
    with tarfile.open(os.path.join(BUNDLE, "binaries.tar.xz"), "r:xz") as tar:
        tar.extractall(WORK, filter="data")


def unpack(name):
    """The bundle's binary `name` (plain, from binaries.tar.xz, or NAME.xz), or None."""
    for path in (os.path.join(BUNDLE, name), os.path.join(WORK, name)):
        if os.path.exists(path):
            os.chmod(path, 0o755)
            return path
    packed = os.path.join(BUNDLE, name + ".xz")
    if not os.path.exists(packed):
        return None
    out = os.path.join(WORK, name)
    with lzma.open(packed) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(out, 0o755)
    return out


KEEL = unpack("keel")
VULKAN = unpack("keel-vulkan")
# The model's weights travel xz-compressed (unused vocabulary rows zeroed): unpacked in place.
# (Into a copy of the folder: the bundle stays as it came.)
if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
    copy = os.path.join(WORK, "model")
    shutil.copytree(MODEL, copy, ignore=shutil.ignore_patterns("*.xz"))
    with lzma.open(os.path.join(MODEL, "model.safetensors.xz")) as src, \
            open(os.path.join(copy, "model.safetensors"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    MODEL = copy
if KEEP:
    os.makedirs(KEEP, exist_ok=True)
    for name in ("keel", "keel-vulkan", "model-tests"):
        path = unpack(name)
        if path and os.path.dirname(os.path.abspath(path)) != os.path.abspath(KEEP):
            shutil.copy2(path, os.path.join(KEEP, name))
    if os.path.abspath(MODEL) != os.path.abspath(os.path.join(KEEP, "model")):
        shutil.rmtree(os.path.join(KEEP, "model"), ignore_errors=True)
        shutil.copytree(MODEL, os.path.join(KEEP, "model"), ignore=shutil.ignore_patterns("*.xz"))
# Every run: the bundle's model; on a dry run, a software adapter is accepted.
BASE_ENV = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
BASE_ENV["KEEL_EMBEDDER__MODEL_DIR"] = MODEL
if DRY:
    # A software adapter runs kernels at under 1 GFLOP/s: small passes, few warm-up shapes.
    BASE_ENV["KEEL_EMBEDDER__GPU__ALLOW_SOFTWARE"] = "true"
    BASE_ENV["KEEL_EMBEDDER__GPU__MAX_BATCH_ROWS"] = "4"
    BASE_ENV["KEEL_EMBEDDER__GPU__MAX_BATCH_TOKENS"] = "64"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bundled(name, fallback):
    path = os.path.join(BUNDLE, name)
    return path if os.path.exists(path) else os.path.join(ROOT, fallback)


texts_path = os.path.join(BUNDLE, "texts.txt")
if os.path.exists(texts_path):
    texts_all = [l.rstrip("\n") for l in open(texts_path) if l.strip()]
else:
    # The variant texts of the repository's sample VCF, as Keel renders them, repeated to
    # 16 000 with a distinct suffix so that no cache can answer them (device-bundle.sh
    # zeroed the vocabulary rows these texts do not use).
    rendered = subprocess.run([KEEL, "texts", os.path.join(ROOT, "data/test-haploidX.vcf")],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    texts_all = [f"{rendered[i % len(rendered)]} #{i}" for i in range(16000)]
reference = [json.loads(l) for l in open(bundled("reference.jsonl",
                                                 "crates/model/tests/data/minilm-reference.jsonl"))]
f64 = [r["embedding"] for r in reference]
N = 24 if DRY else min(len(texts_all), 16000)
texts = (texts_all * (N // max(len(texts_all), 1) + 1))[:N]
# The GPU's throughput runs embed the reference texts first, then the N texts: each run
# also gives its path's parity (no separate process that compiles its kernels anew).
texts_file = os.path.join(WORK, "texts.txt")
with open(texts_file, "w") as f:
    f.write("\n".join([r["text"] for r in reference] + texts) + "\n")
ref_file = os.path.join(WORK, "reference.txt")
with open(ref_file, "w") as f:
    f.write("\n".join(r["text"] for r in reference) + "\n")
cpu_texts = os.path.join(WORK, "cpu-texts.txt")
with open(cpu_texts, "w") as f:
    f.write("\n".join(texts[:24 if DRY else 2000]) + "\n")
# Largest passes first: where a GPU path wins is decided there.
BATCHES = [4] if DRY else [256, 1024, 64]
PRECISIONS = ["f32"] if DRY else ["f32", "f16"]
CPU_PRECISIONS = ["f32", "bf16", "int8"]
CPU_BATCHES = [4] if DRY else [25, 64, 256]
GPU_PATHS = [("wgpu", KEEL)] + ([("vulkan", VULKAN)] if VULKAN else [])


def two_cpus():
    """Two logical CPUs on distinct physical cores of one package (a core's two
    hyperthreads share its FMA ports and its AMX tile unit: the 2-core VMs these figures
    stand for have two whole cores), with what the kernel says about them."""
    def topology(cpu, name):
        try:
            return open(f"/sys/devices/system/cpu/cpu{cpu}/topology/{name}").read().strip()
        except OSError:
            return None
    cpus = sorted(os.sched_getaffinity(0))
    first = cpus[0]
    key = lambda c: (topology(c, "physical_package_id"), topology(c, "core_id"))
    other = next((c for c in cpus[1:] if key(c)[0] == key(first)[0] and key(c) != key(first)
                  and key(c)[1] is not None), cpus[1] if len(cpus) > 1 else first)
    return [first, other], {"cpus": [first, other], "core_ids": [key(first)[1], key(other)[1]],
                            "siblings_of_first": topology(first, "thread_siblings_list")}


TWO_CPUS, report["two_cores"] = two_cpus()


def pin_two_cores():
    """In the child before exec: the two CPUs of two_cpus() (what `taskset -c A,B` does)."""
    if (os.cpu_count() or 1) > 2:
        os.sched_setaffinity(0, set(TWO_CPUS))
report["texts"] = N
report["bundle"] = {"vulkan_build": bool(VULKAN)}


def run(cmd, env=None, stdin=None, timeout=None, two_cores=False):
    timeout = timeout or max(10.0, min(300.0, left() + 5))
    log("$", " ".join(cmd), f"(cpus {TWO_CPUS[0]},{TWO_CPUS[1]})" if two_cores else "")
    p = subprocess.run(cmd, env=env or BASE_ENV, stdin=stdin, capture_output=True, timeout=timeout,
                       preexec_fn=pin_two_cores if two_cores else None)
    err = p.stderr.decode(errors="replace")
    LOG.write(err[-20000:])
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}): {err[-2000:]}")
    return p.stdout, err


def embed(path, backend, batch=None, precision="f32", fusion=True, binary=None, two_cores=False,
          env_extra=None):
    cmd = [binary or KEEL, "embed", "--backend", backend, "--precision", precision]
    env = dict(BASE_ENV, **(env_extra or {}))
    # Kernel fusion is one setting per process: off, every operation is its own kernel.
    env["KEEL_EMBEDDER__GPU__FUSION"] = "true" if fusion else "false"
    if backend != "cpu":
        # Each keel embed is a new process. Its warm-up would compile and tune the kernels
        # of every pass shape the configuration allows (~50 s on an H200, most of them
        # shapes these texts never meet); instead the texts go through twice and the
        # second round is timed: the first compiled exactly the shapes it meets. keel
        # serve's warm-up is measured on its own below.
        env["KEEL_EMBEDDER__GPU__WARM_UP"] = "false"
        cmd += ["--rounds", "2"]
    if batch:
        cmd += ["--batch", str(batch)]
        if not DRY:
            cmd += ["--gpu-batch-tokens", str(max(batch * 64, 4096))]
    with open(path, "rb") as f:
        out, err = run(cmd, env=env, stdin=f, two_cores=two_cores)
    vectors = [json.loads(l)["embedding"] for l in out.decode().splitlines()]
    # texts/s from the count and the seconds: the printed rate is rounded to a whole
    # number, 0 for a first pass that compiles its kernels on a loaded software adapter.
    m = re.search(r"(\d+) texts in ([\d.]+) s \([\d.]+ texts/s; start-up ([\d.]+) s; (\d+) workers on (.*?); \d+ passes", err)
    mem = re.search(r"device memory (\d+) MB in use, (\d+) MB reserved", err)
    first = re.search(r"the earlier in ([\d.]+) s", err)
    return vectors, {
        "texts_per_s": round(int(m.group(1)) / max(float(m.group(2)), 1e-3), 3) if m else None,
        "startup_s": float(m.group(3)) if m else None,
        # The first round: compiling and tuning the kernels of the shapes met, and embedding.
        "first_round_s": float(first.group(1)) if first else None,
        "device": m.group(5) if m else None,
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
def machine():
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, timeout=30)
        report["gpu"] = smi.stdout.decode().strip() or None
    except (OSError, subprocess.TimeoutExpired):
        report["gpu"] = None
    info = open("/proc/cpuinfo").read()
    report["cpu"] = next((l.split(":", 1)[1].strip() for l in info.splitlines()
                          if l.startswith("model name")), "?")
    flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
    report["cpu_amx"] = [f for f in ("amx_tile", "amx_bf16", "amx_int8") if f" {f}" in flags]
    report["cores"] = os.cpu_count()


cpu = {"parity": {}, "keel_embed": [], "peers": [], "two_cores": {"keel": [], "peers": []}}
report["cpu_host"] = cpu


# 2. The CPU kernel tests on this host (AMX forms where it has tiles).
def kernel_tests():
    binary = unpack("model-tests")
    if not binary:
        cpu["kernel_tests"] = {"exit": None, "summary": "not in the bundle", "skipped": []}
        return
    p = subprocess.run([binary, "kernels::", "attention", "--nocapture", "--test-threads", "1"],
                       capture_output=True, timeout=max(10, min(240, left())))
    text = (p.stdout + p.stderr).decode(errors="replace")
    LOG.write(text)
    cpu["kernel_tests"] = {"exit": p.returncode,
                           "summary": next((l for l in text.splitlines() if l.startswith("test result")), "?"),
                           "skipped": sorted(set(l for l in text.splitlines() if l.startswith("SKIPPED"))),
                           "failed": [l for l in text.splitlines() if l.startswith("test ") and l.endswith("FAILED")]}
    log("kernel tests", json.dumps(cpu["kernel_tests"]))



# The kernels' rates on one core for MiniLM's Linear shapes at 64 / 128 / 256 rows (every
# form the CPU runs; on AMX hosts the tile kernels beside AVX-512): what share of the tile
# unit's peak a layer gets, and whether 128 rows per task beat 64 there.
def kernel_rates():
    binary = unpack("model-tests")
    if not binary:
        cpu["kernel_rates"] = {"error": "not in the bundle"}
        return
    pin = lambda: os.sched_setaffinity(0, {TWO_CPUS[0]})
    p = subprocess.run([binary, "kernels::tests::layer_rates", "--exact", "--ignored", "--nocapture",
                        "--test-threads", "1"], capture_output=True, timeout=max(10, min(120, left())),
                       preexec_fn=pin)
    text = (p.stdout + p.stderr).decode(errors="replace")
    LOG.write(text)
    rows = []
    for line in text.splitlines():
        # (the first may share its line with the harness's "test ... " under --nocapture)
        if "RATE " in line:
            fields = line[line.index("RATE ") + 5:].split("|")
            precision, isa, n, shape, gmacs = [f.strip() for f in fields]
            rows.append({"precision": precision, "kernels": isa, "rows": int(n), "shape": shape,
                         "gmac_s": float(gmacs)})
    cpu["kernel_rates"] = {"exit": p.returncode, "rows": rows}
    log("kernel rates", f"{len(rows)} rows, exit {p.returncode}")


# 3. Parity: every CPU precision and every GPU path against the float64 reference of the
# f32 weights; the GPU against the CPU on the same (f16-stored) weights.
report["parity"] = {}
cpu_ref = []


def parity_cpu():
    # The GPU's reference: f32 on the FMA kernels, whatever f32 runs on by default.
    got, info = embed(ref_file, "cpu", env_extra={"KEEL_CPU_F32": "fma"})
    cpu_ref.extend(got)
    report["parity"]["cpu_vs_float64"] = compare(got, f64)
    cpu["kernels_f32"] = info["device"]
    for precision in CPU_PRECISIONS:
        got, info = embed(ref_file, "cpu", precision=precision)
        cpu["parity"][f"cpu_{precision}_vs_float64"] = {**compare(got, f64), "device": info["device"]}
    if "bf16x3" in (cpu["parity"]["cpu_f32_vs_float64"]["device"] or ""):
        cpu["parity"]["cpu_f32_fma_vs_float64"] = {**report["parity"]["cpu_vs_float64"],
                                                   "device": cpu["kernels_f32"]}


def vulkan_refusal():
    # A binary without the vulkan feature (and, on a software adapter, a vulkan build)
    # refuses the backend with one line: no crash.
    p = subprocess.run([KEEL, "embed", "--backend", "vulkan"], env=BASE_ENV, input=b"x\n",
                       capture_output=True, timeout=120)
    err = p.stderr.decode(errors="replace").strip().splitlines()
    report["vulkan_refusal"] = {"exit": p.returncode, "message": err[-1] if err else ""}


def auto_choice():
    # What `backend: auto` picks on this machine, in each binary (keel validate opens no model).
    report["auto"] = {}
    for name, binary in (("keel", KEEL), ("keel-vulkan", VULKAN)):
        if not binary:
            continue
        p = subprocess.run([binary, "validate"], env=dict(BASE_ENV, KEEL_EMBEDDER__BACKEND="auto"),
                           capture_output=True, timeout=120)
        line = [l for l in p.stdout.decode(errors="replace").splitlines() if "auto picks" in l]
        report["auto"][name] = line[0] if line else f"exit {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}"
        log("auto", name, report["auto"][name])




# 4. Throughput on the GPU: keel embed (texts in, vectors out, tokenization included) on
# each path and precision, largest passes first; then sentence-transformers, same texts.
report["keel_embed"] = []


def gpu_throughput(backend, binary, precision, batch, fusion=True):
    def go():
        got, info = embed(texts_file, backend, batch, precision, fusion=fusion, binary=binary)
        row = {"backend": backend, "precision": precision, "batch": batch, **info}
        if not fusion:
            row["fusion"] = False
        report["keel_embed"].append(row)
        report.setdefault("adapters", {})[backend] = info["device"]
        # The first len(f64) vectors are the reference texts': this path's parity, the
        # worst over its runs.
        name = f"{backend}_{precision}" + ("" if fusion else "_no_fusion")
        got = got[:len(f64)]
        for against, want in (("float64", f64), ("cpu", cpu_ref)):
            if not want:
                continue
            c, key = compare(got, want), f"{name}_vs_{against}"
            old = report["parity"].get(key)
            if old:
                c = {"max_abs_diff": max(old["max_abs_diff"], c["max_abs_diff"]),
                     "min_cosine": min(old["min_cosine"], c["min_cosine"])}
            report["parity"][key] = c
        log("keel embed", json.dumps(row), "parity", json.dumps(report["parity"].get(f"{name}_vs_float64")))
    return go


st = {"status": "not run"}
report["sentence_transformers"] = st


def sentence_transformers_gpu():
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        st["status"] = f"not run: {e}"
        return
    if not torch.cuda.is_available():
        st["status"] = "not run: torch sees no CUDA device"
        return
    st.update({"status": "ran", "device": torch.cuda.get_device_name(0), "runs": []})
    for precision in PRECISIONS:
        # The bundle's weights are stored in f16: f32 runs them widened, as Keel's f32 does.
        m = SentenceTransformer(MODEL, device="cuda")
        m = m.half() if precision == "f16" else m.float()
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


# What decides first: f16 (where vulkan's cooperative matrices can use the tensor cores)
# at 256 rows per pass on both paths, sentence-transformers beside them, then f16 at
# 1 024 and f32 at 256; the other sizes last. (Each keel embed compiles and tunes its
# kernels for every pass shape first: ~50 s on an H200, reported as start-up.)
GPU_RUNS = [(p, b) for p, b in [("f16", 256), ("f16", 1024), ("f32", 256), ("f32", 1024),
                                  ("f16", 64), ("f32", 64)]
            if p in PRECISIONS and b in BATCHES] if not DRY else [(p, b) for b in BATCHES for p in PRECISIONS]


# 5. The host's CPUs pinned to 2 cores (the developers' VMs: same CPU model), Keel at every
# precision beside sentence-transformers fp32 and bf16 (oneDNN, AMX) on the same cores.
def two_cores_keel():
    for precision in CPU_PRECISIONS:
        for batch in CPU_BATCHES:
            _, info = embed(cpu_texts, "cpu", batch, precision, two_cores=True,
                            env_extra={"KEEL_EMBEDDER__CPU__WORKERS": "2"})
            row = {"precision": precision, "batch": batch, "texts_per_s": info["texts_per_s"],
                   "device": info["device"]}
            cpu["two_cores"]["keel"].append(row)
            log("keel embed (2 cores)", json.dumps(row))
    # f32 on the FMA kernels beside f32's default (bf16x3 on the tiles where AMX runs).
    _, info = embed(cpu_texts, "cpu", 64, "f32", two_cores=True,
                    env_extra={"KEEL_EMBEDDER__CPU__WORKERS": "2", "KEEL_CPU_F32": "fma"})
    row = {"precision": "f32 (KEEL_CPU_F32=fma)", "batch": 64, "texts_per_s": info["texts_per_s"],
           "device": info["device"]}
    cpu["two_cores"]["keel"].append(row)
    log("keel embed (2 cores)", json.dumps(row))


def peers(threads, two_cores, into, scripts):
    def go():
        tools = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        for script, extra in scripts:
            if left() < 30:
                report["skipped"].append(f"{script} {' '.join(extra)} on {threads} threads")
                continue
            cmd = [sys.executable, os.path.join(tools, script), MODEL, cpu_texts, *extra,
                   *map(str, CPU_BATCHES)]
            log("$", " ".join(cmd), f"(cpus {TWO_CPUS[0]},{TWO_CPUS[1]})" if two_cores else "")
            p = subprocess.run(cmd, env=env, capture_output=True, timeout=max(10, min(300, left())),
                               preexec_fn=pin_two_cores if two_cores else None)
            LOG.write(p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")[-5000:])
            for line in p.stdout.decode(errors="replace").splitlines():
                if line.startswith(("onnxruntime", "openvino", "batch")):
                    name = line.split(" batch")[0] if not line.startswith("batch") else \
                        ("sentence-transformers bf16" if "--bf16" in extra else "sentence-transformers fp32")
                    m = re.search(r"batch (\d+): ([\d.]+)", line)
                    if m:
                        into.append({"stack": name, "batch": int(m.group(1)),
                                     "texts_per_s": float(m.group(2))})
            if p.returncode != 0:
                into.append({"stack": script + " " + " ".join(extra), "error": p.stderr.decode()[-500:]})
        log("cpu peers", json.dumps(into))
    return go


ST_SCRIPTS = [("st_baseline.py", ["--bf16"]), ("st_baseline.py", [])]
ORT_SCRIPTS = [("ort_baseline.py", [os.path.join(WORK, "ort")])]


# 6. keel serve: warm-up, throughput through DoExchange (keel produce; pyarrow if present),
# device memory after warm-up, at peak, after a cleanup.
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def action(addr, name, body=""):
    out, _ = run([KEEL, "action", name, "--to", addr, "--body", body, "--wait", "600"])
    return json.loads(out)


def keel_serve():
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
        # Up once health answers; a server that exits (no adapter, say) ends the wait.
        while True:
            try:
                run([KEEL, "action", "health", "--to", addr, "--body", "", "--wait", "5"])
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if server.poll() is not None:
                    raise RuntimeError(f"keel serve exited with {server.returncode} (see serve.log)")
                if left() < 0:
                    raise
        serve = {"ready_s": time.perf_counter() - t0}
        report["keel_serve"] = serve
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
            import threading
            client = flight.connect(addr)
            table = pa.table({"text": texts})
            t = time.perf_counter()
            writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"))
            writer.begin(table.schema)
            rows = [0]

            def read():
                for chunk in reader:
                    rows[0] += chunk.data.num_rows
            th = threading.Thread(target=read)
            th.start()
            for batch in table.to_batches(max_chunksize=2048):
                writer.write_batch(batch)
            writer.done_writing()
            th.join()
            writer.close()
            serve["pyarrow_rows_per_s"] = rows[0] / (time.perf_counter() - t)
        except ImportError as e:
            serve["pyarrow_rows_per_s"] = f"not run: {e}"
        peak = action(addr, "stats")["embedder"]
        serve["device_memory_at_peak"] = peak.get("device_memory")
        serve["cleanup"] = action(addr, "cleanup", '{"level": "full"}')
        serve["device_memory_after_cleanup"] = action(addr, "stats")["embedder"].get("device_memory")
        log("keel serve", json.dumps(serve))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# What fusion buys: f32 at the largest pass size without it.


# 7. All the host's cores: Keel at every precision on the best kernels and capped at
# AVX-512, then the peers on as many threads.
def all_cores_keel():
    for kernels in ["best", "avx512"]:
        for precision in CPU_PRECISIONS:
            for batch in ([4] if DRY else [64]):
                env = {} if kernels == "best" else {"KEEL_CPU_KERNELS": kernels}
                _, info = embed(cpu_texts, "cpu", batch, precision, env_extra=env)
                row = {"kernels": kernels, "precision": precision, "batch": batch,
                       "texts_per_s": info["texts_per_s"], "device": info["device"]}
                cpu["keel_embed"].append(row)
                log("keel embed (cpu)", json.dumps(row))



# The plan, most important first (a step that would not fit the budget is skipped and
# listed): the machine; the GPU's deciding runs (f16 at 256 rows per pass on both paths,
# sentence-transformers beside them, f16 at 1 024, f32 at 256), keel serve; then the
# host's CPUs (kernel tests, parity, Keel and its peers on 2 cores: OpenVINO and ONNX
# Runtime, sentence-transformers); then the rest of both.
step("machine", 0, machine)
step("auto", 5, auto_choice)
step("parity cpu", 20, parity_cpu)
if not VULKAN:
    step("vulkan refusal", 10, vulkan_refusal)


def gpu_runs(runs):
    for precision, batch in runs:
        for backend, binary in GPU_PATHS:
            step(f"keel embed {backend} {precision} {batch}", 25,
                 gpu_throughput(backend, binary, precision, batch))


gpu_runs(GPU_RUNS[:1])
step("sentence-transformers cuda", 40, sentence_transformers_gpu)
gpu_runs(GPU_RUNS[1:3])
step("keel serve", 60, keel_serve)
step("kernel tests", 30, kernel_tests)
step("kernel rates", 20, kernel_rates)
step("2 cores: keel embed", 40, two_cores_keel)
if not DRY:
    step("2 cores: onnxruntime and openvino", 60, peers(2, True, cpu["two_cores"]["peers"], ORT_SCRIPTS))
    step("2 cores: sentence-transformers", 40, peers(2, True, cpu["two_cores"]["peers"], ST_SCRIPTS))
gpu_runs(GPU_RUNS[3:])
step("keel embed wgpu f32 fusion off", 25, gpu_throughput("wgpu", KEEL, "f32", BATCHES[0], fusion=False))
step("all cores: keel embed", 40, all_cores_keel)
if not DRY:
    step("all cores: peers", 60, peers(os.cpu_count(), False, cpu["peers"], ST_SCRIPTS))

report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
save()

# A readable summary (every part optional: a step may have been skipped or failed).
def peer_rows(rows):
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"| {r['stack']} | failed | |")
        else:
            out.append(f"| {r['stack']} | {r['batch']} | {r['texts_per_s']:.0f} |")
    return out


lines = [f"# Keel GPU check ({'dry run' if DRY else 'full'}), {report['started']}", "",
         f"GPU: {report.get('gpu')}; CPU: {report.get('cpu')} ({report.get('cores')} cores, "
         f"AMX: {' '.join(report.get('cpu_amx', [])) or 'none'}); {N} texts; "
         f"{report.get('elapsed_s')} s of a {BUDGET:.0f} s budget.", ""]
for name, adapter in report.get("adapters", {}).items():
    lines.append(f"- {name}: {adapter}")
if "vulkan_refusal" in report:
    r = report["vulkan_refusal"]
    lines.append(f"- vulkan in this bundle's binary: refused (exit {r['exit']}): {r['message']}")
for name, line in report.get("auto", {}).items():
    lines.append(f"- backend auto ({name}): {line}")
lines += ["", "## Parity", "", "| comparison | max abs diff | min cosine |", "|---|---|---|"]
for k, v in report["parity"].items():
    lines.append(f"| {k} | {v['max_abs_diff']:.2e} | {v['min_cosine']:.7f} |")
lines += ["", "## Throughput (texts/s, tokenization included)", "",
          "| engine | precision | batch | texts/s (second round) | model load s | first round s (kernels compiled) |",
          "|---|---|---|---|---|---|"]
for r in report["keel_embed"]:
    engine = f"keel embed ({r['backend']}" + (", fusion off)" if r.get("fusion") is False else ")")
    lines.append(f"| {engine} | {r['precision']} | {r['batch']} | {r['texts_per_s']} | {r['startup_s']} | "
                 f"{r.get('first_round_s')} |")
for r in st.get("runs", []):
    lines.append(f"| sentence-transformers (cuda) | {r['precision']} | {r['batch']} | {r['texts_per_s']:.0f} | |")
if st["status"] != "ran":
    lines.append(f"\nsentence-transformers: {st['status']}")
s = report.get("keel_serve")
if s:
    lines += ["", "## keel serve", "",
              f"- ready (warm) after {s['ready_s']:.1f} s (warm-up {s.get('warm_up_ms')} ms)",
              f"- keel produce DoExchange: {s.get('keel_produce_rows_per_s')} rows/s; pyarrow: {s.get('pyarrow_rows_per_s')}",
              f"- device memory after warm-up {s.get('device_memory_after_warm_up')}, at peak {s.get('device_memory_at_peak')}, "
              f"after a full cleanup {s.get('device_memory_after_cleanup')}"]
c = report["cpu_host"]
lines += ["", f"## The host's CPUs ({report.get('cores')} cores)", ""]
if "kernel_tests" in c:
    k = c["kernel_tests"]
    lines.append(f"- kernel tests (AMX forms where the CPU has them): exit {k['exit']}, {k['summary']}; "
                 f"skipped: {', '.join(k['skipped']) or 'none'}; failed: {', '.join(k.get('failed', [])) or 'none'}")
for name, v in c["parity"].items():
    lines.append(f"- {name}: max abs diff {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.7f} ({v.get('device')})")
rates = c.get("kernel_rates", {}).get("rows", [])
if rates:
    sizes = sorted({r["rows"] for r in rates})
    lines += ["", "### Kernel rates, one core (GMAC/s; `layer_rates`)", "",
              "| precision | kernels | layer | " + " | ".join(f"{n} rows" for n in sizes) + " |",
              "|---|---|---|" + "---|" * len(sizes)]
    seen = {}
    for r in rates:
        seen.setdefault((r["precision"], r["kernels"], r["shape"]), {})[r["rows"]] = r["gmac_s"]
    for (precision, isa, shape), by in seen.items():
        lines.append(f"| {precision} | {isa} | {shape} | " + " | ".join(f"{by.get(n, '')}" for n in sizes) + " |")
lines += ["", "### Pinned to 2 cores", "", "| stack | batch | texts/s |", "|---|---|---|"]
for r in c["two_cores"]["keel"]:
    lines.append(f"| keel embed {r['precision']} ({r['device']}) | {r['batch']} | {r['texts_per_s']} |")
lines += peer_rows(c["two_cores"]["peers"])
lines += ["", "### All cores", "", "| stack | batch | texts/s |", "|---|---|---|"]
for r in c["keel_embed"]:
    lines.append(f"| keel embed {r['precision']} ({r['kernels']} kernels) | {r['batch']} | {r['texts_per_s']} |")
lines += peer_rows(c["peers"])
if report["skipped"]:
    lines += ["", "Skipped (out of time): " + "; ".join(report["skipped"])]
if report["errors"]:
    lines += ["", "## Errors", ""] + [f"- {k}: {v[-400:]}" for k, v in report["errors"].items()]
with open(os.path.join(OUT, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
log("\n".join(lines))
shutil.rmtree(WORK, ignore_errors=True)
