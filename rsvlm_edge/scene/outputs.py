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
    ``tiles`` and ``seconds`` are this run's tile count and time (default: every record, no time). The summary's
    ``counts`` count merged objects, grid-layer labels and vectorised mask regions; ``mask_pixels`` the mask's
    pixels per class.
    """
    answers = [read_record(r) for r in records]
    warn_if_not_georeferenced(georef, scene_name)
    run = _Writer(Path(out_dir), stem, georef, model, engine)
    tasks = {a.task for a in answers if a.task}
    objects, cells = features_from_records(answers)
    if tasks & set(OBJECT_TASKS):
        run.objects(objects, min_score, method=merge, metric=metric, threshold=threshold)
    if cells:
        run.cells(cells, min_score)
    masked = [a for a in answers if a.task in MASK_TASKS]
    if masked:
        run.mask(masked, min_score, classes=classes, vectorise=vectorise)
    summary_path = run.out / f"{stem}.summary.json"
    summary = run_summary(run.features, tiles=len(answers) if tiles is None else tiles, seconds=seconds,
                          failed=sum(a.result is None for a in answers),
                          extra={"tasks": sorted(tasks), "min_score": min_score, "model": model, "engine": engine,
                                 "scene": _scene_info(georef), **run.stats, **(extra or {}),
                                 "outputs": {**run.written, "summary": str(summary_path)}})
    write_summary(summary_path, summary)
    return summary


class _Writer:
    """One run's layers: writes each file and keeps what the summary needs (features, files, counts)."""

    def __init__(self, out: Path, stem: str, georef: GeoReference, model: str | None, engine: str | None):
        self.out, self.stem, self.georef, self.model, self.engine = out, stem, georef, model, engine
        self.features: list[Feature] = []
        self.written: dict[str, str] = {}
        self.stats: dict[str, Any] = {"below_min_score": 0}

    def layer(self, name: str, suffix: str, features: Sequence[Feature], wgs84: bool = True) -> None:
        collection = feature_collection(features, self.georef, wgs84=wgs84, model=self.model, engine=self.engine)
        self.written[name] = str(write_geojson(self.out / f"{self.stem}{suffix}", collection))

    def objects(self, found: Sequence[Feature], min_score: float | None, **merging: Any) -> None:
        """Objects above ``min_score``, merged across overlaps, in WGS84 and in the scene CRS."""
        kept = filter_min_score(found, min_score)
        merged = merge_features(kept, **merging)
        self.stats.update(objects_found=len(found), merged_away=len(kept) - len(merged))
        self.stats["below_min_score"] += len(found) - len(kept)
        self.layer("objects", ".geojson", merged)
        self.layer("objects_crs", ".crs.geojson", merged, wgs84=False)
        self.features += merged

    def cells(self, cells: Sequence[Feature], min_score: float | None) -> None:
        """The grid layer of per-tile answers above ``min_score``."""
        kept = filter_min_score(cells, min_score)
        self.stats["below_min_score"] += len(cells) - len(kept)
        self.layer("tiles", ".tiles.geojson", kept)
        self.features += kept

    def mask(self, answers: Sequence[TileAnswer], min_score: float | None, *, classes: Sequence[str] | None,
             vectorise: bool) -> None:
        """The stitched mask, and its regions as polygons when ``vectorise``."""
        tags = {k: v for k, v in (("TASK", ",".join(sorted({a.task or "" for a in answers}))),
                                  ("MODEL", self.model), ("ENGINE", self.engine)) if v}
        path = self.out / f"{self.stem}.mask.tif"
        pixels = write_class_mask(path, answers, self.georef, classes=classes, min_score=min_score, tags=tags)
        self.stats.update(mask_classes=list(pixels), mask_pixels=pixels)
        self.written["mask"] = str(path)
        if vectorise:
            regions = vectorise_mask(path, answers)
            self.layer("mask_polygons", ".mask.geojson", regions)
            self.features += regions


def _scene_info(georef: GeoReference) -> dict[str, Any]:
    return {"width": georef.width, "height": georef.height, "crs": georef.crs_name(),
            "transform": list(georef.transform)[:6] if georef.georeferenced else None}
