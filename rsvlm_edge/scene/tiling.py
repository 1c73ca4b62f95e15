"""Cutting a scene into tile windows: sizes and overlaps in pixels or metres, on the native grid or at a ``--gsd``.

A :class:`TileWindow` is always in the scene's native pixels (full resolution); how many pixels the model sees
for it (``read_size``) is a separate choice: the native pixels when they fit the model's input, else the model's
input size (GDAL averages on the read, so a 1024 px tile never sits in memory at full size).

Tiles step by ``tile - overlap``; the last row and column are shifted back to end on the scene's edge, so every
tile of a scene larger than one tile is whole and square (the model squares its input: a thin edge strip would
be stretched out of shape). A scene smaller than a tile is one tile, the whole scene.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any


class TilingError(ValueError):
    """A tile size, overlap or GSD that cannot cut this scene (one line naming the option)."""


@dataclass(frozen=True)
class TileWindow:
    """One tile: a window of the scene in native pixels; ``index`` is its place in row-major order."""

    index: int
    col_off: int
    row_off: int
    width: int
    height: int

    @property
    def id(self) -> str:
        """Stable across runs of the same plan: the GeoJSON ``tile_id`` and the resume journal's key."""
        return f"r{self.row_off:06d}_c{self.col_off:06d}"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TileWindow":
        return cls(int(d["index"]), int(d["col_off"]), int(d["row_off"]), int(d["width"]), int(d["height"]))

    def to_scene(self, u: float, v: float) -> tuple[float, float]:
        """A model answer's 0..100 units of this tile -> scene pixels (x, y)."""
        return self.col_off + u / 100.0 * self.width, self.row_off + v / 100.0 * self.height


@dataclass(frozen=True)
class Length:
    """A size as the user wrote it: ``128`` (pixels), ``1280m`` (metres) or, for an overlap, ``0.25`` (of a tile)."""

    value: float
    unit: str  # "px", "m" or "frac"

    def __str__(self) -> str:
        return {"px": f"{self.value:g} px", "m": f"{self.value:g} m", "frac": f"{self.value:g} of a tile"}[self.unit]


_LENGTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(px|m)?\s*$", re.IGNORECASE)


def parse_length(text: str | float | int, option: str, *, fraction: bool = False) -> Length:
    """``"128"``/``"128px"`` -> pixels, ``"1280m"`` -> metres; with ``fraction``, a bare number below 1 is a
    fraction of the tile (``--overlap 0.25``)."""
    match = _LENGTH.match(str(text))
    if not match:
        raise TilingError(f"{option} {text!r}: give pixels (128), metres (1280m)"
                          + (" or a fraction of the tile (0.25)" if fraction else ""))
    value, unit = float(match.group(1)), (match.group(2) or "").lower()
    if not math.isfinite(value):
        raise TilingError(f"{option} {text!r}: not a finite number")
    if not unit:
        unit = "frac" if fraction and value < 1 else "px"
    return Length(value, unit)


@dataclass(frozen=True)
class TilePlan:
    """The tiling of one scene: tile and step in native pixels (x, y), the size each tile is read at, the windows."""

    tile: tuple[int, int]
    step: tuple[int, int]
    read_size: tuple[int, int]
    windows: tuple[TileWindow, ...]

    def describe(self, res: tuple[float, float] | None, metres: bool) -> str:
        """``"2,500 tiles of 128x128 px (1280 m), overlap 32 px, read at 128x128"``."""
        width, height = self.windows[0].width, self.windows[0].height  # the tile, or a smaller whole scene
        size = f"{width}x{height} px"
        if res is not None and metres:
            size += f" ({width * res[0]:g} m)"
        overlap = (self.tile[0] - self.step[0], self.tile[1] - self.step[1])
        return (f"{len(self.windows):,} tile(s) of {size}, overlap {overlap[0]} px, "
                f"read at {self.read_size[0]}x{self.read_size[1]}")


