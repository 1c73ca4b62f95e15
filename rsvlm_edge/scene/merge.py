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
    taken = np.zeros(len(group), dtype=bool)
    out: dict[int, Feature] = {}
    for i in order:
        if taken[i]:
            continue
        taken[i] = True
        object_ = _Object(group[i])
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
    tile that saw it) and the geometry covering them."""

    def __init__(self, leader: Feature):
        self.leader = leader
        self.geometry = leader.geometry
        self.pieces = [leader]

    def matches(self, others: list[Feature], metric: str, threshold: float) -> np.ndarray:
        """Which of ``others`` are this object: overlapping it by more than ``threshold`` (``metric``), or, from
        another tile than a piece's, by IoU with that piece within the area both tiles saw."""
        geoms = np.array([f.geometry for f in others], dtype=object)
        iou, ios = _overlaps(self.geometry, float(shapely.area(self.geometry)), geoms, shapely.area(geoms))
        hits = (iou if metric == "iou" else ios) > threshold
        for piece in self.pieces:
            across = np.array([f.tile_id != piece.tile_id for f in others], dtype=bool)
            hits |= across & (_shared_iou(piece, others) > threshold)
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


def _shared_iou(piece: Feature, others: list[Feature]) -> np.ndarray:
    """IoU of ``piece`` with each of ``others`` within the window both their tiles saw (0 without one): two tiles
    that saw one object see the same part of it there, however much of it each missed elsewhere."""
    if piece.window is None:
        return np.zeros(len(others))
    px, py, pw, ph = piece.window
    win = np.array([f.window or (0, 0, 0, 0) for f in others], dtype=float).reshape(-1, 4)
    x0, y0 = np.maximum(px, win[:, 0]), np.maximum(py, win[:, 1])
    x1, y1 = np.minimum(px + pw, win[:, 0] + win[:, 2]), np.minimum(py + ph, win[:, 1] + win[:, 3])
    seen = (x0 < x1) & (y0 < y1) & np.array([f.window is not None for f in others], dtype=bool)
    windows = shapely.box(x0, y0, np.maximum(x0, x1), np.maximum(y0, y1))
    mine = _areal(shapely.intersection(piece.geometry, windows))
    theirs = _areal(shapely.intersection(np.array([f.geometry for f in others], dtype=object), windows))
    inter = shapely.area(shapely.intersection(mine, theirs))
    return np.where(seen, _ratio(inter, shapely.area(mine) + shapely.area(theirs) - inter), 0.0)


def _areal(geoms: np.ndarray) -> np.ndarray:
    """The polygonal part of each geometry: a shape clipped along one of its edges leaves a GeometryCollection of
    polygon and line, which GEOS's overlay refuses as input."""
    out = geoms.copy()
    for k in np.flatnonzero(shapely.get_type_id(geoms) == shapely.GeometryType.GEOMETRYCOLLECTION):
        parts = [p for p in shapely.get_parts(geoms[k]) if p.geom_type in ("Polygon", "MultiPolygon")]
        out[k] = shapely.union_all(parts) if parts else shapely.Polygon()
    return out


def _overlaps(geom: shapely.Geometry, geom_area: float, others: np.ndarray,
              other_areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over the smaller area) of ``geom`` with each of ``others``; a point overlaps only the
    points equal to it, fully."""
    if geom_area == 0.0:
        same = np.where(shapely.equals(others, geom), 1.0, 0.0)
        return same, same
    inter = shapely.area(shapely.intersection(geom, others))
    return _ratio(inter, geom_area + other_areas - inter), _ratio(inter, np.minimum(geom_area, other_areas))


def _ratio(num: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """num / denom, 0 where denom is 0 (zero-area boxes)."""
    return np.divide(num, denom, out=np.zeros_like(num, dtype=float), where=denom > 0)
