"""Scene outputs: GeoJSON layers (WGS84 and the scene CRS), the stitched mask, and the run summary.

:func:`write_scene_outputs` is the one call after the tile loop: records in, files out, summary back. Every file is
written atomically (a crash leaves the previous file or none). What a run writes, ``<stem>`` being the caller's:

- ``<stem>.geojson``: merged objects ([DET], [OBB], [VG]) as an RFC 7946 FeatureCollection in WGS84 lon/lat;
- ``<stem>.crs.geojson``: the same in the scene CRS (named in a ``crs`` member, which GDAL and QGIS read);
- ``<stem>.tiles.geojson``: the grid layer of per-tile answers ([CLS] labels, [CAP] / [VQA] / [CCD] text);
- ``<stem>.mask.tif`` (+ ``<stem>.mask.geojson`` when vectorised): the stitched [SEG] / change mask;
- ``<stem>.summary.json``: counts per label, tiles, time, tiles/s and the files written.

Features carry ``task``, ``label``, ``score``, ``tile_id``, ``model`` and ``engine`` in their properties. A scene
without georeferencing gets pixel coordinates everywhere, a ``pixel_coordinates: true`` member and a warning.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rsvlm_edge.fileio import atomic_write_text
from rsvlm_edge.scene.geometry import (
    MASK_TASKS,
    OBJECT_TASKS,
    Feature,
    TileAnswer,
    features_from_records,
    filter_min_score,
    read_record,
)
from rsvlm_edge.scene.georef import GeoReference, warn_if_not_georeferenced
from rsvlm_edge.scene.merge import merge_features
from rsvlm_edge.scene.mosaic import vectorise_mask, write_class_mask

SCORE_DIGITS = 4


def feature_collection(features: Sequence[Feature], georef: GeoReference, *, wgs84: bool = True,
                       model: str | None = None, engine: str | None = None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of ``features``: RFC 7946 WGS84 lon/lat with ``wgs84``, else the scene CRS."""
    geoms = [f.geometry for f in features]
    mapped = georef.to_wgs84(geoms) if wgs84 else georef.to_crs_mappings(geoms)
    collection: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": g, "properties": feature_properties(f, model, engine)}
                     for f, g in zip(features, mapped)],
    }
    if not georef.georeferenced:
        collection["pixel_coordinates"] = True
    elif not wgs84:
        collection["crs"] = {"type": "name", "properties": {"name": georef.crs_name()}}
    return collection


def feature_properties(feature: Feature, model: str | None, engine: str | None) -> dict[str, Any]:
    """The GeoJSON properties of one feature: task, label, score, tile_id, kind, model, engine, then its extras."""
    score = None if feature.score is None else round(feature.score, SCORE_DIGITS)
    return {"task": feature.task, "label": feature.label, "score": score, "tile_id": feature.tile_id,
            "kind": feature.kind, "model": model, "engine": engine, **feature.properties}


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically; the path back."""
    atomic_write_text(path, json.dumps(collection, ensure_ascii=False) + "\n")
    return Path(path)


def label_counts(features: Iterable[Feature]) -> dict[str, int]:
    """Features per label, most frequent first; a [CLS] tile counts once for each of its labels."""
    counts: Counter[str] = Counter()
    for f in features:
        labels = f.properties.get("labels")
        counts.update(labels if labels is not None else [f.label])
    return dict(counts.most_common())


def run_summary(features: Sequence[Feature], *, tiles: int, seconds: float, failed: int = 0,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run in numbers: ``counts`` per label of the final features, ``tiles`` answered in ``seconds`` (this
    run's; resumed tiles excluded by the caller), ``tiles_per_s``, ``tiles_failed``, then ``extra``."""
    summary: dict[str, Any] = {
        "features": len(features),
        "counts": label_counts(features),
        "tiles": tiles,
        "tiles_failed": failed,
        "seconds": round(seconds, 3),
        "tiles_per_s": round(tiles / seconds, 3) if seconds > 0 else None,
    }
    summary.update(extra or {})
    return summary


