"""Spark integration: embed a DataFrame's text column through a fleet of Keel servers.

    from keel_client.spark import embed_dataframe

    variants = spark.read.parquet("s3://bucket/variants/")        # e.g. Glow's VCF reader
    embedded = embed_dataframe(variants, ["grpc://keel-0:50051", "grpc://keel-1:50051"],
                               template="{gene} {consequence} {hgvs}")
    embedded.write.parquet("s3://bucket/embedded/")

Every partition is ONE DoExchange (`DataFrame.mapInArrow`): its Arrow batches stream to
a Keel server and come back with an `embedding` column as they are embedded, so an
executor holds only the rows in flight. Partition `p` goes to `addresses[p % n]` first,
which spreads the partitions over the servers; if that server goes away, the rows it has
not answered go to the next address (`KeelClient.embed_stream`'s rules: every row comes
back exactly once, in order). Spark's own task retries come on top. With `cache.shared`
(Redis) the fleet embeds each distinct text once.

The output is the input's columns plus `embedding`: `array<float>` for precision `f32`
(the default) and `f16` (widened: Spark has no half type), `array<tinyint>` plus
`embedding_scale` (`float`) for `int8`, `binary` for `binary` (docs/FLIGHT.md).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Union

import pyarrow as pa

from .client import KeelClient

_PRECISIONS = ("f32", "f16", "int8", "binary")


def output_fields(precision: str) -> "list[Any]":
    """The Spark fields Keel adds to a row for `precision`."""
    from pyspark.sql.types import (ArrayType, BinaryType, ByteType, FloatType,
                                   StructField)

    if precision in ("f32", "f16"):
        return [StructField("embedding", ArrayType(FloatType()), True)]
    if precision == "int8":
        return [StructField("embedding", ArrayType(ByteType()), True),
                StructField("embedding_scale", FloatType(), True)]
    if precision == "binary":
        return [StructField("embedding", BinaryType(), True)]
    raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")


def _for_spark(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Keel's fixed-size vector columns as the variable-size types Spark reads."""
    columns = []
    fields = []
    for field, column in zip(batch.schema, batch.columns):
        if field.name == "embedding":
            t = field.type
            if pa.types.is_fixed_size_list(t):
                value = pa.float32() if pa.types.is_floating(t.value_type) else t.value_type
                column = column.cast(pa.list_(value))
            elif pa.types.is_fixed_size_binary(t):
                column = column.cast(pa.binary())
            field = pa.field("embedding", column.type, True)
        columns.append(column)
        fields.append(field)
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


def embed_partitions(addresses: Union[str, Sequence[str]],
                     **client_kwargs: Any) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function `mapInArrow` runs on each partition (picklable: plain arguments
    only). Keyword arguments go to `KeelClient` (token, tls_root_certs, timeout,
    text_column, template, precision, dimensions, retries, batch_rows)."""
    listed = [addresses] if isinstance(addresses, str) else list(addresses)
    if not listed:
        raise ValueError("embed_dataframe needs at least one address")

    def embed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        with KeelClient(listed, **client_kwargs) as client:
            first = partition % len(listed)
            for out in client.embed_stream(batches, first=first):
                yield _for_spark(out)

    return embed


def embed_dataframe(df: Any, addresses: Union[str, Sequence[str]], *,
                    text_column: Optional[str] = None, template: Optional[str] = None,
                    precision: str = "f32", dimensions: Optional[int] = None,
                    token: Optional[str] = None, tls_root_certs: Union[bytes, str, None] = None,
                    timeout: float = 300.0, retries: int = 2) -> Any:
    """`df` with an `embedding` column (see the module's docstring), lazily: nothing runs
    until an action (write, count, collect). One DoExchange per partition; repartition
    `df` to spread it over more servers or executors."""
    from pyspark.sql.types import StructType

    if "embedding" in df.columns:
        raise ValueError("the DataFrame already has an 'embedding' column; rename or drop it")
    schema = StructType(list(df.schema.fields) + output_fields(precision))
    if isinstance(tls_root_certs, str):
        with open(tls_root_certs, "rb") as f:
            tls_root_certs = f.read()
    fn = embed_partitions(addresses, text_column=text_column, template=template,
                          precision=precision, dimensions=dimensions, token=token,
                          tls_root_certs=tls_root_certs, timeout=timeout, retries=retries)
    return df.mapInArrow(fn, schema)
