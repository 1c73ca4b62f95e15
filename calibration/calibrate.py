"""`calibrate`: sample tiles -> activation ranges -> INT8 Q/DQ engine dir (+ table + TensorRT caches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsvlm_edge.calibration.collect import measure, record
from rsvlm_edge.calibration.int8_writer import keep_fp32_predicate, write_int8_engine
from rsvlm_edge.calibration.samples import calibration_requests, find_tiles
from rsvlm_edge.calibration.table import DEFAULT_TRT_VERSION, TABLE_FILE, TRT_CACHE_DIR, table_text, trt_cache_texts
from rsvlm_edge.manifest import Manifest


def run_calibration(onnx_dir: str | Path, tiles: list[str | Path], method: str = "entropy", limit: int | None = 32,
                    sensor: str | None = None, decode_steps: int = 4, threads: int | None = None,
                    keep_lm_head: bool = False, percentile: float = 99.99,
                    progress: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Activation amax per component/tensor from real tiles and every task's instruction; returns (table, meta)."""
    from tqdm import tqdm

    manifest = Manifest.load(onnx_dir, verify="size")
    files = find_tiles(list(tiles), limit)
    requests = calibration_requests(files, manifest.config(), sensor)
    with tqdm(total=len(requests), desc="calibrate: run", unit="req", disable=not progress, dynamic_ncols=True) as bar:
        recording = record(onnx_dir, requests, decode_steps=decode_steps, threads=threads, progress=bar.update)
    passes = 1 if method == "minmax" else 2
    total = passes * sum(len(f) for f in recording.feeds.values())
    with tqdm(total=total, desc=f"calibrate: {method}", unit="feed", disable=not progress, dynamic_ncols=True) as bar:
        table = measure(onnx_dir, recording, method, keep_fp32_predicate(keep_lm_head), threads, percentile, bar.update)
    meta = {"method": method, "tiles": len(files), "requests": len(requests), "decode_steps": decode_steps,
            "percentile": percentile if method == "percentile" else None,
            "feeds": {c: len(f) for c, f in recording.feeds.items()}}
    return table, meta


def calibration_files(table: dict[str, dict[str, float]], meta: dict[str, Any],
                      trt_version: str = DEFAULT_TRT_VERSION) -> dict[str, bytes]:
    """The table and one TensorRT cache per component, as files for the engine dir."""
    files = {TABLE_FILE: table_text(table, **meta).encode()}
    for comp, text in trt_cache_texts(table, trt_version).items():
        files[f"{TRT_CACHE_DIR}/{comp}.cache"] = text.encode()
    return files


def calibrate(onnx_dir: str | Path, tiles: list[str | Path], out_dir: str | Path, method: str = "entropy",
              limit: int | None = 32, act_dtype: str = "uint8", trt_version: str = DEFAULT_TRT_VERSION,
              overwrite: bool = False, **options: Any) -> Manifest:
    table, meta = run_calibration(onnx_dir, tiles, method, limit, **options)
    files = calibration_files(table, meta, trt_version)
    return write_int8_engine(onnx_dir, out_dir, table, act_dtype=act_dtype, keep_lm_head=options.get("keep_lm_head", False),
                             overwrite=overwrite, extra_files=files,
                             info={"calibration": {**meta, "table": TABLE_FILE, "trt_cache_dir": TRT_CACHE_DIR}})
