"""Merge the objects that neighbouring tiles both saw in their overlap into one feature each.

Greedy, per task and label, best first: features are ranked by score (unknown scores last), then by area (an object
cut by a tile edge is smaller than the whole one a neighbour saw, so the whole one leads), then by tile order. Each
leader takes every later feature that overlaps it by more than ``threshold``:

- ``nms`` drops the taken features and keeps the leader as it is;
- ``nmm`` (non-maximum merging) grows the leader to cover them: the enclosing axis-aligned box for boxes, the
  minimum rotated rectangle of the union for oriented boxes.

Overlap is measured on shapely polygons, so oriented boxes get their rotated IoU. ``ios`` (the default) is
intersection over the smaller area: a tile edge that cuts an object leaves one tile a sliver lying inside the whole
object its neighbour saw, an IoU of only the sliver's share but an IoS near 1. ``iou`` is intersection over union,
the stricter choice for dense scenes of objects that overlap each other.
Points (zero-size grounding boxes) merge only with points at the same place. An STRtree finds the candidates, so a
scene of many thousand objects merges in about linear time.
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


def merge_features(features: Sequence[Feature], *, method: str = "nms", metric: str = "ios",
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
        if candidates.size:
            overlap = _overlap(geoms[i], areas[i], geoms[candidates], areas[candidates], metric)
            matched = candidates[overlap > threshold]
        else:
            matched = candidates
        taken[matched] = True
        out[positions[i]] = _combine(group[i], [group[j] for j in matched], method)
    return out


def _overlap(geom: shapely.Geometry, geom_area: float, others: np.ndarray, other_areas: np.ndarray,
             metric: str) -> np.ndarray:
    """Overlap of ``geom`` with each of ``others``: IoU or intersection over the smaller area; points count as
    fully overlapping only points equal to them."""
    if geom_area == 0.0:
        return np.where(shapely.equals(others, geom), 1.0, 0.0)
    inter = shapely.area(shapely.intersection(geom, others))
    denom = geom_area + other_areas - inter if metric == "iou" else np.minimum(geom_area, other_areas)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)


def _combine(leader: Feature, taken: list[Feature], method: str) -> Feature:
    """The leader after taking ``taken``: unchanged geometry for nms, grown to cover them for nmm; ``merged``
    counts the tile answers it stands for."""
    count = sum(int(f.properties.get("merged", 1)) for f in [leader, *taken])
    geometry = leader.geometry
    if method == "nmm" and taken:
        union = shapely.union_all([leader.geometry] + [f.geometry for f in taken])
        geometry = shapely.envelope(union) if leader.kind == "box" else shapely.minimum_rotated_rectangle(union)
    return replace(leader, geometry=geometry, properties={**leader.properties, "merged": count})
