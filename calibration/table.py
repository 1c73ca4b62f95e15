"""The calibration table (JSON, per component per tensor amax) and TensorRT calibration caches made from it.

Why both: the table is the portable record (the INT8 Q/DQ graphs are rebuilt from it without re-running
calibration); TensorRT 8.5 / 8.6 / 10.x implicit-INT8 builds read scales (amax / 127) from a cache instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvlm_edge.fileio import atomic_write_text

TABLE_FORMAT = 1
TABLE_FILE = "calibration.json"
TRT_CACHE_DIR = "trt_calib"
DEFAULT_TRT_VERSION = "8.6.1"


class CalibrationTableError(ValueError):
    """A calibration table is missing or malformed."""


def table_text(table: dict[str, dict[str, float]], **meta: Any) -> str:
    data = {"format": TABLE_FORMAT, **meta, "amax": {c: {t: float(v) for t, v in ts.items()} for c, ts in table.items()}}
    return json.dumps(data, indent=1) + "\n"


def save_table(path: str | Path, table: dict[str, dict[str, float]], **meta: Any) -> Path:
    atomic_write_text(path, table_text(table, **meta))
    return Path(path)


def load_table(path: str | Path) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """(component -> tensor -> amax, the other fields)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationTableError(f"calibration table {path} not found (write one with `rsvlm-edge calibrate`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationTableError(f"{path} is not a JSON calibration table: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("amax"), dict):
        raise CalibrationTableError(f"{path} is not a calibration table of format {TABLE_FORMAT} (needs 'format' and 'amax')")
    table = {}
    for comp, tensors in data["amax"].items():
        if not isinstance(tensors, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in tensors.values()):
            raise CalibrationTableError(f"{path}: amax of {comp!r} must map tensor names to non-negative numbers")
        table[comp] = {t: float(v) for t, v in tensors.items()}
    return table, {k: v for k, v in data.items() if k != "amax"}


def trt_cache_texts(table: dict[str, dict[str, float]], trt_version: str = DEFAULT_TRT_VERSION) -> dict[str, str]:
    """component -> TensorRT cache text (``TRT-<version>-EntropyCalibration2`` + ``tensor: <hex scale>`` lines)."""
    from rsvlm_edge.engines.trt_calib import CalibrationCache, header_for

    return {comp: CalibrationCache(header_for(trt_version), {t: max(a, 1e-8) / 127.0 for t, a in tensors.items()}).to_text()
            for comp, tensors in table.items()}
