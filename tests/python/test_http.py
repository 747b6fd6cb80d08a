"""Keel's HTTP front with the real `openai` Python package (OpenAI's own client), the way
a retrieval app or notebook would call it, against DoExchange's vectors."""
import base64
import ssl

import numpy as np
import openai
import pyarrow as pa
import pyarrow.flight as flight
import pytest

TOKEN = "http front test token"
MODEL = "all-MiniLM-L6-v2"
TEXTS = ["BRCA1 frameshift_variant", "TP53 chr17:7673802 C>T missense_variant",
         "MXRA5 chrX:3307551 G>A synonymous_variant"]


@pytest.fixture(scope="module")
def keel(start_keel, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(TOKEN + "\n")
    return start_keel(env={"KEEL_AUTH__MODE": "token", "KEEL_AUTH__TOKEN_FILE": str(token_file)})


@pytest.fixture(scope="module")
def client(keel):
    return openai.OpenAI(base_url=keel.http_address + "/v1", api_key=TOKEN)


@pytest.fixture(scope="module")
def reference(keel):
    """DoExchange's vectors of TEXTS (the Flight path, with the token)."""
    client = keel.connect()
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], timeout=60)
    table = pa.table({"text": TEXTS})
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


def test_one_string_gives_doexchanges_vector(client, reference):
    one = client.embeddings.create(model=MODEL, input=TEXTS[0])
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert cosines([one.data[0].embedding], reference[:1]).min() >= 0.99999


def test_a_list_gives_every_vector_in_order_and_counts_tokens(client, reference):
    many = client.embeddings.create(model=MODEL, input=TEXTS)
    got = [d.embedding for d in sorted(many.data, key=lambda d: d.index)]
    assert cosines(got, reference).min() >= 0.99999, cosines(got, reference)
    assert many.usage.prompt_tokens == many.usage.total_tokens
    assert many.usage.prompt_tokens > len(TEXTS) * 3, many.usage


def test_base64_is_the_same_little_endian_f32_values(client):
    floats = client.embeddings.create(model=MODEL, input=TEXTS).data[1].embedding
    raw = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64").data[1].embedding
    decoded = (np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str)
               else np.asarray(raw, dtype=np.float32))
    assert np.allclose(decoded, floats, atol=1e-7)


def test_dimensions_cut_to_the_first_ones_at_unit_length(client, reference):
    cut = client.embeddings.create(model=MODEL, input=TEXTS, dimensions=128)
    v = np.asarray([d.embedding for d in cut.data])
    assert v.shape == (3, 128)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert cosines(v, reference[:, :128]).min() >= 0.99999


def test_a_wrong_key_raises_authentication_error(keel):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keel.http_address + "/v1", api_key="wrong").embeddings.create(
            model=MODEL, input="x")


def test_a_wrong_model_raises_not_found_naming_the_served_one(client):
    with pytest.raises(openai.NotFoundError, match=MODEL):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_the_front_serves_https_with_flights_certificate(start_keel, tmp_path):
    """With server.tls set, the front speaks TLS with the same certificate; a client that
    trusts it gets the same vectors, and plain HTTP is not answered."""
    import subprocess
    import httpx

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    keel = start_keel(tls_cert=str(cert), tls_key=str(key))
    assert keel.http_address.startswith("https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=60) as http:
        client = openai.OpenAI(base_url=keel.http_address + "/v1", api_key="unused", http_client=http)
        got = client.embeddings.create(model=MODEL, input=TEXTS[:2])
        assert [len(d.embedding) for d in got.data] == [384, 384]
        assert http.get(keel.http_address + "/health").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{keel.http_port}/health", timeout=5)



def test_langchains_openai_embeddings_against_keel(keel, reference):
    """LangChain's `OpenAIEmbeddings` pointed at Keel (base URL, key, model), as docs/HTTP.md
    shows: documents and a query get DoExchange's vectors."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=MODEL, base_url=keel.http_address + "/v1", api_key=TOKEN,
                                  check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(TEXTS)
    assert len(documents) == len(TEXTS)
    assert cosines(documents, reference).min() >= 0.99999
    query = embeddings.embed_query(TEXTS[1])
    assert cosines([query], reference[1:2]).min() >= 0.99999
