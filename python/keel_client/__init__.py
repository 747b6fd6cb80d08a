"""Stream Arrow data through Keel, the streaming embedding engine.

    from keel_client import KeelClient
    client = KeelClient("grpc://127.0.0.1:50051")
    table = client.embed(pa.table({"text": ["BRCA1 frameshift variant"]}))

`keel_client.ray.KeelEmbedder` embeds a Ray Dataset with `map_batches`;
`keel_client.spark.embed_dataframe` a Spark DataFrame, one DoExchange per partition;
`keel_client.contract` holds the descriptors, action bodies and acknowledgements the
server speaks (the mirror of its `keel_wire::contract`); `keel_client.local.LocalKeel`
starts a `keel serve` on a free loopback port (tests, benchmarks, notebooks).
"""
from . import contract
from .client import KeelClient, KeelError

__all__ = ["KeelClient", "KeelError", "contract"]
__version__ = "0.1.0"
