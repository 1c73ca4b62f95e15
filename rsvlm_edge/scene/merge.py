"""Merge the objects that neighbouring tiles both saw in their overlap into one feature each.

Greedy, per task and label, best first: features are ranked by score (unknown scores last), then by area (an object
cut by a tile edge is smaller than the whole one a neighbour saw, so the whole one leads), then by tile order. Each
leader takes every later feature that

- overlaps it by more than ``threshold`` (``iou``: intersection over union, the default; ``ios``: over the smaller
  area, which also lets a large box swallow the smaller objects of its label inside it), or
- comes from another tile and overlaps one of the leader's pieces by more than ``threshold`` IoU *within the window
  both tiles saw*. Two tiles that saw one object see the same part of it there, however much of it each missed
  elsewhere: the sliver a tile edge cut off has a low IoU with the whole object its neighbour saw, but the same
  extent inside their common window.

``nms`` keeps the leader's geometry, ``nmm`` (non-maximum merging) grows it to cover what it took: the enclosing box
for boxes, the minimum rotated rectangle of the union for oriented boxes. Pieces of an object cut by tile borders
(:attr:`Feature.cut`) always grow the leader, which then looks again for pieces further on (an object larger than
the overlap is whole in no tile). Overlap is measured on shapely polygons, so oriented boxes get their rotated IoU;
points merge only with points at the same place. An STRtree finds the candidates, so a scene of many thousand
objects merges in about linear time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import shapely

from rsvlm_edge.scene.geometry import Feature, solid

METHODS = ("nms", "nmm")
METRICS = ("iou", "ios")
_BOX_KINDS = ("box", "point", "line")  # axis-aligned: their bounds are their shape, and so are their merged envelopes


def merge_features(features: Sequence[Feature], *, method: str = "nms", metric: str = "iou",
                   threshold: float = 0.5) -> list[Feature]:
    """One feature per object across tile overlaps (see the module docstring); the result keeps input order."""
    if method not in METHODS:
        raise ValueError(f"merge method must be one of {', '.join(METHODS)}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"merge metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"merge threshold must be in [0, 1], got {threshold}")
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, f in enumerate(features):
        groups[(f.task, f.label)].append(i)
    merged: dict[int, Feature] = {}
    for members in groups.values():
        merged.update(_merge_group([features[i] for i in members], members, method, metric, threshold))
    return [merged[i] for i in sorted(merged)]


def _merge_group(group: list[Feature], positions: list[int], method: str, metric: str,
                 threshold: float) -> dict[int, Feature]:
    """Greedy merge of one (task, label) group; {input position: kept feature}."""
    geoms = np.array([f.geometry for f in group], dtype=object)
    areas = shapely.area(geoms)
    order = sorted(range(len(group)), key=lambda i: (group[i].score is None, -(group[i].score or 0.0), -areas[i], i))
    tree = shapely.STRtree(geoms)
    boxes = all(f.kind in _BOX_KINDS for f in group)
    taken = np.zeros(len(group), dtype=bool)
    out: dict[int, Feature] = {}
    for i in order:
        if taken[i]:
            continue
        taken[i] = True
        object_ = _Object(group[i], boxes)
        while True:  # a grown object may reach pieces of itself in tiles further on
            hits = np.array([j for j in tree.query(object_.geometry) if not taken[j]], dtype=int)
            if hits.size:
                hits = hits[object_.matches([group[j] for j in hits], metric, threshold)]
            if not hits.size:
                break
            taken[hits] = True
            if not object_.take([group[j] for j in hits], method):
                break
        out[positions[i]] = object_.feature()
    return out


class _Object:
    """The object a leader stands for while it takes its duplicates: its pieces (the features taken, each with the
    tile that saw it) and the geometry covering them. Axis-aligned boxes (and the points and lines of boxes without
    area) are measured on their bounds with numpy, exactly and about fifty times faster than GEOS overlays."""

    def __init__(self, leader: Feature, boxes: bool):
        self.leader = leader
        self.geometry = leader.geometry
        self.pieces = [leader]
        self.boxes = boxes

    def matches(self, others: list[Feature], metric: str, threshold: float) -> np.ndarray:
        """Which of ``others`` are this object: overlapping it by more than ``threshold`` (``metric``), or, from
        another tile than a piece's, by IoU with that piece within the window both tiles saw."""
        geoms = np.array([f.geometry for f in others], dtype=object)
        bounds = shapely.bounds(geoms)
        if self.boxes:
            iou, ios = _box_overlaps(np.array(self.geometry.bounds), bounds)
        else:
            iou, ios = _overlaps(self.geometry, float(shapely.area(self.geometry)), geoms, shapely.area(geoms))
        hits = (iou if metric == "iou" else ios) > threshold
        windows = np.array([_window_bounds(f) for f in others]).reshape(-1, 4)
        for piece in self.pieces:
            if piece.window is None:
                continue
            shared = _box_clip(np.array(_window_bounds(piece))[None, :], windows)
            across = np.array([f.tile_id != piece.tile_id for f in others], dtype=bool) & (_box_area(shared) > 0)
            if not across.any():
                continue
            if self.boxes:
                iou_in = _box_iou(_box_clip(np.array(piece.geometry.bounds)[None, :], shared), _box_clip(bounds, shared))
            else:
                iou_in = _shared_iou(piece.geometry, geoms, shared)
            hits |= across & (iou_in > threshold)
        return hits

    def take(self, others: list[Feature], method: str) -> bool:
        """Take ``others``; grow to cover them for nmm, or when they piece the object together from several tiles
        (a cut piece is not the object's extent). True when that happened: the grown object may reach more pieces."""
        tiles = {f.tile_id for f in self.pieces}
        pieced = any(f.tile_id not in tiles for f in others) and any(f.cut for f in [*self.pieces, *others])
        self.pieces += others
        if method == "nmm" or pieced:
            union = shapely.union_all([self.geometry] + [f.geometry for f in others])
            self.geometry = solid(shapely.minimum_rotated_rectangle(union) if self.leader.kind == "obb"
                                  else shapely.envelope(union))
        return pieced

    def feature(self) -> Feature:
        """The leader with the object's geometry; ``merged`` counts the tile answers it stands for."""
        count = sum(int(f.properties.get("merged", 1)) for f in self.pieces)
        return replace(self.leader, geometry=self.geometry, properties={**self.leader.properties, "merged": count})


