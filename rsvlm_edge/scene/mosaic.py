"""[SEG] answers of every tile stitched into one class-indexed GeoTIFF, written block by block.

The scene mask is never whole in memory: the GeoTIFF is cut into ``block`` x ``block`` internal tiles and each is
filled from the tile answers that cover it, then written through a rasterio window. Where tiles overlap, the
*centre-most* tile wins: a pixel takes the class of the covering tile whose centre is nearest, distances measured
in units of each tile's half-size (``(dx / (w/2))^2 + (dy / (h/2))^2``), ties to the tile first in row-major order.
On a regular grid these are rectangles cut at the middle of every overlap, so each pixel comes from the tile that
saw it with the most context around it; a tile that failed leaves its area to its neighbours, and what no tile
covers is nodata.

Class indices: 0 is the background (``others``), then the given class list, then any other label found, sorted.
The file keeps the scene's CRS and transform, carries a colour table (the palette of the per-tile PNG masks) and the
class names in its tags (``CLASSES``, a JSON list by index), and has ``mode`` overviews for GIS viewers.
A label whose score fails ``--min-score`` in a tile is written as background there.
"""

from __future__ import annotations

import json
import logging
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
from rsvlm_edge.scene.geometry import Feature, TileAnswer, TileMask, passes
from rsvlm_edge.scene.georef import GeoReference

BLOCK = 512  # GeoTIFF internal tile side: a multiple of 16, and the unit of work in RAM
#: GDAL's block cache while the mask is written: its default (5% of RAM) lets the overview pass hold most of a
#: 20,000^2 mask; blocks are written whole and read once in order, so a small cache costs no speed.
CACHE_MB = 64


def class_table(tiles: Sequence[TileAnswer], classes: Sequence[str] | None = None) -> list[str]:
    """Class names by index: the background, then ``classes`` in their order, then other labels found, sorted."""
    names = [formats.BACKGROUND] + [c for c in dict.fromkeys(classes or []) if c != formats.BACKGROUND]
    known = set(names)
    found = {label for t in tiles if t.mask is not None for label in t.mask.labels}
    return names + sorted(found - known)


def label_scores(tile: TileAnswer) -> dict[str, float | None]:
    """Each mask label's score in one tile: its own (``mask_label_scores``) or else the answer's."""
    result = tile.result or {}
    own = result.get("mask_label_scores") or {}
    answer = result.get("score")
    labels = tile.mask.labels if tile.mask is not None else ()
    return {lab: _float(own.get(lab, answer)) for lab in labels}


def write_class_mask(path: str | Path, tiles: Sequence[TileAnswer], georef: GeoReference, *,
                     classes: Sequence[str] | None = None, min_score: float | None = None,
                     tags: dict[str, str] | None = None, block: int = BLOCK, overviews: bool = True) -> dict[str, int]:
    """Write the stitched class-indexed mask of ``tiles`` (those with a mask) to ``path``; pixels per class back,
    in class-index order (so its keys are the class names by index).

    ``tags`` go into the file's metadata beside ``CLASSES`` (the run's task, model, engine).
    """
    if block % 16:
        raise ValueError(f"block must be a multiple of 16, got {block}")
    painted = sorted((t for t in tiles if t.mask is not None), key=_tile_order)
    names = class_table(painted, classes)
    dtype, nodata = ("uint8", 255) if len(names) <= 255 else ("uint16", 65535)
    if len(names) > 65535:
        raise ValueError(f"the scene mask has {len(names)} classes; a class-indexed GeoTIFF holds at most 65535")
    index = {name: i for i, name in enumerate(names)}
    grids = [_class_grid(t.mask, label_scores(t), index, min_score, dtype) for t in painted if t.mask is not None]
    with atomic_path(path) as tmp, rasterio.Env(GDAL_CACHEMAX=CACHE_MB):
        with rasterio.open(tmp, "w", **_profile(georef, dtype, nodata, block)) as dst:
            pixels = _write_blocks(dst, painted, grids, nodata, block)
            _write_legend(dst, names, nodata, tags or {})
        if overviews:
            _build_overviews(tmp, georef, block)
    return dict(zip(names, (int(n) for n in pixels[:len(names)])))


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
    painted = [t for t in tiles if t.mask is not None]
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


# --------------------------------------------------------------------------------------------------- writing

