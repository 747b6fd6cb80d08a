"""Stream Arrow data through Keel, the streaming embedding engine.

    from keel_client import KeelClient
    client = KeelClient("grpc://127.0.0.1:50051")
    table = client.embed(pa.table({"text": ["BRCA1 frameshift variant"]}))

`keel_client.ray.KeelEmbedder` embeds a Ray Dataset with `map_batches`.
"""
from .client import KeelClient, KeelError

__all__ = ["KeelClient", "KeelError"]
__version__ = "0.1.0"
