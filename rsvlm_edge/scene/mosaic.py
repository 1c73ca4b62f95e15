"""[SEG] answers of every tile stitched into one class-indexed GeoTIFF, written block by block.

The scene mask is never whole in memory: the GeoTIFF is cut into ``block`` x ``block`` internal tiles and each is
filled from the tile answers that cover it, then written through a rasterio window. Where tiles overlap, the
*centre-most* tile wins: a pixel takes the class of the covering tile whose centre is nearest in units of that
tile's half-size (L-infinity: ``max(|dx| / (w/2), |dy| / (h/2))``), ties to the lower tile index. On a regular grid
this cuts every overlap at its middle, the part of a tile the model saw with the most context; a tile that failed
leaves its area to its neighbours, and what no tile covers is nodata.

Class indices: 0 is the background (``others``), then the given class list, then any other label found, sorted.
The file keeps the scene's CRS and transform, carries a colour table (the palette of the per-tile PNG masks) and the
class names in its tags (``CLASSES``, a JSON list by index), and has ``mode`` overviews for GIS viewers.
A label whose score fails ``--min-score`` in a tile is written as background there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.features import shapes
from rasterio.transform import Affine
from rasterio.windows import Window
from shapely.geometry import shape

from rsvlm_edge import formats
from rsvlm_edge.fileio import atomic_path
from rsvlm_edge.results import class_palette
from rsvlm_edge.scene.geometry import Feature, TileAnswer, passes
from rsvlm_edge.scene.georef import GeoReference

BLOCK = 512  # GeoTIFF internal tile side: a multiple of 16, and the unit of work in RAM


def class_table(tiles: Sequence[TileAnswer], classes: Sequence[str] | None = None) -> list[str]:
    """Class names by index: the background, then ``classes`` in their order, then other labels found, sorted."""
    names = [formats.BACKGROUND] + [c for c in dict.fromkeys(classes or []) if c != formats.BACKGROUND]
    known = set(names)
    found = {cell for t in tiles if t.grid is not None for row in t.grid for cell in row}
    return names + sorted(found - known)


def label_scores(tile: TileAnswer) -> dict[str, float | None]:
    """Each mask label's score in one tile: its own (``mask_label_scores``) or else the answer's."""
    result = tile.result or {}
    own = result.get("mask_label_scores") or {}
    answer = result.get("score")
    labels = formats.grid_labels(tile.grid) if tile.grid is not None else []
    return {lab: _float(own.get(lab, answer)) for lab in labels}


def write_class_mask(path: str | Path, tiles: Sequence[TileAnswer], georef: GeoReference, *,
                     classes: Sequence[str] | None = None, min_score: float | None = None,
                     tags: dict[str, str] | None = None, block: int = BLOCK, overviews: bool = True) -> dict[str, int]:
    """Write the stitched class-indexed mask of ``tiles`` (those with a ``grid``) to ``path``; pixels per class back,
    in class-index order (so its keys are the class names by index).

    ``tags`` go into the file's metadata beside ``CLASSES`` (the run's task, model, engine).
    """
    if block % 16:
        raise ValueError(f"block must be a multiple of 16, got {block}")
    painted = sorted((t for t in tiles if t.grid is not None), key=_tile_order)
    names = class_table(painted, classes)
    dtype, nodata = ("uint8", 255) if len(names) <= 255 else ("uint16", 65535)
    if len(names) > 65535:
        raise ValueError(f"the scene mask has {len(names)} classes; a class-indexed GeoTIFF holds at most 65535")
    index = {name: i for i, name in enumerate(names)}
    grids = [_class_grid(t.grid, label_scores(t), index, min_score, dtype) for t in painted if t.grid is not None]
    buckets = _by_block(painted, block)
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": georef.width, "height": georef.height, "count": 1, "dtype": dtype,
        "nodata": nodata, "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if georef.georeferenced:
        profile.update(crs=georef.crs, transform=georef.transform)
    pixels = np.zeros(len(names), dtype=np.int64)
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for by in range(0, georef.height, block):
            for bx in range(0, georef.width, block):
                window = Window(bx, by, min(block, georef.width - bx), min(block, georef.height - by))
                members = buckets.get((by // block, bx // block), [])
                values = _paint(window, [painted[i] for i in members], [grids[i] for i in members], nodata, dtype)
                pixels += np.bincount(values[values != nodata].ravel(), minlength=len(names))[:len(names)]
                dst.write(values, 1, window=window)
        palette = class_palette(len(names))
        colours = {i: (*palette[3 * i:3 * i + 3], 255) for i in range(len(names))}
        colours[nodata] = (0, 0, 0, 0)
        dst.write_colormap(1, colours)
        dst.set_band_description(1, "class index (names in the CLASSES tag)")
        dst.update_tags(CLASSES=json.dumps(names), **(tags or {}))
        if overviews:
            factors = _overview_factors(georef.width, georef.height, block)
            if factors:
                dst.build_overviews(factors, Resampling.mode)
                dst.update_tags(ns="rio_overview", resampling="mode")
    return dict(zip(names, (int(n) for n in pixels)))


def read_class_names(path: str | Path) -> list[str]:
    """The class names a mask written by :func:`write_class_mask` carries."""
    with rasterio.open(path) as src:
        return list(json.loads(src.tags()["CLASSES"]))


def vectorise_mask(path: str | Path, tiles: Sequence[TileAnswer], *, task: str = "[SEG]",
                   strip: int = 1024) -> list[Feature]:
    """The mask's class regions as polygons in scene pixels, one feature per connected region (background and
    nodata left out), read ``strip`` rows at a time and joined across strips.

    A region's score is the mean score of its label in the tiles it overlaps; its ``tile_id`` is the tile that owns
    its representative point under the centre-most rule, and ``properties["tiles"]`` counts the tiles it spans.
    """
    names = read_class_names(path)
    pieces: dict[int, list[shapely.Geometry]] = defaultdict(list)
    with rasterio.open(path) as src:
        nodata = src.nodata
        for row in range(0, src.height, strip):
            window = Window(0, row, src.width, min(strip, src.height - row))
            values = src.read(1, window=window)
            keep = (values != 0) & (values != nodata)
            for geom, value in shapes(values, mask=keep, transform=Affine.translation(0, row)):
                pieces[int(value)].append(shape(geom))
    painted = [t for t in tiles if t.grid is not None]
    footprints = shapely.STRtree([t.footprint for t in painted])
    scores = [label_scores(t) for t in painted]
    out: list[Feature] = []
    for value in sorted(pieces):
        label = names[value]
        for region in shapely.get_parts(shapely.coverage_union_all(pieces[value])):
            over = sorted(int(i) for i in footprints.query(region, predicate="intersects"))
            known = [s for i in over if (s := scores[i].get(label)) is not None]
            owner = _owner(region.representative_point(), [painted[i] for i in over])
            out.append(Feature(region, task, label, float(np.mean(known)) if known else None, owner, "mask",
                               {"tiles": len(over)}))
    return out


# --------------------------------------------------------------------------------------------------- painting

def _tile_order(tile: TileAnswer) -> tuple[int, int]:
    return tile.row_off, tile.col_off


def _class_grid(grid: list[list[str]], scores: dict[str, float | None], index: dict[str, int],
                min_score: float | None, dtype: str) -> np.ndarray:
    """A tile's 24x24 grid as scene class indices; labels failing ``min_score`` become the background."""
    lookup = {lab: (index[lab] if passes(score, min_score) else 0) for lab, score in scores.items()}
    return np.array([[lookup.get(cell, 0) for cell in row] for row in grid], dtype=dtype)


