"""Scene merging: tile answers land at the right scene pixels, duplicates across overlaps merge to one (rotated IoU
for oriented boxes), scores follow each feature, and --min-score filters. Records are built by hand: no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("shapely")

from shapely import STRtree  # noqa: E402
from shapely.geometry import Polygon, box  # noqa: E402

from rsvlm_edge.scene.geometry import (  # noqa: E402
    features_from_records,
    filter_min_score,
    passes,
    read_record,
    tile_features,
)
from rsvlm_edge.scene.merge import merge_features  # noqa: E402


def record(col: int, row: int, result: dict | None, size: int = 128, image_size: tuple[int, int] | None = None,
           grid: list[list[str]] | None = None) -> dict:
    """A tile record as the tile loop journals it."""
    out = {"tile_id": f"r{row:06d}_c{col:06d}", "window": {"col_off": col, "row_off": row, "width": size,
                                                             "height": size}, "result": result}
    if image_size is not None:
        out["image_size"] = list(image_size)
    if grid is not None:
        out["grid"] = grid
    return out


def det(*items: tuple[str, list[float], float | None], score: float | None = None) -> dict:
    return {"task": "[DET]", "instruction": "[DET] Detect all objects.", "score": score,
            "detections": [{"label": lab, "box_px": b, "score": s} for lab, b, s in items]}


def obb(*items: tuple[str, list[float], float | None]) -> dict:
    return {"task": "[OBB]", "instruction": "[OBB] Detect all objects with oriented boxes.", "score": 0.5,
            "oriented_detections": [{"label": lab, "obb_px": o, "score": s} for lab, o, s in items]}


def scene_bounds(feature) -> tuple[float, ...]:
    return tuple(round(v, 6) for v in feature.geometry.bounds)


# --------------------------------------------------------------------------------------------------- tile -> scene

def test_a_box_is_shifted_by_its_tile_window():
    tile = read_record(record(384, 256, det(("ship", [10, 20, 30, 50], 0.9))))
    (f,) = tile_features(tile)
    assert scene_bounds(f) == (394, 276, 414, 306)
    assert (f.task, f.label, f.score, f.tile_id, f.kind) == ("[DET]", "ship", 0.9, "r000256_c000384", "box")


def test_a_resampled_tile_scales_its_answer_back_to_scene_pixels():
    """A 256-px window read at 128 px (--gsd): image pixels are two scene pixels each."""
    tile = read_record(record(1000, 0, det(("car", [10, 20, 30, 50], 0.9)), size=256, image_size=(128, 128)))
    (f,) = tile_features(tile)
    assert scene_bounds(f) == (1020, 40, 1060, 100)


def test_an_oriented_box_keeps_its_angle_in_the_scene():
    tile = read_record(record(100, 200, obb(("ship", [64, 64, 40, 10, 30], 0.8))))
    (f,) = tile_features(tile)
    corners = list(f.geometry.exterior.coords)[:4]
    (x0, y0), (x1, y1) = corners[0], corners[1]
    assert math.degrees(math.atan2(y1 - y0, x1 - x0)) == pytest.approx(30)
    assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(40)
    assert f.geometry.centroid.x == pytest.approx(164) and f.geometry.centroid.y == pytest.approx(264)
    assert f.geometry.area == pytest.approx(400)
    assert f.kind == "obb"


def test_grounding_boxes_take_the_instruction_as_label_and_a_zero_size_box_is_a_point():
    result = {"task": "[VG]", "instruction": "[VG] the white plane", "score": 0.6,
              "boxes_px": [[10, 10, 20, 20], [50, 60, 50, 60]], "box_scores": [0.9, 0.3]}
    feats = tile_features(read_record(record(0, 0, result)))
    assert [f.label for f in feats] == ["the white plane"] * 2
    assert [f.kind for f in feats] == ["box", "point"]
    assert [f.score for f in feats] == [0.9, 0.3]
    assert (feats[1].geometry.x, feats[1].geometry.y) == (50, 60)


def test_boxes_without_area_become_valid_lines_and_points():
    result = det(("car", [10, 20, 30, 20], 0.9), ("car", [40, 10, 40, 30], 0.8), ("car", [50, 50, 50, 50], 0.7))
    feats = tile_features(read_record(record(0, 0, result)))
    assert [(f.geometry.geom_type, f.kind) for f in feats] == [("LineString", "line"), ("LineString", "line"),
                                                                ("Point", "point")]
    assert all(f.geometry.is_valid for f in feats)
    flat = tile_features(read_record(record(0, 0, obb(("ship", [64, 64, 40, 0, 30], 0.8)))))[0]
    assert flat.kind == "line" and flat.geometry.length == pytest.approx(40)
    (merged,) = merge_features(feats[:1] * 2, method="nmm")
    assert merged.geometry.is_valid and not merged.geometry.is_empty


def test_a_box_without_its_own_score_takes_the_answer_score():
    feats = tile_features(read_record(record(0, 0, det(("ship", [0, 0, 5, 5], None), score=0.4))))
    assert feats[0].score == 0.4
    misaligned = {"task": "[VG]", "instruction": "[VG] a ship", "score": 0.7, "boxes_px": [[0, 0, 5, 5]],
                  "box_scores": [0.1, 0.2]}
    assert tile_features(read_record(record(0, 0, misaligned)))[0].score == 0.7


def test_engines_without_scores_give_none_and_fail_any_min_score():
    feats = tile_features(read_record(record(0, 0, det(("ship", [0, 0, 5, 5], None)))))
    assert feats[0].score is None
    assert passes(None, None) and not passes(None, 0.0)
    assert filter_min_score(feats, None) == feats and filter_min_score(feats, 0.1) == []


def test_min_score_keeps_features_at_or_above_the_threshold():
    feats = tile_features(read_record(record(0, 0, det(("a", [0, 0, 5, 5], 0.2), ("b", [9, 9, 15, 15], 0.5),
                                                       ("c", [20, 20, 25, 25], 0.8)))))
    assert [f.label for f in filter_min_score(feats, 0.5)] == ["b", "c"]


def test_failed_tiles_and_text_tasks_give_no_objects_but_text_tasks_give_grid_cells():
    cls = {"task": "[CLS]", "instruction": "[CLS] Classify the scene.", "text": "harbor, sea", "score": 0.8,
           "labels": ["harbor", "sea"]}
    objects, cells = features_from_records([record(0, 0, None), record(96, 0, cls)])
    assert objects == []
    (cell,) = cells
    assert cell.kind == "tile" and cell.label == "harbor, sea" and cell.properties["labels"] == ["harbor", "sea"]
    assert scene_bounds(cell) == (96, 0, 224, 128)


def test_a_record_without_a_window_is_refused_by_name():
    with pytest.raises(ValueError, match="window"):
        read_record({"result": {}})
    with pytest.raises(ValueError, match="size 0x128"):
        read_record({"window": {"col_off": 0, "row_off": 0, "width": 0, "height": 128}})


# --------------------------------------------------------------------------------------------------- merging

def overlapping_pair(score_a: float, score_b: float, label_b: str = "ship") -> list:
    """Tiles at x 0 and 96 (32 px overlap) that both see the ship at scene x 100..120."""
    return features_from_records([record(0, 0, det(("ship", [100, 40, 120, 60], score_a))),
                                  record(96, 0, det((label_b, [4, 40, 24, 60], score_b)))])[0]


def test_a_duplicate_across_a_tile_overlap_merges_to_the_best_scored_one():
    merged = merge_features(overlapping_pair(0.7, 0.9))
    (f,) = merged
    assert f.score == 0.9 and f.tile_id == "r000000_c000096" and f.properties["merged"] == 2
    assert scene_bounds(f) == (100, 40, 120, 60)


def test_different_labels_at_one_place_are_not_merged():
    assert len(merge_features(overlapping_pair(0.7, 0.9, label_b="boat"))) == 2


def test_neighbouring_objects_are_not_merged():
    feats = features_from_records([record(0, 0, det(("car", [10, 10, 20, 20], 0.9), ("car", [21, 10, 31, 20], 0.8),
                                                    ("car", [14, 10, 24, 20], 0.7)))])[0]
    assert len(merge_features(feats, metric="iou")) == 3  # the third overlaps the first by IoU 6/14 < 0.5
    assert len(merge_features(feats, metric="iou", threshold=0.4)) == 2
    assert len(merge_features(feats, metric="ios", threshold=0.7)) == 3  # and by IoS 6/10
    assert len(merge_features(feats, metric="ios")) == 2
    assert len(merge_features(feats)) == 3  # the default: IoU over 0.5


def test_a_sliver_cut_by_a_tile_edge_merges_into_the_whole_object():
    """One tile saw all of the ship, the next a 30% sliver at its left edge (IoU 0.3, IoS 1): one ship, its whole
    extent, the better score."""
    feats = features_from_records([record(0, 0, det(("ship", [100, 40, 120, 60], 0.6))),
                                   record(114, 0, det(("ship", [0, 40, 6, 60], 0.9)))])[0]
    assert [f.cut for f in feats] == [False, True]
    for method in ("nms", "nmm"):
        (f,) = merge_features(feats, method=method)
        assert scene_bounds(f) == (100, 40, 120, 60) and f.score == 0.9 and f.properties["merged"] == 2


def test_a_large_box_does_not_swallow_the_objects_inside_it():
    """A neighbour's big 'ship' box over a small ship away from every tile border: two features, unless IoS is the
    overlap measure for every pair."""
    feats = features_from_records([record(0, 0, det(("ship", [100, 10, 127, 120], 0.9))),
                                   record(96, 0, det(("ship", [10, 50, 20, 60], 0.8)))])[0]
    assert not any(f.cut for f in feats[1:])
    assert len(merge_features(feats)) == 2
    assert len(merge_features(feats, metric="ios")) == 1


def test_equal_scores_let_the_larger_box_lead():
    feats = features_from_records([record(0, 0, det(("ship", [100, 40, 120, 60], 0.5))),
                                   record(114, 0, det(("ship", [0, 40, 6, 60], 0.5)))])[0]
    (f,) = merge_features(feats)
    assert f.tile_id == "r000000_c000000"


def test_unknown_scores_rank_after_known_ones():
    feats = features_from_records([record(0, 0, det(("ship", [100, 40, 120, 60], None))),
                                   record(96, 0, det(("ship", [4, 40, 22, 60], 0.1)))])[0]
    (f,) = merge_features(feats)
    assert f.score == 0.1


def test_oriented_boxes_merge_by_rotated_iou():
    """Two 100x10 boxes at 30 degrees shifted by 20 px along their long side: rotated IoU 80/120 = 0.667."""
    dx, dy = 20 * math.cos(math.radians(30)), 20 * math.sin(math.radians(30))
    feats = features_from_records([record(0, 0, obb(("ship", [150, 128, 100, 10, 30], 0.9)), size=256),
                                   record(50, 0, obb(("ship", [100 + dx, 128 + dy, 100, 10, 30], 0.8)), size=256)])[0]
    assert not any(f.cut for f in feats)
    assert len(merge_features(feats, metric="iou", threshold=0.6)) == 1
    assert len(merge_features(feats, metric="iou", threshold=0.7)) == 2
    assert len(merge_features(feats, metric="ios", threshold=0.75)) == 1  # IoS 80/100


def test_crossing_oriented_boxes_are_not_merged_although_their_envelopes_coincide():
    feats = features_from_records([record(0, 0, obb(("bridge", [64, 64, 100, 10, 45], 0.9),
                                                    ("bridge", [64, 64, 100, 10, -45], 0.8)))])[0]
    assert feats[0].geometry.envelope.equals(feats[1].geometry.envelope)
    assert len(merge_features(feats)) == 2


def test_nmm_grows_an_oriented_box_to_cover_its_duplicate():
    feats = features_from_records([record(0, 0, obb(("ship", [100, 60, 100, 10, 0], 0.9))),
                                   record(96, 0, obb(("ship", [14, 60, 100, 10, 0], 0.8)))])[0]
    (f,) = merge_features(feats, method="nmm")
    assert scene_bounds(f) == (50, 55, 160, 65)


def test_an_oriented_box_cut_by_a_tile_edge_merges_into_the_whole_one():
    """Tile 0..128 sees x 100..128 of a ship at x 100..140 (IoU 0.7 with the whole); tile 96..224 sees all of it."""
    feats = features_from_records([record(0, 0, obb(("ship", [114, 60, 28, 10, 0], 0.9))),
                                   record(96, 0, obb(("ship", [24, 60, 40, 10, 0], 0.6)))])[0]
    assert [f.cut for f in feats] == [True, False]
    (f,) = merge_features(feats, threshold=0.8)
    assert f.kind == "obb" and f.score == 0.9
    assert scene_bounds(f) == (100, 55, 140, 65)


def test_points_merge_only_with_points_at_the_same_place():
    vg = {"task": "[VG]", "instruction": "[VG] the tower", "score": 0.6, "boxes_px": [[110, 50, 110, 50]]}
    vg2 = {**vg, "boxes_px": [[14, 50, 14, 50], [20, 50, 20, 50]]}
    feats = features_from_records([record(0, 0, vg), record(96, 0, vg2)])[0]
    assert len(merge_features(feats)) == 2


def test_merge_options_are_checked():
    with pytest.raises(ValueError, match="method"):
        merge_features([], method="wbf")
    with pytest.raises(ValueError, match="metric"):
        merge_features([], metric="giou")
    with pytest.raises(ValueError, match="threshold"):
        merge_features([], threshold=1.5)


# --------------------------------------------------------------------------------------------------- a real scene

def dota_objects(root, name: str) -> tuple[tuple[int, int], list[tuple[str, Polygon]]]:
    """(width, height) of a DOTA image and its annotated objects as (label, axis-aligned box)."""
    from PIL import Image

    with Image.open(root / "images" / f"{name}.png") as im:
        size = im.size
    objects = []
    for line in (root / "labelTxt" / f"{name}.txt").read_text().splitlines()[2:]:
        parts = line.split()
        objects.append((parts[8], Polygon(np.array(parts[:8], dtype=float).reshape(4, 2)).envelope))
    return size, objects


def oracle_records(size: tuple[int, int], objects, tile: int, overlap: int) -> list[dict]:
    """What a perfect [DET] model answers on each tile: every object it sees, cut at its borders, in whole 0..100
    answer units, scored by the fraction of the object in view."""
    def offsets(n: int) -> list[int]:
        return sorted(set(range(0, max(n - tile, 0) + 1, tile - overlap)) | {max(n - tile, 0)})

    records = []
    for row in offsets(size[1]):
        for col in offsets(size[0]):
            window = box(col, row, col + tile, row + tile)
            dets = []
            for label, obj in objects:
                seen = obj.intersection(window)
                units = [round((v - off) / tile * 100) for v, off in zip(seen.bounds, (col, row, col, row))] \
                    if seen.area > 0 else []
                if units and units[0] < units[2] and units[1] < units[3]:
                    dets.append((label, [u / 100 * tile for u in units], seen.area / obj.area))
            records.append(record(col, row, det(*dets), size=tile))
    return records


def matched_and_extra(merged, objects) -> tuple[int, int]:
    """Objects found by a merged feature of their label (IoU > 0.5, each feature used once), and features left."""
    tree, used = STRtree([f.geometry for f in merged]), set()
    for label, obj in objects:
        for i in map(int, tree.query(obj)):
            f = merged[i]
            if i not in used and f.label == label and f.geometry.intersection(obj).area / f.geometry.union(obj).area > 0.5:
                used.add(i)
                break
    return len(used), len(merged) - len(used)


def test_a_dense_dota_scene_cut_into_overlapping_tiles_merges_back_like_one_tile(data_root):
    """P0706, a harbour of 536 annotated objects: perfect answers on 256 px tiles with 64 px overlaps (every object
    near an overlap seen two to four times, many cut) merge to what one tile over the whole scene gives. (Even that
    is below 536: neighbouring ships' axis-aligned boxes overlap by IoU > 0.5.)"""
    root = data_root / "dota" / "example"
    if not (root / "labelTxt" / "P0706.txt").exists():
        pytest.skip("DOTA example P0706 not in the sample data")
    size, objects = dota_objects(root, "P0706")
    whole = merge_features(features_from_records(oracle_records(size, objects, max(size), 0))[0])
    tiled_raw = features_from_records(oracle_records(size, objects, 256, 64))[0]
    tiled = merge_features(tiled_raw)
    assert len(tiled_raw) > 2 * len(objects)
    found_whole, extra_whole = matched_and_extra(whole, objects)
    found, extra = matched_and_extra(tiled, objects)
    slack = len(objects) // 100
    assert found >= found_whole - slack and extra <= extra_whole + slack, (found, extra, found_whole, extra_whole)