def _window_bounds(feature: Feature) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the window the feature's tile saw; an empty box without one."""
    if feature.window is None:
        return (0.0, 0.0, 0.0, 0.0)
    x, y, w, h = feature.window
    return (x, y, x + w, y + h)


# --------------------------------------------------------------------------------------------------- overlap measures
# boxes are (n, 4) arrays of (x0, y0, x1, y1); the intersection of two boxes is one clipped by the other

def _box_clip(boxes: np.ndarray, clip: np.ndarray) -> np.ndarray:
    return np.concatenate([np.maximum(boxes[:, :2], clip[:, :2]), np.minimum(boxes[:, 2:], clip[:, 2:])], axis=1)


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0.0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = _box_area(_box_clip(a, b))
    return _ratio(inter, _box_area(a) + _box_area(b) - inter)


def _box_overlaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over the smaller area) of one box with each of ``others``; a box without area overlaps
    only the boxes equal to it, fully."""
    area = float(_box_area(box[None, :])[0])
    if area == 0.0:
        same = np.all(others == box, axis=1).astype(float)
        return same, same
    inter = _box_area(_box_clip(box[None, :], others))
    other_areas = _box_area(others)
    return _ratio(inter, area + other_areas - inter), _ratio(inter, np.minimum(area, other_areas))


def _overlaps(geom: shapely.Geometry, geom_area: float, others: np.ndarray,
              other_areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_box_overlaps` for any shapes (oriented boxes: rotated IoU) with GEOS."""
    if geom_area == 0.0:
        same = np.where(shapely.equals(others, geom), 1.0, 0.0)
        return same, same
    inter = shapely.area(shapely.intersection(geom, others))
    return _ratio(inter, geom_area + other_areas - inter), _ratio(inter, np.minimum(geom_area, other_areas))


def _shared_iou(geom: shapely.Geometry, others: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """IoU of ``geom`` with each of ``others`` inside the matching window (an (n, 4) box array), with GEOS."""
    boxes = shapely.box(windows[:, 0], windows[:, 1], np.maximum(windows[:, 0], windows[:, 2]),
                        np.maximum(windows[:, 1], windows[:, 3]))
    mine = _areal(shapely.intersection(geom, boxes))
    theirs = _areal(shapely.intersection(others, boxes))
    inter = shapely.area(shapely.intersection(mine, theirs))
    return _ratio(inter, shapely.area(mine) + shapely.area(theirs) - inter)


def _areal(geoms: np.ndarray) -> np.ndarray:
    """The polygonal part of each geometry: a shape clipped along one of its edges leaves a GeometryCollection of
    polygon and line, which GEOS's overlay refuses as input."""
    out = geoms.copy()
    for k in np.flatnonzero(shapely.get_type_id(geoms) == shapely.GeometryType.GEOMETRYCOLLECTION):
        parts = [p for p in shapely.get_parts(geoms[k]) if p.geom_type in ("Polygon", "MultiPolygon")]
        out[k] = shapely.union_all(parts) if parts else shapely.Polygon()
    return out


def _ratio(num: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """num / denom, 0 where denom is 0 (zero-area boxes)."""
    return np.divide(num, denom, out=np.zeros_like(num, dtype=float), where=denom > 0)