def _by_block(tiles: Sequence[TileAnswer], block: int) -> dict[tuple[int, int], list[int]]:
    """{(block row, block col): indices of the tiles covering part of that block}, in tile order."""
    out: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, t in enumerate(tiles):
        for by in range(t.row_off // block, (t.row_off + t.height - 1) // block + 1):
            for bx in range(t.col_off // block, (t.col_off + t.width - 1) // block + 1):
                out[(by, bx)].append(i)
    return out


def _paint(window: Window, tiles: Sequence[TileAnswer], grids: Sequence[np.ndarray], nodata: int,
           dtype: str) -> np.ndarray:
    """One block of the scene mask: each pixel from the centre-most covering tile (module docstring)."""
    x0, y0, w, h = int(window.col_off), int(window.row_off), int(window.width), int(window.height)
    out = np.full((h, w), nodata, dtype=dtype)
    best = np.full((h, w), np.inf)
    for tile, grid in zip(tiles, grids):
        ix0, ix1 = max(x0, tile.col_off), min(x0 + w, tile.col_off + tile.width)
        iy0, iy1 = max(y0, tile.row_off), min(y0 + h, tile.row_off + tile.height)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        dist = _centre_distance(tile, np.arange(ix0, ix1), np.arange(iy0, iy1))
        region = np.s_[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        wins = dist < best[region]
        values = formats.upsample_grid_mask(grid, tile.height, tile.width)[
            iy0 - tile.row_off:iy1 - tile.row_off, ix0 - tile.col_off:ix1 - tile.col_off]
        out[region][wins] = values[wins]
        best[region][wins] = dist[wins]
    return out


def _centre_distance(tile: TileAnswer, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) L-infinity distance of pixel centres to the tile's centre, in units of its half-size."""
    half_w, half_h = tile.width / 2.0, tile.height / 2.0
    dx = np.abs(xs + 0.5 - (tile.col_off + half_w)) / half_w
    dy = np.abs(ys + 0.5 - (tile.row_off + half_h)) / half_h
    return np.maximum(dy[:, None], dx[None, :])


def _owner(point: shapely.Point, tiles: Sequence[TileAnswer]) -> str:
    """The id of the tile that owns ``point`` under the centre-most rule ("" when none covers it)."""
    best, owner = np.inf, ""
    for tile in tiles:
        d = float(_centre_distance(tile, np.array([np.floor(point.x)]), np.array([np.floor(point.y)]))[0, 0])
        if d <= 1.0 and d < best:
            best, owner = d, tile.tile_id
    return owner


def _overview_factors(width: int, height: int, block: int) -> list[int]:
    """2, 4, 8 ... until the smallest overview fits one block."""
    factors, f = [], 2
    while max(width, height) / (f // 2) > block:
        factors.append(f)
        f *= 2
    return factors


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
