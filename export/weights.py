"""Weight bytes: materialise :class:`WeightRef` s from the torch model and write ONNX external-data files.

Layout of every ``.bin``: tensors back to back in the order given, each at an offset aligned to 64 bytes (4 KiB
for tensors of 1 MiB or more, so a runtime can memory-map them page-aligned), raw little-endian C-order data.
The layout is recorded in the graph's initializers (ONNX ``external_data`` location/offset/length) and in the
manifest, so a runtime can map a tensor without parsing the graph.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from rsvlm_edge.export.graph import Graph, WeightRef
from rsvlm_edge.manifest import TensorLayout

SMALL_ALIGN = 64
PAGE_ALIGN = 4096
PAGE_ALIGN_FROM = 1 << 20

ParamLookup = Callable[[str], Any]  # state-dict name -> torch tensor


def materialize(ref: WeightRef, lookup: ParamLookup, source: str | None = None) -> np.ndarray:
    """``transform(param)`` as a contiguous array of ``ref.dtype`` (``source`` overrides the parameter name)."""
    import torch

    tensor = lookup(source or ref.source)
    with torch.no_grad():
        t = tensor.detach()
        if t.dtype != torch.float32:
            t = t.float()
        if ref.perm is not None:
            t = t.permute(*ref.perm)
        array = t.contiguous().numpy()
    if tuple(array.shape) != tuple(ref.shape):
        raise ValueError(f"parameter {source or ref.source} gives shape {array.shape}, the graph expects {ref.shape}")
    return np.ascontiguousarray(array.astype(ref.dtype, copy=False))


class DataFileWriter:
    """Append tensors to one external-data file, hashing as it goes. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.digest = hashlib.sha256()
        self.layout: dict[str, TensorLayout] = {}
        self._fh = open(self.path, "wb")

    def _write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self.digest.update(data)
        self.offset += len(data)

    def add(self, name: str, array: np.ndarray) -> TensorLayout:
        align = PAGE_ALIGN if array.nbytes >= PAGE_ALIGN_FROM else SMALL_ALIGN
        pad = (-self.offset) % align
        if pad:
            self._write(b"\0" * pad)
        entry = TensorLayout(offset=self.offset, length=int(array.nbytes), dtype=str(array.dtype), shape=list(array.shape))
        if not array.flags.c_contiguous or array.dtype.byteorder == ">":
            array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<")))
        self._write(array.data.cast("B"))
        self.layout[name] = entry
        return entry

    def close(self) -> tuple[str, int]:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self.digest.hexdigest(), self.offset

    def __enter__(self) -> "DataFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._fh.closed:
            self._fh.close()


def point_to_external(graph: Graph, layouts: dict[str, tuple[str, TensorLayout]]) -> None:
    """Make each weight initializer reference ``layouts[name] = (file, its offset and length there)``."""
    for init in graph.graph.initializer:
        if init.name not in graph.weights:
            continue
        file, entry = layouts[init.name]
        init.ClearField("raw_data")
        del init.external_data[:]
        for key, value in (("location", file), ("offset", str(entry.offset)), ("length", str(entry.length))):
            init.external_data.add(key=key, value=value)
        init.data_location = onnx.TensorProto.EXTERNAL


def write_graph(graph: Graph, path: str | Path) -> tuple[str, int]:
    """Serialise the (weightless) graph; returns (sha256, size)."""
    data = graph.model.SerializeToString()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest(), len(data)
