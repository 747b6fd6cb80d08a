"""What each choice of Keel's int8 scheme buys, simulated in PyTorch on the same model.

usage: int8_ablation.py MODEL_DIR TEXTS_FILE [--outliers K ...] [--rows sym|asym]
                        [--weights int8|f32] [--calibration keel|texts]

Every Linear layer of the encoder computes `quant(x) · quant(W)` in float (fake
quantization, the numbers Keel's kernels compute exactly): W per output channel
symmetric in [-127, 127]; x per row, symmetric in [-127, 127] (`sym`) or asymmetric over
[0, 255] with a zero point (`asym`, Keel's); the K input channels with the largest
calibration maxima per layer kept in f32 (Keel: 8). Calibration texts: Keel's own
(`crates/model/src/calibration.rs`, read from the source) or the first 64 of TEXTS_FILE.
Prints, per K, min and mean cosine to the f32 model and neighbour recall@10 (each text
searched among the others), as scripts/tools/precision_accuracy.py does for Keel.
Needs torch and transformers (scripts/bench-model.sh's venv has both).
"""
import argparse
import os
import re

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def keel_calibration_texts():
    src = open(os.path.join(ROOT, "crates/model/src/calibration.rs"), encoding="utf-8").read()
    body = src[src.index("pub const TEXTS"):]
    return [bytes(m, "utf-8").decode("unicode_escape") if "\\" in m else m
            for m in re.findall(r'"((?:[^"\\]|\\.)*)"', body)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("texts")
    ap.add_argument("--outliers", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--rows", choices=["sym", "asym"], default="asym")
    ap.add_argument("--weights", choices=["int8", "f32"], default="int8")
    ap.add_argument("--calibration", choices=["keel", "texts"], default="keel")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    texts = [line.rstrip("\n") for line in open(args.texts, encoding="utf-8")]

    def embed(batch_texts, one_per_pass=False):
        out = []
        step = 1 if one_per_pass else 64
        with torch.no_grad():
            for i in range(0, len(batch_texts), step):
                b = tok(batch_texts[i:i + step], padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1)
                out.append(torch.nn.functional.normalize(e, dim=1).double().numpy())
        return np.concatenate(out)

    def top10(v):
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :10]

    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "encoder" in n]
    plain = {n: m.forward for n, m in layers}

    # Calibration: each layer's per-channel input maxima, one text per pass (no padding).
    maxima = {}

    def observe(name):
        def forward(x):
            seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima.get(name, seen), seen)
            return plain[name](x)
        return forward

    for n, m in layers:
        m.forward = observe(n)
    calibration = keel_calibration_texts() if args.calibration == "keel" else texts[:64]
    embed(calibration, one_per_pass=True)
    for n, m in layers:
        m.forward = plain[n]
    reference = embed(texts)
    reference_top = top10(reference)

    def quant_rows(x):
        if args.rows == "sym":
            step = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
            return torch.round(x / step).clamp(-127, 127) * step
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        step = ((hi - lo) / 255).clamp_min(1e-12)
        zero = torch.round(-lo / step)
        return ((torch.round(x / step) + zero).clamp(0, 255) - zero) * step

    def quantized(name, m, k):
        w, b = m.weight.data, m.bias.data
        keep = torch.argsort(-maxima[name])[:k] if k else None
        if keep is not None:
            w_int = w.clone()
            w_int[:, keep] = 0
        else:
            w_int = w
        if args.weights == "int8":
            scale = w_int.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
            w_int = torch.round(w_int / scale).clamp(-127, 127) * scale

        def forward(x):
            if keep is None:
                return quant_rows(x) @ w_int.T + b
            rest = x.clone()
            rest[..., keep] = 0
            return quant_rows(rest) @ w_int.T + x[..., keep] @ w[:, keep].T + b
        return forward

    print(f"{len(texts)} texts; rows {args.rows}, weights {args.weights}, calibration "
          f"{args.calibration} ({len(calibration)} texts); reference: the f32 model\n")
    print("| outlier channels in f32 | min cosine | mean cosine | recall@10 (neighbours) |")
    print("|---|---|---|---|")
    for k in args.outliers:
        for n, m in layers:
            m.forward = quantized(n, m, k)
        v = embed(texts)
        cos = (v * reference).sum(1)
        recall = np.mean([len(set(a) & set(r)) / 10 for a, r in zip(top10(v), reference_top)])
        print(f"| {k} | {cos.min():.4f} | {cos.mean():.5f} | {recall:.3f} |", flush=True)
        for n, m in layers:
            m.forward = plain[n]


if __name__ == "__main__":
    main()
