"""`rsvlm-edge scene-bench`: tiles/s and peak memory of a scene run on a large synthetic GeoTIFF.

The scene (a projected CRS, 10 m pixels, ``uint16`` bands: a smooth field with bright rectangles and noise) is
written block by block as a tiled, Deflate-compressed GeoTIFF, so writing it needs no more memory than reading it.
Peak memory is the process's peak resident set (``getrusage``), writing and the whole run included: what a ground
station has to provision for this scene size, model and batch.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

BLOCK = 512


def write_synthetic_scene(path: str | Path, size: int, bands: int = 3, seed: int = 0) -> Path:
    """A ``size x size`` ``uint16`` GeoTIFF (EPSG:32633, 10 m), written one 512 px block at a time."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from rsvlm_edge.fileio import atomic_path

    path = Path(path)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": bands, "dtype": "uint16",
               "crs": "EPSG:32633", "transform": from_origin(500000.0, 5400000.0, 10.0, 10.0), "tiled": True,
               "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate", "predictor": 2, "BIGTIFF": "IF_SAFER"}
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, BLOCK):
            for col in range(0, size, BLOCK):
                w, h = min(BLOCK, size - col), min(BLOCK, size - row)
                dst.write(_block(rng, col, row, w, h, bands), window=Window(col, row, w, h))
    return path


def _block(rng: np.random.Generator, col: int, row: int, w: int, h: int, bands: int) -> np.ndarray:
    """One block: a slowly varying field (fields, water) plus a few bright rectangles (buildings) and noise."""
    y, x = np.mgrid[row:row + h, col:col + w].astype(np.float32)
    field = 1500 + 700 * np.sin(x / 700.0) * np.cos(y / 900.0)
    out = np.empty((bands, h, w), dtype=np.uint16)
    for b in range(bands):
        out[b] = np.clip(field * (0.8 + 0.1 * b) + rng.normal(0, 40, (h, w)), 0, 65535)
    for _ in range(int(rng.integers(2, 8))):
        bw, bh = (int(v) for v in rng.integers(6, 40, 2))
        bx, by = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
        out[:, by:by + bh, bx:bx + bw] = rng.integers(4000, 9000)
    return out


def peak_rss_mb() -> float:
    """The process's peak resident set so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def run_bench(model_dir: str | Path, *, size: int = 20000, bands: int = 3, tiles: int | None = 256,
              task: str = "cls", batch_size: int = 8, scene_path: str | Path | None = None,
              threads: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write (or reuse) the synthetic scene, run ``task`` over its first ``tiles`` tiles (None: all) and report
    tiles/s and the peak RSS."""
    import rasterio

    from rsvlm_edge.machine import cpu_description
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.scene.runner import SceneOptions, run_scene

    say = log or (lambda line: print(line, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="scene-bench-") as tmp:
        path = Path(scene_path) if scene_path else Path(tmp) / f"synthetic_{size}.tif"
        reuse = False
        if path.is_file():
            with rasterio.open(path) as ds:
                reuse = (ds.width, ds.height, ds.count) == (size, size, bands)
        t0 = time.perf_counter()
        if not reuse:
            say(f"writing a {size}x{size} {bands}-band uint16 scene to {path} ...")
            write_synthetic_scene(path, size, bands)
        write_s, write_rss = time.perf_counter() - t0, peak_rss_mb()
        with Pipeline(model_dir, threads=threads) as pipe:
            run = run_scene(pipe, str(path), Path(tmp) / "out",
                            SceneOptions(task=task, batch_size=batch_size, max_tiles=tiles, resume=False),
                            log=say)
            used_threads = getattr(pipe.backend, "threads", None)
    return {"scene": f"{size}x{size}x{bands} uint16", "tiles": run.ran, "tiles_planned": run.planned,
            "task": task, "batch_size": batch_size, "seconds": round(run.seconds, 3),
            "tiles_per_s": round(run.tiles_per_second, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_after_write_mb": round(write_rss, 1), "write_s": round(write_s, 1), "threads": used_threads,
            "cpu": cpu_description(), "model": str(model_dir)}


__all__ = ["run_bench", "write_synthetic_scene", "peak_rss_mb"]
