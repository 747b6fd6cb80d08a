"""Zeroes the word-embedding rows of the tokens that none of the given texts use, so that a
model folder compresses to about half its size (a GPU machine's run carries at most 64 MiB).

The texts' vectors are unchanged: a row no text looks up is never read. Special tokens and
the first 1 000 rows ([PAD], [UNK], [CLS], [SEP], [MASK], the [unused*] slots) are kept.

usage: trim_vocab.py MODEL_DIR TEXTS_FILE... [--rust-strings RS_FILE...]
  MODEL_DIR/model.safetensors is rewritten in place (f16, bf16 or f32 weights).
  TEXTS_FILE: one text per line; a .jsonl file's lines are objects with a "text" field.
  RS_FILE: a Rust source whose string literals are texts too (the int8 calibration set).

Needs `tokenizers` and `numpy`.
"""
import json, re, struct, sys

import numpy as np
from tokenizers import Tokenizer

args = sys.argv[1:]
if len(args) < 2:
    sys.exit(__doc__)
model_dir = args[0]
texts_files, rust_files, into = [], [], None
for a in args[1:]:
    if a == "--rust-strings":
        into = rust_files
    else:
        (into if into is not None else texts_files).append(a)

texts = []
for path in texts_files:
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line:
            continue
        texts.append(json.loads(line)["text"] if path.endswith(".jsonl") else line)
for path in rust_files:
    texts += [bytes(m, "utf-8").decode("unicode_escape") if "\\" in m else m
              for m in re.findall(r'"((?:[^"\\]|\\.)*)"', open(path, encoding="utf-8").read())]

tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tokenizer.no_truncation()
tokenizer.no_padding()
used = set(range(1000))
for encoding in tokenizer.encode_batch(texts):
    used.update(encoding.ids)

path = f"{model_dir}/model.safetensors"
with open(path, "r+b") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    key = next(k for k in header if k.endswith("word_embeddings.weight"))
    meta = header[key]
    rows, width = meta["shape"]
    itemsize = {"F16": 2, "BF16": 2, "F32": 4}[meta["dtype"]]
    start, end = meta["data_offsets"]
    base = 8 + header_len + start
    f.seek(base)
    data = np.frombuffer(bytearray(f.read(end - start)), dtype=np.uint8).reshape(rows, width * itemsize)
    keep = np.zeros(rows, dtype=bool)
    keep[[i for i in used if i < rows]] = True
    data = data.copy()
    data[~keep] = 0
    f.seek(base)
    f.write(data.tobytes())
print(f"trim_vocab: kept {int(keep.sum())} of {rows} vocabulary rows ({len(texts)} texts)", file=sys.stderr)
