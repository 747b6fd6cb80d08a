"""Keel's HTTP front with the real `openai` Python package (OpenAI's own client), the way
a retrieval app or notebook would call it. Run by scripts/test.sh:
    python tests/python/test_http.py target/release/keel
"""
import base64
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_flight import ROOT  # noqa: E402

import openai  # noqa: E402
from keel_client.local import LocalKeel  # noqa: E402

TOKEN = "http front test token"
MODEL = "all-MiniLM-L6-v2"
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name)
    if not cond:
        failures.append(name)
        if detail:
            print("     ", str(detail)[:800])


def flight_vectors(address, texts):
    """DoExchange's vectors for `texts` (the Flight path, with the token)."""
    client = flight.connect(address)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())],
                                       timeout=60)
    table = pa.table({"text": texts})
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("embed"), options=options)
    writer.begin(table.schema)
    writer.write_table(table)
    writer.done_writing()
    out = reader.read_all()
    writer.close()
    col = out.column("embedding").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1)


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(binary):
    work = tempfile.mkdtemp(prefix="keel-http-")
    token_file = os.path.join(work, "tokens")
    with open(token_file, "w") as f:
        f.write(TOKEN + "\n")
    env = {"KEEL_EMBEDDER__MODEL_DIR": os.path.join(ROOT, "models/all-MiniLM-L6-v2"),
           "KEEL_METRICS__ENABLED": "false", "KEEL_AUTH__MODE": "token",
           "KEEL_AUTH__TOKEN_FILE": token_file}
    with LocalKeel(binary, config=os.path.join(ROOT, "configs/default.yaml"),
                   data_dir=os.path.join(work, "data"), env=env) as keel:
        client = openai.OpenAI(base_url=keel.http_address + "/v1", api_key=TOKEN)
        texts = ["BRCA1 frameshift_variant", "TP53 chr17:7673802 C>T missense_variant",
                 "MXRA5 chrX:3307551 G>A synonymous_variant"]
        reference = flight_vectors(keel.address, texts)

        one = client.embeddings.create(model=MODEL, input=texts[0])
        check("one string: one vector of 384, equal to DoExchange's",
              len(one.data) == 1 and len(one.data[0].embedding) == 384
              and cosines([one.data[0].embedding], reference[:1]).min() >= 0.99999)
        many = client.embeddings.create(model=MODEL, input=texts)
        got = [d.embedding for d in sorted(many.data, key=lambda d: d.index)]
        check("a list: every vector in order, equal to DoExchange's",
              cosines(got, reference).min() >= 0.99999, cosines(got, reference))
        check("usage counts the texts' tokens",
              many.usage.prompt_tokens == many.usage.total_tokens
              and many.usage.prompt_tokens > len(texts) * 3, many.usage)
        b64 = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
        raw = b64.data[1].embedding
        decoded = (np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str)
                   else np.asarray(raw, dtype=np.float32))
        check("encoding_format base64: the same little-endian f32 values",
              np.allclose(decoded, got[1], atol=1e-7))
        cut = client.embeddings.create(model=MODEL, input=texts, dimensions=128)
        v = np.asarray([d.embedding for d in cut.data])
        ref128 = reference[:, :128]
        check("dimensions=128: the first 128 at unit length",
              v.shape == (3, 128) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
              and cosines(v, ref128).min() >= 0.99999)

        try:
            openai.OpenAI(base_url=keel.http_address + "/v1", api_key="wrong").embeddings.create(
                model=MODEL, input="x")
            check("a wrong key raises AuthenticationError", False)
        except openai.AuthenticationError:
            check("a wrong key raises AuthenticationError", True)
        try:
            client.embeddings.create(model="text-embedding-3-small", input="x")
            check("a wrong model raises NotFoundError", False)
        except openai.NotFoundError as e:
            check("a wrong model raises NotFoundError naming the served model", MODEL in str(e), e)
        models = client.models.list()
        check("models.list names the served model", [m.id for m in models.data] == [MODEL])
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)
    print("all HTTP checks passed")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/keel"))
