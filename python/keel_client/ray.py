"""Ray Data integration: embed a Dataset's blocks through the Keel servers of a cluster.

    import ray
    from keel_client.ray import KeelEmbedder

    ds = ray.data.read_parquet("s3://bucket/variants/")
    ds = ds.map_batches(KeelEmbedder, fn_constructor_kwargs={"template": "{gene} {hgvs}"},
                        batch_format="pyarrow", batch_size=4096, concurrency=8)
    ds.write_parquet("s3://bucket/embedded/")

Each actor streams its blocks to a Keel server: by default the one on its own node
(`grpc://NODE_IP:50051`); given a mapping from Ray node ID to address, its node's server;
given a list, the one the actor's node is assigned (`addresses[hash(node) % len]`). The
other addresses are fallbacks for when that server goes away. Ray
schedules the actors, retries failed tasks and applies its own backpressure; Keel's cache
(with `cache.shared` in Redis) makes a text cost one embedding per fleet.
"""
from __future__ import annotations

import zlib
from typing import Mapping, Sequence, Union

import pyarrow as pa

from .client import KeelClient


class KeelEmbedder:
    """A callable class for `Dataset.map_batches(..., batch_format="pyarrow")`.

    addresses: Keel servers; None = the one on this actor's node, at `port`; a mapping
    {Ray node ID: address} = this node's entry first (Keel on each node at its own
    address, e.g. several nodes on one host).
    Other keyword arguments go to `KeelClient` (token, tls_root_certs, timeout,
    text_column, template, retries).
    """

    def __init__(self, addresses: Union[None, Sequence[str], Mapping[str, str]] = None, *,
                 port: int = 50051, scheme: str = "grpc", **client_kwargs):
        import ray

        node = ray.get_runtime_context().get_node_id()
        if addresses is None:
            ordered = [f"{scheme}://{ray.util.get_node_ip_address()}:{port}"]
        elif isinstance(addresses, Mapping):
            others = sorted(a for n, a in addresses.items() if n != node)
            ordered = ([addresses[node]] if node in addresses else []) + others
        else:
            listed = list(addresses)
            # A stable server per node, the rest as fallbacks.
            start = zlib.crc32(node.encode()) % len(listed)
            ordered = listed[start:] + listed[:start]
        if not ordered:
            raise ValueError("KeelEmbedder needs at least one address")
        self.addresses = ordered
        self.client = KeelClient(self.addresses, **client_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return batch
        # One stream per block, to this node's server (the others only on failure).
        return self.client._embed_slice(batch.to_batches(max_chunksize=self.client.batch_rows),
                                        self.client._command(None, None), 0)
