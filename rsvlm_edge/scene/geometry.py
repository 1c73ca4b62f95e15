"""Per-tile answers -> features in scene pixels: the geometry every scene output is built from.

A tile record is what the tile loop journals for one tile, JSON-ready (a mapping, or an object with ``to_dict()``):

- ``window``: the tile's place in the scene (a ``TileWindow`` or a mapping with ``col_off``, ``row_off``, ``width``,
  ``height``), in full-resolution scene pixels;
- ``tile_id`` (optional; else the window's ``id``): the id every feature of the tile carries;
- ``image_size`` (optional; else the window's size): ``[width, height]`` of the image the model saw, which differs
  from the window when the tile was resampled (``--gsd``);
- ``result``: :meth:`rsvlm_edge.results.Result.to_dict` of the answer, or None for a tile that failed;
- ``grid`` (``[SEG]`` only): the 24x24 label grid of the answer; read into a compact :class:`TileMask` (a scene
  of 40,000 tiles would otherwise hold 23 million label strings).

Scene pixels are x right, y down, with pixel corners on integers, so the rasterio transform maps them straight to
the CRS. An answer's pixels map to the scene by scaling each axis from the image to the window and shifting by the
window's offset: ``col_off + x / image_width * width``, the same point as ``col_off + u / 100 * width`` for the
answer's 0..100 units ``u``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from rsvlm_edge import formats
from rsvlm_edge.tasks import split_tag

#: Tasks whose answers are objects (boxes, oriented boxes, grounding hits), merged across tile overlaps.
OBJECT_TASKS = ("[DET]", "[OBB]", "[VG]")
#: Tasks answered with a 24x24 mask: stitched into one class-indexed raster (:mod:`rsvlm_edge.scene.mosaic`).
MASK_TASKS = ("[SEG]",)


@dataclass(frozen=True)
class Feature:
    """One answer item in scene pixels.

    ``kind`` is ``box``, ``obb``, ``point`` / ``line`` (a box of zero size or width, which the model does write),
    ``tile`` (a grid-layer cell) or ``mask`` (a vectorised [SEG] region); ``properties`` holds the rest (``text``,
    ``labels``, ``merged``) and ends up in the GeoJSON properties. ``cut``: the object reaches its tile's border,
    so the tile may have seen only part of it (merging lets a neighbour's whole view absorb it)."""

    geometry: BaseGeometry
    task: str
    label: str
    score: float | None
    tile_id: str
    kind: str
    properties: Mapping[str, Any] = field(default_factory=dict)
    cut: bool = False
    window: tuple[int, int, int, int] | None = None  # the tile's (col_off, row_off, width, height): what it saw


@dataclass(frozen=True, eq=False)
class TileMask:
    """A tile's 24x24 mask, compact: ``cells`` index ``(background,) + labels``."""

    labels: tuple[str, ...]  # the mask's labels in first-appearance order, background left out
    cells: np.ndarray  # (24, 24) uint16

    @classmethod
    def from_grid(cls, grid: Sequence[Sequence[str]]) -> TileMask:
        """From a 24x24 grid of labels; MaskFormatError when it is not one."""
        if len(grid) != formats.MASK_SIZE or any(len(row) != formats.MASK_SIZE for row in grid):
            raise formats.MaskFormatError(f"expected a {formats.MASK_SIZE}x{formats.MASK_SIZE} grid, got "
                                          f"{len(grid)} rows of {sorted({len(row) for row in grid})} cells")
        labels = tuple(formats.grid_labels(grid))
        index = {formats.BACKGROUND: 0} | {lab: i + 1 for i, lab in enumerate(labels)}
        return cls(labels, np.array([[index[str(c)] for c in row] for row in grid], dtype=np.uint16))


@dataclass(frozen=True)
class TileAnswer:
    """A tile record read back: where the tile is, how its image maps to the scene, and its answer."""

    tile_id: str
    col_off: int
    row_off: int
    width: int
    height: int
    image_size: tuple[int, int]
    task: str | None
    result: Mapping[str, Any] | None
    mask: TileMask | None

    @property
    def scale(self) -> tuple[float, float]:
        """Scene pixels per image pixel along x and y."""
        return self.width / self.image_size[0], self.height / self.image_size[1]

    @property
    def footprint(self) -> Polygon:
        """The window as a polygon in scene pixels."""
        return box(self.col_off, self.row_off, self.col_off + self.width, self.row_off + self.height)

    def at_border(self, geometry: BaseGeometry) -> bool:
        """Whether ``geometry`` reaches the window's border, within half an answer unit (1/200 of the tile)."""
        if geometry.geom_type == "Point":
            return False
        minx, miny, maxx, maxy = geometry.bounds
        mx, my = self.width / 200.0, self.height / 200.0
        return bool(minx <= self.col_off + mx or miny <= self.row_off + my
                    or maxx >= self.col_off + self.width - mx or maxy >= self.row_off + self.height - my)

    def to_scene(self, x: float, y: float) -> tuple[float, float]:
        """An answer's pixel (x, y) in the tile image -> scene pixels."""
        sx, sy = self.scale
        return self.col_off + x * sx, self.row_off + y * sy


def read_record(record: Mapping[str, Any] | Any) -> TileAnswer:
    """A tile record (mapping or object with ``to_dict``) -> :class:`TileAnswer`. ValueError names what is missing."""
    if isinstance(record, TileAnswer):
        return record
    data = record.to_dict() if hasattr(record, "to_dict") else record
    if not isinstance(data, Mapping) or "window" not in data:
        raise ValueError(f"a tile record needs a 'window'; got {type(data).__name__}")
    window = data["window"]
    col_off, row_off, width, height = (int(_field(window, k)) for k in ("col_off", "row_off", "width", "height"))
    if width < 1 or height < 1:
        raise ValueError(f"tile window at ({col_off}, {row_off}) has size {width}x{height}")
    tile_id = data.get("tile_id") or _field(window, "id", None) or f"r{row_off:06d}_c{col_off:06d}"
    image_size = data.get("image_size") or (width, height)
    iw, ih = (int(v) for v in image_size)
    if iw < 1 or ih < 1:
        raise ValueError(f"tile {tile_id}: image size {iw}x{ih}")
    result = data.get("result")
    task = data.get("task") or (result or {}).get("task")
    grid = data.get("grid")
    try:
        mask = None if grid is None or result is None else TileMask.from_grid(grid)
    except formats.MaskFormatError as exc:
        raise formats.MaskFormatError(f"tile {tile_id}: {exc}") from None
    return TileAnswer(str(tile_id), col_off, row_off, width, height, (iw, ih), task, result, mask)


def _field(obj: Any, name: str, *default: Any) -> Any:
    """``obj[name]`` for mappings, ``obj.name`` otherwise (a TileWindow or its dict form)."""
    if isinstance(obj, Mapping):
        return obj[name] if not default else obj.get(name, default[0])
    return getattr(obj, name, *default)


# --------------------------------------------------------------------------------------------------- answers -> features

def tile_features(tile: TileAnswer) -> list[Feature]:
    """The objects of one tile's answer ([DET], [OBB], [VG]) in scene pixels, each with its score.

    A box's score is its own (``detections[i].score``, ``box_scores[i]``) when the answer has one, else the
    answer's score; None when the engine gives neither.
    """
    result = tile.result
    if result is None:
        return []
    answer_score = _score(result.get("score"))
    task = tile.task or ""
    out: list[Feature] = []
    for det in result.get("detections") or []:
        own = _score(det.get("score"))
        out.append(_feature(tile, _scene_box(tile, det["box_px"]), task, det["label"],
                            answer_score if own is None else own, "box"))
    for det in result.get("oriented_detections") or []:
        own = _score(det.get("score"))
        corners = [tile.to_scene(x, y) for x, y in formats.obb_corners(*det["obb_px"])]
        out.append(_feature(tile, solid(Polygon(corners)), task, det["label"], answer_score if own is None else own,
                            "obb"))
    boxes = result.get("boxes_px") or []
    box_scores = result.get("box_scores")
    if box_scores is None or len(box_scores) != len(boxes):
        box_scores = [None] * len(boxes)  # none, or not aligned: the answer's score is the honest fallback
    label = grounding_label(result.get("instruction", ""))
    for b, s in zip(boxes, box_scores):
        own = _score(s)
        out.append(_feature(tile, _scene_box(tile, b), task, label, answer_score if own is None else own, "box"))
    return out


def tile_cell(tile: TileAnswer) -> Feature | None:
    """The grid-layer cell of a [CLS] / text answer: the tile's footprint with its labels or text; None without
    an answer. ``label`` is the labels joined by ``, `` ([CLS]) or the answer text."""
    result = tile.result
    if result is None:
        return None
    labels = result.get("labels")
    props: dict[str, Any] = {"text": result.get("text", "")}
    if labels is not None:
        props["labels"] = list(labels)
        label = ", ".join(labels)
    else:
        label = str(result.get("text", ""))
    return Feature(tile.footprint, tile.task or "", label, _score(result.get("score")), tile.tile_id, "tile", props)


def grounding_label(instruction: str) -> str:
    """What a [VG] box is of: the instruction without its task tag."""
    return split_tag(instruction)[1].strip()


def features_from_records(records: Iterable[Mapping[str, Any] | TileAnswer | Any]) -> tuple[list[Feature], list[Feature]]:
    """(objects, grid-layer cells) of every record, in record order. [CLS] and the text tasks ([CAP], [VQA], [CCD],
    [REF], untagged) give one cell per tile; tasks answered with a mask give neither."""
    objects: list[Feature] = []
    cells: list[Feature] = []
    for tile in map(read_record, records):
        if tile.task in OBJECT_TASKS:
            objects += tile_features(tile)
        elif tile.task not in MASK_TASKS:
            cell = tile_cell(tile)
            if cell is not None:
                cells.append(cell)
    return objects, cells


def _scene_box(tile: TileAnswer, box_px: Sequence[float]) -> BaseGeometry:
    """A pixel box of the tile image -> a scene box (a point or a line when it has no area)."""
    x1, y1 = tile.to_scene(box_px[0], box_px[1])
    x2, y2 = tile.to_scene(box_px[2], box_px[3])
    return solid(box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))


