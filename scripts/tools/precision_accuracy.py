"""Accuracy of every stack against sentence-transformers fp32, on the same texts.

usage: precision_accuracy.py WORK_DIR

Reads WORK_DIR/keel-{f32,bf16,int8}.jsonl (`keel embed` output) and, when present,
WORK_DIR/st-{fp32,bf16}.npy (scripts/tools/st_baseline.py --save) and
WORK_DIR/ort/{ort-fp32,ort-int8,ov-default,ov-f32}.npy (scripts/tools/ort_baseline.py), all
in the order of the texts. The reference is sentence-transformers fp32 (Keel f32 where it
is missing). For each stack: min and mean cosine of a text's vector to its reference
vector, and neighbour agreement: every text searched against all the others (cosine, top
10), recall@10 of the ranking against the reference ranking's top 10. Prints a Markdown
table.
"""
import json
import os
import sys

import numpy as np


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return np.array([json.loads(l)["embedding"] for l in f], dtype=np.float64)


def unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def top10(v):
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :10]


def main():
    work = sys.argv[1]
    st = os.path.join(work, "st-fp32.npy")
    if os.path.exists(st):
        ref, ref_name = unit(np.load(st).astype(np.float64)), "sentence-transformers fp32"
    else:
        ref, ref_name = unit(load_jsonl(os.path.join(work, "keel-f32.jsonl"))), "Keel f32"
    ref_top = top10(ref)
    rows = [("Keel f32", os.path.join(work, "keel-f32.jsonl")),
            ("Keel bf16", os.path.join(work, "keel-bf16.jsonl")),
            ("Keel int8", os.path.join(work, "keel-int8.jsonl")),
            ("sentence-transformers bf16", os.path.join(work, "st-bf16.npy")),
            ("ONNX Runtime fp32", os.path.join(work, "ort", "ort-fp32.npy")),
            ("ONNX Runtime int8", os.path.join(work, "ort", "ort-int8.npy")),
            ("OpenVINO default", os.path.join(work, "ort", "ov-default.npy")),
            ("OpenVINO f32", os.path.join(work, "ort", "ov-f32.npy"))]
    print(f"{len(ref)} texts; reference: {ref_name}\n")
    print("| stack | min cosine | mean cosine | recall@10 (neighbours) |")
    print("|---|---|---|---|")
    for name, path in rows:
        if not os.path.exists(path):
            print(f"| {name} | not measured ({path} missing) | | |")
            continue
        v = unit(np.load(path).astype(np.float64) if path.endswith(".npy") else load_jsonl(path))
        cos = (v * ref).sum(1)
        top = top10(v)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top)])
        print(f"| {name} | {cos.min():.4f} | {cos.mean():.5f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
