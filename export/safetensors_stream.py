"""Safetensors files read and written one tensor (and one chunk) at a time, without torch.

The `safetensors` library loads or saves whole state dicts; a 3.3 GB checkpoint converted that way sits in memory
once as the source and once as the result. Here the header (8-byte little-endian length + JSON) is parsed and
checked against the file size, tensors are read by byte range, and the output is written as a header followed by
each tensor's bytes in order, so memory holds one chunk at a time. The files are the standard format: the
`safetensors` loaders (and ``load_model``) read what this writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

#: Element sizes of the dtypes a checkpoint may hold (the safetensors spelling).
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
FLOAT_DTYPES = ("BF16", "F16", "F32")
#: A header larger than this is not a model's (the real 861-tensor header is ~100 kB): refuse before reading it.
MAX_HEADER_BYTES = 100 << 20
#: Bytes converted per step: bounds the memory a conversion needs, whatever the tensor size.
CHUNK_BYTES = 16 << 20


class SafetensorsError(ValueError):
    """A file is not a readable safetensors file (truncated, malformed header, overlapping tensors)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``path`` and the absolute byte range ``[start, end)``."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_index(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` from a safetensors header; the data itself is not read.

    Refuses a file shorter than its header says (a truncated download), unknown dtypes, byte ranges that do not
    match dtype x shape, and overlapping ranges."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path} is not a safetensors file or is truncated (header claims {n} bytes, "
                                   f"the file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        info = TensorInfo(path, dtype, shape, base + int(begin), base + int(end))
        if min(shape, default=1) < 0 or info.end - info.start != info.numel * DTYPE_SIZES[dtype]:
            raise SafetensorsError(f"{path}: tensor {name!r} ({dtype} {list(shape)}) has a byte range of "
                                   f"{info.end - info.start} bytes")
        out[name] = info
    ranges = sorted((t.start, t.end, k) for k, t in out.items())
    for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
        if start_b < end_a:
            raise SafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap")
    last = max((t.end for t in out.values()), default=base)
    if last > size:
        raise SafetensorsError(f"{path} is truncated: its header needs {last:,} bytes, the file has {size:,}")
    return out


def read_chunks(fh: BinaryIO, info: TensorInfo, nbytes: int | None = None,
                chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The first ``nbytes`` (default: all) of a tensor's raw bytes, in chunks of at most ``chunk`` bytes (a
    multiple of the element size, so each chunk converts on its own)."""
    item = DTYPE_SIZES[info.dtype]
    chunk = max(item, chunk - chunk % item)
    pos, stop = info.start, info.start + (info.end - info.start if nbytes is None else nbytes)
    while pos < stop:
        data = os.pread(fh.fileno(), min(chunk, stop - pos), pos)
        if not data:
            raise SafetensorsError(f"{info.path} ended while reading (truncated while being read?)")
        pos += len(data)
        yield data


def to_float_array(data: bytes, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of a float dtype -> float32 (bf16 widened exactly by a 16-bit shift)."""
    if dtype == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == "F32":
        return np.frombuffer(data, dtype="<f4")
    raise SafetensorsError(f"cannot convert {dtype} data to float")


def from_float_array(values: np.ndarray, dtype: str) -> bytes:
    """float32 -> raw bytes of ``dtype``; BF16 rounds to nearest even, as torch's ``.to(torch.bfloat16)`` does."""
    if dtype == "F32":
        return values.astype("<f4", copy=False).tobytes()
    if dtype == "F16":
        with np.errstate(over="ignore"):  # values beyond float16 become inf; callers that care check for it
            return values.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = values.astype("<f4", copy=False).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = np.isnan(values)
        return np.where(nan, 0x7FC0, rounded).astype("<u2").tobytes()
    raise SafetensorsError(f"cannot write float data as {dtype}")


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: its name, dtype, shape, and a function yielding its bytes in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_SIZES[self.dtype]


def write_streamed(path: str | Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None,
                   progress: Callable[[OutputTensor], None] | None = None) -> int:
    """Write a safetensors file tensor by tensor; returns its size. Each tensor's chunks must add up to exactly its
    ``nbytes`` (checked: a mapping bug never writes a file whose header lies)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer pads
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for t in tensors:
            written = 0
            for data in t.chunks():
                fh.write(data)
                written += len(data)
            if written != t.nbytes:
                raise SafetensorsError(f"internal error: tensor {t.name} produced {written} bytes, expected {t.nbytes}")
            if progress is not None:
                progress(t)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()
