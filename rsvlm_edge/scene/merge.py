"""Merge the objects that neighbouring tiles both saw in their overlap into one feature each.

Greedy, per task and label, best first: features are ranked by score (unknown scores last), then by area (an object
cut by a tile edge is smaller than the whole one a neighbour saw, so the whole one leads), then by tile order. Each
leader takes every later feature that

- overlaps it by more than ``threshold`` (``iou``: intersection over union, the default; ``ios``: over the smaller
  area), or
- comes from another tile, one of the two reaching its tile's border (:attr:`Feature.cut`), and lies inside it by
  more than ``threshold`` of the smaller area: the sliver of an object that a tile edge cut off has a low IoU with
  the whole object its neighbour saw but an IoS near 1. Only cut pieces get this rule, so a large box does not
  swallow the smaller objects of the same label inside it.

``nms`` keeps the leader as it is, ``nmm`` (non-maximum merging) grows it to cover what it took: the enclosing box
for boxes, the minimum rotated rectangle of the union for oriented boxes. A leader that took a cut piece, or is
one, always grows that way: a cut piece is not the object's extent. Overlap is measured on shapely polygons, so
oriented boxes get their rotated IoU; points (zero-size grounding boxes) merge only with points at the same place.
An STRtree finds the candidates, so a scene of many thousand objects merges in about linear time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import shapely

from rsvlm_edge.scene.geometry import Feature

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
        candidates = np.array([j for j in tree.query(geoms[i]) if not taken[j]], dtype=int)
        matched, grow = candidates, False
        if candidates.size:
            iou, ios = _overlaps(geoms[i], areas[i], geoms[candidates], areas[candidates])
            cut_pair = np.array([(group[i].cut or group[j].cut) and group[i].tile_id != group[j].tile_id
                                 for j in candidates], dtype=bool)
            by_overlap = (iou if metric == "iou" else ios) > threshold
            by_cut = cut_pair & (ios > threshold)
            matched = candidates[by_overlap | by_cut]
            grow = bool(np.any(by_cut)) or (group[i].cut and matched.size > 0)
        taken[matched] = True
        out[positions[i]] = _combine(group[i], [group[j] for j in matched], "nmm" if grow else method)
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


def _combine(leader: Feature, taken: list[Feature], method: str) -> Feature:
    """The leader after taking ``taken``: unchanged geometry for nms, grown to cover them for nmm; ``merged``
    counts the tile answers it stands for."""
    count = sum(int(f.properties.get("merged", 1)) for f in [leader, *taken])
    geometry = leader.geometry
    if method == "nmm" and taken:
        union = shapely.union_all([leader.geometry] + [f.geometry for f in taken])
        geometry = shapely.envelope(union) if leader.kind == "box" else shapely.minimum_rotated_rectangle(union)
    return replace(leader, geometry=geometry, properties={**leader.properties, "merged": count})