def write_summary(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write the run summary as indented JSON, atomically; the path back."""
    atomic_write_text(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return Path(path)


def write_scene_outputs(records: Iterable[Mapping[str, Any] | Any], georef: GeoReference, out_dir: str | Path, *,
                        stem: str = "scene", scene_name: str = "the scene", model: str | None = None,
                        engine: str | None = None, min_score: float | None = None, merge: str = "nms",
                        metric: str = "iou", threshold: float = 0.5, classes: Sequence[str] | None = None,
                        vectorise: bool = False, tiles: int | None = None, seconds: float = 0.0,
                        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge the tile records of one run and write its outputs into ``out_dir`` (module docstring); the summary
    back (also written as ``<stem>.summary.json``).

    ``min_score`` drops objects, tile answers and mask labels scoring below it (an unknown score passes no
    threshold); ``merge`` / ``metric`` / ``threshold`` choose how duplicates across overlaps merge
    (:func:`rsvlm_edge.scene.merge.merge_features`); ``classes`` fixes the mask's first class indices;
    ``tiles`` and ``seconds`` are this run's tile count and time (default: every record, no time).
    """
    answers = [read_record(r) for r in records]
    warn_if_not_georeferenced(georef, scene_name)
    out = Path(out_dir)
    tasks = {a.task for a in answers if a.task}
    written: dict[str, str] = {}
    final: list[Feature] = []
    stats: dict[str, Any] = {}
    objects, cells = features_from_records(answers)
    if tasks & set(OBJECT_TASKS):
        kept = filter_min_score(objects, min_score)
        merged = merge_features(kept, method=merge, metric=metric, threshold=threshold)
        stats.update(objects_found=len(objects), below_min_score=len(objects) - len(kept), merged_away=len(kept) -
                     len(merged))
        written["objects"] = str(write_geojson(out / f"{stem}.geojson",
                                               feature_collection(merged, georef, model=model, engine=engine)))
        written["objects_crs"] = str(write_geojson(out / f"{stem}.crs.geojson", feature_collection(
            merged, georef, wgs84=False, model=model, engine=engine)))
        final += merged
    if cells:
        kept_cells = filter_min_score(cells, min_score)
        stats.setdefault("below_min_score", 0)
        stats["below_min_score"] += len(cells) - len(kept_cells)
        written["tiles"] = str(write_geojson(out / f"{stem}.tiles.geojson",
                                             feature_collection(kept_cells, georef, model=model, engine=engine)))
        final += kept_cells
    masked = [a for a in answers if a.task in MASK_TASKS]
    if masked:
        final += _write_mask(out, stem, masked, georef, written, stats, model=model, engine=engine,
                             min_score=min_score, classes=classes, vectorise=vectorise)
    failed = sum(a.result is None for a in answers)
    summary = run_summary(final, tiles=len(answers) if tiles is None else tiles, seconds=seconds, failed=failed,
                          extra={"tasks": sorted(tasks), "min_score": min_score, "model": model, "engine": engine,
                                 "scene": _scene_info(georef), **stats, **(extra or {}), "outputs": written})
    summary_path = out / f"{stem}.summary.json"
    summary["outputs"]["summary"] = str(summary_path)
    write_summary(summary_path, summary)
    return summary


def _write_mask(out: Path, stem: str, answers: Sequence[TileAnswer], georef: GeoReference, written: dict[str, str],
                stats: dict[str, Any], *, model: str | None, engine: str | None, min_score: float | None,
                classes: Sequence[str] | None, vectorise: bool) -> list[Feature]:
    """The stitched mask (and its polygons when ``vectorise``); the polygons back for the summary's counts."""
    tags = {k: v for k, v in (("TASK", ",".join(sorted({a.task or "" for a in answers}))), ("MODEL", model),
                              ("ENGINE", engine)) if v}
    path = out / f"{stem}.mask.tif"
    pixels = write_class_mask(path, answers, georef, classes=classes, min_score=min_score, tags=tags)
    stats.update(mask_classes=list(pixels), mask_pixels=pixels)
    written["mask"] = str(path)
    if not vectorise:
        return []
    regions = vectorise_mask(path, answers)
    written["mask_polygons"] = str(write_geojson(out / f"{stem}.mask.geojson",
                                                 feature_collection(regions, georef, model=model, engine=engine)))
    return regions


def _scene_info(georef: GeoReference) -> dict[str, Any]:
    return {"width": georef.width, "height": georef.height, "crs": georef.crs_name(),
            "transform": list(georef.transform)[:6] if georef.georeferenced else None}
