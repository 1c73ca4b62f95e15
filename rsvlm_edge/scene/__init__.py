"""Whole georeferenced scenes: tiled inference, merging across tiles, GeoJSON and GeoTIFF outputs.

>>> from rsvlm_edge import Pipeline
>>> from rsvlm_edge.scene import run_scene
>>> with Pipeline("models/tiny-demo") as pipe:                              # doctest: +SKIP
...     run = run_scene(pipe, "scene.tif", "out/", task="det", overlap="0.25")
...     run.summary["counts"], run.summary["outputs"]["objects"]

``scene`` may also be band files (``["B04.tif", "B03.tif", "B02.tif"]``), a folder of them with ``bands="s2-l2a"``,
or a before/after pair (``task="ccd"``, or ``pair=True``). See :mod:`rsvlm_edge.scene.source` (input),
:mod:`rsvlm_edge.scene.tiling`, :mod:`rsvlm_edge.scene.runner` (the tile loop, resume journal and executor seam)
and :mod:`rsvlm_edge.scene.outputs`.
"""

from __future__ import annotations

from rsvlm_edge.scene.runner import Executor, LocalExecutor, SceneOptions, SceneRun, TileJob, TileRecord, run_scene, run_tiles
from rsvlm_edge.scene.source import LAYOUTS, SceneError, SceneSource, SceneSpec, open_scene, resolve_scene
from rsvlm_edge.scene.tiling import TileWindow, TilingError, plan_tiles

__all__ = ["run_scene", "run_tiles", "SceneOptions", "SceneRun", "TileJob", "TileRecord", "Executor",
           "LocalExecutor", "resolve_scene", "open_scene", "SceneSpec", "SceneSource", "SceneError", "LAYOUTS",
           "TileWindow", "TilingError", "plan_tiles"]
