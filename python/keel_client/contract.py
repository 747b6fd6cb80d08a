"""Keel's client contract, mirrored from the server's `keel_wire::contract` (Rust): the
stream descriptors, the actions' names and bodies, and the `DoPut` acknowledgement.

Bodies are JSON with unknown keys refused by the server, so only the fields below exist;
a field left `None` is not sent (the server's default applies).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import pyarrow.flight as flight

#: Every action the server answers (`ListActions` names the same ones).
ACTIONS = ("stats", "cleanup", "health", "search", "heap-profile", "index", "reduce")


def _json(obj: Any) -> bytes:
    return json.dumps({k: v for k, v in asdict(obj).items() if v is not None}).encode()


@dataclass(frozen=True)
class EmbedCommand:
    """Which text each row is embedded as, and how its vector is written."""

    text_column: Optional[str] = None
    template: Optional[str] = None
    precision: Optional[str] = None  # f32 | f16 | int8 | binary
    dimensions: Optional[int] = None
    projection: Optional[str] = None  # "DATASET/NAME", fitted by the reduce action
    # DoPut only: the rows the dataset must hold when the stream's first part is written.
    expect_rows: Optional[int] = None

    def __post_init__(self) -> None:
        if self.text_column and self.template:
            raise ValueError("text_column or template, not both")
        if self.projection and self.dimensions:
            raise ValueError("dimensions or projection, not both")

    def to_json(self) -> bytes:
        return _json(self)

    def is_default(self) -> bool:
        return self == EmbedCommand()


def embed_descriptor(command: EmbedCommand) -> flight.FlightDescriptor:
    """A DoExchange that sends rows back with their vectors."""
    return flight.FlightDescriptor.for_command(command.to_json())


def dataset_descriptor(name: str, command: EmbedCommand) -> flight.FlightDescriptor:
    """A DoPut into dataset `name`. pyarrow's descriptors carry a path or a command, not
    both, so the command rides as the path's third part."""
    path = ["datasets", name] + ([] if command.is_default() else [command.to_json().decode()])
    return flight.FlightDescriptor.for_path(*path)


@dataclass(frozen=True)
class PutAck:
    """The `app_metadata` of each `PutResult`: rows of this stream on disk so far, and
    rows of the dataset on disk."""

    acknowledged_rows: int
    dataset_rows: int

    @staticmethod
    def parse(metadata: bytes) -> "PutAck":
        d = json.loads(metadata)
        return PutAck(acknowledged_rows=d["acknowledged_rows"], dataset_rows=d["dataset_rows"])


@dataclass(frozen=True)
class SearchRequest:
    dataset: str
    text: str
    k: int = 10
    mode: Optional[str] = None  # auto | exact | index
    rescore: Optional[int] = None
    expansion: Optional[int] = None

    def to_json(self) -> bytes:
        return _json(self)


@dataclass(frozen=True)
class IndexRequest:
    dataset: str
    quantization: Optional[str] = None  # f32 | f16 | int8 | binary
    projection: Optional[str] = None
    connectivity: Optional[int] = None
    expansion_add: Optional[int] = None
    expansion_search: Optional[int] = None
    rescore: Optional[int] = None

    def to_json(self) -> bytes:
        return _json(self)


@dataclass(frozen=True)
class ReduceRequest:
    dataset: str
    dimensions: int
    name: Optional[str] = None

    def to_json(self) -> bytes:
        return _json(self)


@dataclass(frozen=True)
class CleanupRequest:
    level: Optional[str] = None  # trim | gentle | full

    def to_json(self) -> bytes:
        return _json(self)


def body(request: Any) -> Dict[str, Any]:
    """A request as the dict `KeelClient.action` sends."""
    return json.loads(request.to_json())
