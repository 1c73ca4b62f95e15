"""TensorRT INT8 calibration caches (TensorRT 8.5 / 8.6 / 10.x only): read, write, and a calibrator that replays one.

The cache is a text file TensorRT itself writes and reads::

    TRT-8601-EntropyCalibration2
    input_ids: 3c010a14
    /decoder/layers.0/attn/Add_output_0: 3d7b2b1e

First line: ``TRT-<version digits>-<algorithm>``; then one ``tensor: <scale>`` line per tensor, the scale being the
8 hex digits of its big-endian IEEE float32 (the amax / 127 TensorRT quantizes with). The calibration step
(``rsvlm_edge.calibration``) writes caches in this format from sample tiles, so plans build on the device without
running calibration there; TensorRT 11 dropped calibrators altogether (explicit Q/DQ ONNX instead).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsvlm_edge.backends.trt_env import LazyModule, load_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = LazyModule(load_tensorrt)

ALGORITHM = "EntropyCalibration2"


class CalibrationCacheError(ValueError):
    """A calibration cache file is malformed."""


@dataclass
class CalibrationCache:
    header: str  # "TRT-8601-EntropyCalibration2"
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        return self.header.rsplit("-", 1)[-1]

    @property
    def version_tag(self) -> str:
        """The version digits TensorRT wrote ("8601" for 8.6.1), "" when the header has none."""
        parts = self.header.split("-")
        return parts[1] if len(parts) >= 3 else ""

    def to_text(self) -> str:
        lines = [self.header] + [f"{name}: {encode_scale(scale)}" for name, scale in self.scales.items()]
        return "\n".join(lines) + "\n"


def version_tag(trt_version: str) -> str:
    """TensorRT's own header tag, its NV_TENSORRT_VERSION: 8.6.1 -> "8601" (major*1000 + minor*100 + patch before
    TensorRT 10), 10.3.0 -> "100300" (major*10000 + minor*100 + patch from 10 on)."""
    major, minor, patch = (int(p) for p in (str(trt_version).split(".") + ["0", "0"])[:3])
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def header_for(trt_version: str, algorithm: str = ALGORITHM) -> str:
    return f"TRT-{version_tag(trt_version)}-{algorithm}"


def encode_scale(scale: float) -> str:
    return struct.pack(">f", float(scale)).hex()


def decode_scale(text: str) -> float:
    text = text.strip()
    if len(text) != 8:
        raise CalibrationCacheError(f"a scale must be 8 hex digits (big-endian float32), got {text!r}")
    try:
        return float(struct.unpack(">f", bytes.fromhex(text))[0])
    except ValueError:
        raise CalibrationCacheError(f"scale {text!r} is not hexadecimal") from None


def parse_cache(text: str, where: str = "calibration cache") -> CalibrationCache:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationCacheError(f"{where}: the first line must be TRT-<version>-<algorithm>, "
                                    f"got {lines[0] if lines else 'an empty file'!r}")
    cache = CalibrationCache(lines[0])
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")  # tensor names may contain ':'; the scale never does
        if not sep or not name.strip():
            raise CalibrationCacheError(f"{where} line {number}: expected 'tensor: <8 hex digits>', got {line!r}")
        try:
            cache.scales[name.strip()] = decode_scale(value)
        except CalibrationCacheError as exc:
            raise CalibrationCacheError(f"{where} line {number}: {exc}") from None
    return cache


def read_cache(path: str | Path) -> CalibrationCache:
    path = Path(path)
    try:
        return parse_cache(path.read_text(), where=str(path))
    except UnicodeDecodeError:
        raise CalibrationCacheError(f"{path} is not a text calibration cache") from None


def write_cache(path: str | Path, cache: CalibrationCache) -> Path:
    from rsvlm_edge.fileio import atomic_write_text

    atomic_write_text(path, cache.to_text())
    return Path(path)


def cache_for_component(calib_cache: str | Path, component: str) -> Path | None:
    """``calib_cache`` is one file (used for every component) or a folder of ``<component>.cache`` files."""
    path = Path(calib_cache)
    if path.is_dir():
        candidate = path / f"{component}.cache"
        return candidate if candidate.is_file() else None
    if not path.is_file():
        raise CalibrationCacheError(f"calibration cache {path} not found")
    return path


def make_cache_calibrator(cache: Path, batch_size: int = 1) -> trt.IInt8EntropyCalibrator2:
    """An ``IInt8EntropyCalibrator2`` that only replays ``cache``: ``get_batch`` returns None, so TensorRT never
    calibrates on the device and takes every scale from the file. The class is made here because it must subclass
    the installed TensorRT's calibrator type."""
    data = cache.read_bytes()
    parse_cache(data.decode("utf-8", errors="replace"), where=str(cache))  # fail early and clearly

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int]:
            return []  # "no more batches": TensorRT takes every scale from the cache

        def read_calibration_cache(self) -> bytes:
            return data

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return CacheCalibrator()
