"""Peers on the same ONNX export: ONNX Runtime (the engine of the fastest CPU embedding
servers) fp32 and int8, and OpenVINO with its default hints (bf16 on CPUs with AMX or
AVX-512 BF16, its own choice) and with the f32 hint, on the same texts and weights as Keel.

usage: ort_baseline.py MODEL_DIR TEXTS_FILE WORK_DIR [batch ...]

Exports the sentence-transformers folder's BERT (the same model.safetensors Keel loads) to
WORK_DIR/model-fp32.onnx once (torch.onnx), and quantizes it with ONNX Runtime's dynamic
quantization (`quantize_dynamic`, int8 weights, defaults) to WORK_DIR/model-int8.onnx.
Each model runs on 2 intra-op threads (this VM's cores), texts sorted by length and cut
into batches as sentence-transformers does, tokenized with the model's tokenizer.json,
mean-pooled and normalised. Prints one line per model and batch size (texts/s, the
tokenizer and pooling included) and writes the vectors, in input order, to
WORK_DIR/ort-{fp32,int8}.npy and WORK_DIR/ov-{default,f32}.npy. OpenVINO (PyPI `openvino`)
is skipped, with a line saying so, where it is not installed.
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def export(model_dir, path):
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # f32 whatever the weights are stored in (a converted f16 folder, say).
            self.bert = AutoModel.from_pretrained(model_dir).float().eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Encoder().eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), path,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                          ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
            opset_version=17, dynamo=False)


def main():
    model_dir, texts_path, work = sys.argv[1:4]
    batches = [int(b) for b in sys.argv[4:]] or [25, 64, 256]
    os.makedirs(work, exist_ok=True)
    fp32 = os.path.join(work, "model-fp32.onnx")
    int8 = os.path.join(work, "model-int8.onnx")
    if not os.path.exists(fp32):
        export(model_dir, fp32)
    if not os.path.exists(int8):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    texts = [l.rstrip("\n") for l in open(texts_path, encoding="utf-8")]
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(256)
    tok.no_padding()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    stacks = []
    for name, path in [("fp32", fp32), ("int8", int8)]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        run = (lambda s: lambda feed: s.run(None, feed)[0])(sess)
        stacks.append((f"onnxruntime {ort.__version__} {name}", f"ort-{name}", run))
    try:
        import openvino
        core = openvino.Core()
        for name, config in [("default", {}), ("f32", {"INFERENCE_PRECISION_HINT": "f32"})]:
            compiled = core.compile_model(core.read_model(fp32), "CPU",
                                          {"INFERENCE_NUM_THREADS": threads, **config})
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            hint = getattr(hint, "get_type_name", lambda: str(hint))()
            request = compiled.create_infer_request()
            run = (lambda r: lambda feed: r.infer(feed)[0].copy())(request)
            stacks.append((f"openvino {openvino.__version__.split('-')[0]} {name}({hint})", f"ov-{name}", run))
    except ImportError:
        print("openvino not installed: its rows are skipped", flush=True)
    for label, save, run in stacks:

        def embed(batch):
            enc = tok.encode_batch(batch)
            t = max(len(e.ids) for e in enc)
            ids = np.zeros((len(enc), t), np.int64)
            mask = np.zeros((len(enc), t), np.int64)
            for r, e in enumerate(enc):
                ids[r, :len(e.ids)] = e.ids
                mask[r, :len(e.ids)] = 1
            hidden = run({"input_ids": ids, "attention_mask": mask,
                          "token_type_ids": np.zeros_like(ids)})
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

        embed(texts[:32])  # warm-up
        for bs in batches:
            out = np.zeros((len(texts), 384), np.float32)
            t0 = time.perf_counter()
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                out[idx] = embed([texts[i] for i in idx])
            dt = time.perf_counter() - t0
            print(f"{label} batch {bs}: {len(texts) / dt:.1f} texts/s", flush=True)
        np.save(os.path.join(work, f"{save}.npy"), out)


if __name__ == "__main__":
    main()