def solid(geometry: BaseGeometry) -> BaseGeometry:
    """``geometry``, or the point or line a polygon collapses to when it has no area: a valid geometry either way
    (GEOS and GeoJSON readers refuse a zero-area ring)."""
    if geometry.geom_type != "Polygon" or geometry.area > 0:
        return geometry
    return shapely.convex_hull(geometry)


def _kind(geometry: BaseGeometry, solid: str) -> str:
    """``solid`` for an area, else ``point`` or ``line``."""
    return {"Point": "point", "LineString": "line"}.get(geometry.geom_type, solid)


def _feature(tile: TileAnswer, geom: BaseGeometry, task: str, label: str, score: float | None,
             kind: str) -> Feature:
    """An object of ``tile``: its kind as the geometry has it, ``cut`` when it reaches the tile's border."""
    return Feature(geom, task, str(label), score, tile.tile_id, _kind(geom, kind), cut=tile.at_border(geom),
                   window=(tile.col_off, tile.row_off, tile.width, tile.height))


def _score(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------------------------------- scores

def passes(score: float | None, min_score: float | None) -> bool:
    """Whether a score passes ``--min-score``. An unknown score (an engine without scores) passes no threshold."""
    if min_score is None:
        return True
    return score is not None and score >= min_score


def filter_min_score(features: Iterable[Feature], min_score: float | None) -> list[Feature]:
    """The features whose score passes ``min_score`` (all of them when it is None)."""
    return [f for f in features if passes(f.score, min_score)]

