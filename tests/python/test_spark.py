"""Spark: a local pyspark session (2 executor threads) embeds a 5 000-row DataFrame of
variant records through two Keel servers with `keel_client.spark.embed_dataframe`, one
DoExchange per partition. Checks: every row once with its columns, `keel embed`'s vector
for its text, the partitions spread over both servers, and int8's columns as Spark types.
pyspark from PyPI in the test venv (it runs the JVM of the machine: Java 17 or newer).
"""
import os
import sys

import numpy as np
import pytest

from keel_client import KeelClient
from test_ray import reference

pyspark = pytest.importorskip("pyspark", reason="pyspark is installed by scripts/test.sh")

ROWS = 5000


@pytest.fixture(scope="module")
def keels(start_keel):
    return start_keel(), start_keel()


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    # The executors' Python is this venv's, where keel_client is installed.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("keel-test")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.driver.memory", "1g")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def variants(spark):
    """Glow-style variant rows: contig, position, alleles, gene and consequence."""
    genes = ["BRCA1", "BRCA2", "TP53", "MXRA5", "CFTR", "APOE", "LDLR"]
    consequences = ["missense_variant", "synonymous_variant", "frameshift_variant", "stop_gained"]
    rows = [(i, "chrX", 100_000 + 7 * i, "C", "T", genes[i % 7], consequences[i % 4]) for i in range(ROWS)]
    return spark.createDataFrame(
        rows, "id long, contigName string, start long, referenceAllele string, "
              "alternateAllele string, gene string, consequence string").repartition(8)


def test_every_row_once_with_keel_embeds_vector_over_two_servers(spark, keels, keel_binary):
    from keel_client.spark import embed_dataframe

    before = [KeelClient(k.address).stats()["rows"] for k in keels]
    template = "{gene} {contigName}:{start} {referenceAllele}>{alternateAllele} {consequence}"
    out = embed_dataframe(variants(spark), [k.address for k in keels], template=template)
    assert out.schema["embedding"].dataType.simpleString() == "array<float>"
    rows = out.toArrow().sort_by("id")
    assert rows.column("id").to_pylist() == list(range(ROWS))
    cols = {c: rows.column(c).to_pylist() for c in
            ("gene", "contigName", "start", "referenceAllele", "alternateAllele", "consequence")}
    texts = [f"{g} {c}:{s} {r}>{a} {q}" for g, c, s, r, a, q in
             zip(*(cols[c] for c in ("gene", "contigName", "start", "referenceAllele",
                                     "alternateAllele", "consequence")))]
    vecs = np.asarray(rows.column("embedding").to_pylist(), dtype=np.float32)
    assert vecs.shape == (ROWS, 384)
    sample = list(range(0, ROWS, 97))
    ref = reference(keel_binary, [texts[i] for i in sample])
    want = np.stack([ref[texts[i]] for i in sample])
    cos = np.sum(vecs[sample] * want, axis=1) / (np.linalg.norm(vecs[sample], axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, cos.min()
    served = [KeelClient(k.address).stats()["rows"] - b for k, b in zip(keels, before)]
    assert sum(served) == ROWS and all(s > 0 for s in served), served


def test_int8_vectors_come_as_spark_bytes_with_their_scale(spark, keels):
    from keel_client.spark import embed_dataframe

    df = variants(spark).limit(40)
    out = embed_dataframe(df, keels[0].address, template="{gene} {consequence}", precision="int8")
    assert out.schema["embedding"].dataType.simpleString() == "array<tinyint>"
    assert out.schema["embedding_scale"].dataType.simpleString() == "float"
    first = out.orderBy("id").first()
    assert len(first["embedding"]) == 384 and first["embedding_scale"] > 0
    with pytest.raises(ValueError, match="precision"):
        embed_dataframe(df, keels[0].address, precision="f64")