def _profile(georef: GeoReference, dtype: str, nodata: int, block: int) -> dict[str, Any]:
    """GeoTIFF creation options: the scene's grid, internal tiles of ``block``, deflate, BigTIFF past 4 GB."""
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": georef.width, "height": georef.height, "count": 1, "dtype": dtype,
        "nodata": nodata, "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    if georef.georeferenced:
        profile.update(crs=georef.crs, transform=georef.transform)
    return profile


def _write_blocks(dst: Any, tiles: Sequence[TileAnswer], grids: Sequence[np.ndarray], nodata: int,
                  block: int) -> np.ndarray:
    """Paint and write the mask block by block, row-major; pixels per class index back."""
    buckets = _by_block(tiles, block)
    pixels = np.zeros(nodata + 1, dtype=np.int64)
    for by in range(0, dst.height, block):
        for bx in range(0, dst.width, block):
            window = Window(bx, by, min(block, dst.width - bx), min(block, dst.height - by))
            members = buckets.get((by // block, bx // block), [])
            values = _paint(window, [tiles[i] for i in members], [grids[i] for i in members], nodata,
                            dst.dtypes[0])
            pixels += np.bincount(values[values != nodata].ravel(), minlength=nodata + 1)
            dst.write(values, 1, window=window)
    return pixels


def _write_legend(dst: Any, names: Sequence[str], nodata: int, tags: dict[str, str]) -> None:
    """Colour table (transparent nodata), band description and the class names (``CLASSES``) with ``tags``."""
    palette = class_palette(len(names))
    colours = {i: (*palette[3 * i:3 * i + 3], 255) for i in range(len(names))}
    colours[nodata] = (0, 0, 0, 0)
    dst.write_colormap(1, colours)
    dst.set_band_description(1, "class index (names in the CLASSES tag)")
    dst.update_tags(CLASSES=json.dumps(list(names)), **tags)


def _build_overviews(path: Path, georef: GeoReference, block: int) -> None:
    """Internal ``mode`` overviews (class indices must not be averaged) down to one block.

    GDAL computes each level from the one above, whose band has no colour table of its own, and logs "Computing
    overviews on palette index raster bands without a palette" for every level; with mode resampling that is
    harmless (the values stay class indices), so that one message is filtered out while the overviews are built.
    """
    factors = _overview_factors(georef.width, georef.height, block)
    if not factors:
        return
    log = logging.getLogger("rasterio._env")
    quiet = _DropMessage("palette index raster bands without a palette")
    log.addFilter(quiet)
    try:
        with rasterio.open(path, "r+") as dst:
            dst.build_overviews(factors, Resampling.mode)
            dst.update_tags(ns="rio_overview", resampling="mode")
    finally:
        log.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# --------------------------------------------------------------------------------------------------- painting

def _tile_order(tile: TileAnswer) -> tuple[int, int]:
    return tile.row_off, tile.col_off


def _class_grid(mask: TileMask, scores: dict[str, float | None], index: dict[str, int],
                min_score: float | None, dtype: str) -> np.ndarray:
    """A tile's 24x24 mask as scene class indices; labels failing ``min_score`` become the background."""
    lookup = [0] + [index[lab] if passes(scores[lab], min_score) else 0 for lab in mask.labels]
    return np.array(lookup, dtype=dtype)[mask.cells]


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
    """(len(ys), len(xs)) squared distance of pixel centres to the tile's centre, in units of its half-size."""
    half_w, half_h = tile.width / 2.0, tile.height / 2.0
    dx = (xs + 0.5 - (tile.col_off + half_w)) / half_w
    dy = (ys + 0.5 - (tile.row_off + half_h)) / half_h
    return dy[:, None] ** 2 + dx[None, :] ** 2


def _owner(point: shapely.Point, tiles: Sequence[TileAnswer]) -> str:
    """The id of the tile that owns ``point``'s pixel under the centre-most rule ("" when none covers it)."""
    x, y = int(np.floor(point.x)), int(np.floor(point.y))
    best, owner = np.inf, ""
    for tile in sorted(tiles, key=_tile_order):
        if tile.col_off <= x < tile.col_off + tile.width and tile.row_off <= y < tile.row_off + tile.height:
            d = float(_centre_distance(tile, np.array([x]), np.array([y]))[0, 0])
            if d < best:
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