def plan_tiles(width: int, height: int, *, model_size: int, tile: Length | None = None,
               overlap: Length | None = None, gsd: float | None = None,
               res: tuple[float, float] | None = None, metres: bool = False) -> TilePlan:
    """Tile a ``width x height`` scene. ``res``: the native pixel size (x, y) in CRS units, ``metres``: whether
    those units are metres (a projected CRS). ``tile`` (default: the model's input) is in pixels of the working grid
    (native, or ``gsd`` metres per pixel) or in metres; ``overlap`` (default none) likewise, or a fraction."""
    if gsd is not None:
        if not (math.isfinite(gsd) and gsd > 0):
            raise TilingError(f"--gsd {gsd!r}: give a positive size in metres per pixel")
        _need_metres("--gsd", res, metres)
    scale = _scales(gsd, res)  # native pixels per working pixel, (x, y)
    tile_px = _tile_px(tile or Length(model_size, "px"), scale, res, metres)
    over_px = _overlap_px(overlap or Length(0, "px"), tile_px, scale, res, metres)
    step = (tile_px[0] - over_px[0], tile_px[1] - over_px[1])
    if min(step) < 1:
        raise TilingError(f"--overlap {overlap}: must be smaller than the tile ({tile_px[0]} px)")
    cols = _starts(width, tile_px[0], step[0])
    rows = _starts(height, tile_px[1], step[1])
    windows = tuple(TileWindow(i * len(cols) + j, c, r, min(tile_px[0], width), min(tile_px[1], height))
                    for i, r in enumerate(rows) for j, c in enumerate(cols))
    working = (max(1, round(min(tile_px[0], width) / scale[0])), max(1, round(min(tile_px[1], height) / scale[1])))
    read = working
    if max(working) > model_size:  # larger than the model's input: read it at that size, aspect ratio kept
        k = model_size / max(working)
        read = (max(1, round(working[0] * k)), max(1, round(working[1] * k)))
    return TilePlan(tile_px, step, read, windows)


def _need_metres(option: str, res: tuple[float, float] | None, metres: bool) -> None:
    if res is None:
        raise TilingError(f"{option} in metres needs a georeferenced scene (this one has no CRS/transform); "
                          f"give pixels")
    if not metres:
        raise TilingError(f"{option} in metres needs a projected CRS in metres (this scene's CRS is in degrees or "
                          f"another unit); give pixels")


def _scales(gsd: float | None, res: tuple[float, float] | None) -> tuple[float, float]:
    if gsd is None or res is None:
        return 1.0, 1.0
    return gsd / res[0], gsd / res[1]


def _tile_px(tile: Length, scale: tuple[float, float], res: tuple[float, float] | None,
             metres: bool) -> tuple[int, int]:
    if tile.unit == "m":
        _need_metres("--tile", res, metres)
        assert res is not None
        px = (tile.value / res[0], tile.value / res[1])
    elif tile.unit == "px":
        px = (tile.value * scale[0], tile.value * scale[1])
    else:
        raise TilingError(f"--tile {tile}: give pixels or metres")
    out = (round(px[0]), round(px[1]))
    if min(out) < 1:
        raise TilingError(f"--tile {tile}: less than one pixel of the scene ({px[0]:.3g} px); give a larger tile")
    return out


def _overlap_px(overlap: Length, tile_px: tuple[int, int], scale: tuple[float, float],
                res: tuple[float, float] | None, metres: bool) -> tuple[int, int]:
    if overlap.value < 0:
        raise TilingError(f"--overlap {overlap}: must not be negative")
    if overlap.unit == "frac":
        return round(tile_px[0] * overlap.value), round(tile_px[1] * overlap.value)
    if overlap.unit == "m":
        _need_metres("--overlap", res, metres)
        assert res is not None
        return round(overlap.value / res[0]), round(overlap.value / res[1])
    return round(overlap.value * scale[0]), round(overlap.value * scale[1])


def _starts(length: int, tile: int, step: int) -> list[int]:
    """Tile offsets along one axis: every ``step``, the last one moved back to end on the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


__all__ = ["TileWindow", "TilePlan", "Length", "TilingError", "parse_length", "plan_tiles"]
