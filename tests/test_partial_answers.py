"""Partial answers: a cut-off or partly malformed [DET]/[OBB]/[VG] list or [SEG] mask keeps its well-formed part
and says what it dropped; masks are also written as class-indexed palette PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rsvlm_edge import formats as F
from rsvlm_edge.generation import Generation, Routing
from rsvlm_edge.infer_command import MaskNames, save_mask
from rsvlm_edge.inputs import Tile
from rsvlm_edge.results import Result, class_palette

# ------------------------------------------------------------------------------------------------ box lists


def test_obb_list_cut_mid_box_keeps_the_complete_boxes():
    boxes = [("small-vehicle", (10 + i, 20 + i, 3, 4, -45)) for i in range(21)]
    text = F.format_oriented_detections(boxes) + " [70, 71, 3"  # cut by max_new_tokens inside the 22nd box
    answer = F.parse_answer("[OBB]", text)
    assert answer.error is None and answer.obbs == boxes
    assert answer.partial and answer.dropped == 1 and "unfinished" in answer.notes[0]


def test_one_malformed_box_drops_only_itself():
    answer = F.parse_answer("[DET]", "plane [1, 2, 3, 4] [5, 6, 7]; ship [10, 10, 200, 20] [30, 30, 40, 40]")
    assert answer.detections == [("plane", (1, 2, 3, 4)), ("ship", (30, 30, 40, 40))]
    assert answer.partial and answer.dropped == 2 and len(answer.notes) == 2


def test_inverted_box_is_kept_with_its_corners_swapped():
    answer = F.parse_answer("[DET]", "ship [10, 40, 20, 30]")
    assert answer.detections == [("ship", (10, 30, 20, 40))] and not answer.partial
    assert answer.detections[0][1] == F.parse_detections("ship [10, 40, 20, 30]")[0][1]


def test_bad_label_drops_its_boxes_and_cut_label_is_noted():
    answer = F.parse_answer("[DET]", "Plane! [1, 2, 3, 4] [5, 6, 7, 8]; ship [1, 1, 2, 2]; harb")
    assert answer.detections == [("ship", (1, 1, 2, 2))]
    assert answer.dropped == 3 and "harb" in answer.notes[-1]


def test_nothing_well_formed_is_still_an_error_with_the_first_problem():
    answer = F.parse_answer("[DET]", "plane [1, 2, 3]")
    assert answer.error and "needs 4 numbers" in answer.error
    assert answer.detections is None and not answer.partial
    assert F.parse_answer("[DET]", "none").detections == []


def test_vg_keeps_the_well_formed_box():
    answer = F.parse_answer("[VG]", "[1, 2, 3, 4] [5, 6")
    assert answer.boxes == [(1, 2, 3, 4)] and answer.partial and answer.dropped == 1


def test_strict_parsers_still_refuse_partial_text():
    with pytest.raises(F.BoxFormatError):
        F.parse_oriented_detections("ship [50, 50, 20, 10, 30] [1, 2")


# ------------------------------------------------------------------------------------------------ masks


def _grid(rows: int) -> list[list[str]]:
    return [["water"] * 6 + ["others"] * 18 for _ in range(rows)]


def test_cut_mask_pads_missing_rows_with_background():
    text = F.format_mask(_grid(24)).splitlines()
    answer = F.parse_answer("[SEG]", "\n".join(text[:20]) + "\nwater*6, oth")  # cut in row 21
    assert answer.error is None and len(answer.mask) == 24 and all(len(r) == 24 for r in answer.mask)
    assert answer.mask[:20] == _grid(20)
    assert answer.mask[20] == ["water"] * 6 + ["others"] * 18  # leading well-formed run kept, rest background
    assert answer.mask[21:] == [["others"] * 24] * 3
    assert answer.filled_rows == [20, 21, 22, 23] and answer.partial and answer.dropped == 1


def test_extra_mask_rows_are_dropped():
    answer = F.parse_answer("[SEG]", F.format_mask(_grid(24)) + "\nothers*24" * 5)
    assert answer.mask == _grid(24) and answer.dropped == 5 and answer.filled_rows == []
    assert answer.partial


def test_mask_with_too_few_good_rows_is_an_error():
    text = "\n".join(F.format_mask(_grid(24)).splitlines()[: F.MIN_MASK_ROWS - 1])
    answer = F.parse_answer("[SEG]", text)
    assert answer.mask is None and "24 rows" in answer.error


def test_whole_mask_is_not_partial():
    answer = F.parse_answer("[SEG]", F.format_mask(_grid(24)))
    assert answer.mask == _grid(24) and not answer.partial and answer.filled_rows == []


# ------------------------------------------------------------------------------------------------ results and JSON


def _result(tag: str, text: str, finish_reason: str, size=(48, 32), path="tile.png") -> Result:
    tile = Tile(paths=[path], pixels=[np.zeros((3, 8, 8), np.float32)], sensor="rgb", sizes=[size])
    gen = Generation(text=text, token_ids=[1, 2], finish_reason=finish_reason, routing=Routing(0, "tag"),
                     prompt_tokens=5, timings={})
    return Result(tile, f"{tag} go", gen, F.parse_answer(tag, text))


def test_to_dict_reports_partial_and_dropped():
    d = _result("[DET]", "plane [1, 2, 3, 4] [5, 6", "length").to_dict()
    assert d["partial"] is True and d["dropped"] == 1 and "unfinished" in d["partial_notes"][0]
    assert len(d["detections"]) == 1 and "parse_error" not in d
    assert json.loads(json.dumps(d)) == d


def test_cut_at_an_item_boundary_is_partial_without_drops():
    d = _result("[DET]", "plane [1, 2, 3, 4]", "length").to_dict()
    assert d["partial"] is True and d["dropped"] == 0
    assert _result("[DET]", "plane [1, 2, 3, 4]", "stop").to_dict()["partial"] is False


def test_mask_rows_filled_in_json():
    text = "\n".join(F.format_mask(_grid(24)).splitlines()[:22])
    d = _result("[SEG]", text, "length").to_dict()
    assert d["partial"] and d["mask_rows_filled"] == [22, 23]


# ------------------------------------------------------------------------------------------------ class masks


def test_class_png_indexes_labels_in_first_appearance_order(tmp_path):
    grid = [["others"] * 24 for _ in range(24)]
    for r in range(12):
        grid[r][:8] = ["water"] * 8
    for r in range(12, 24):
        grid[r][16:] = ["building"] * 8
    grid[0][20] = "road"
    result = _result("[SEG]", F.format_mask(grid), "stop", path=str(tmp_path / "t.png"))
    save_mask(result, MaskNames(tmp_path / "masks", tmp_path))
    d = result.to_dict()
    assert d["mask_classes"] == ["others", "water", "road", "building"] == result.mask_classes
    png = Image.open(d["mask_class_png"])
    assert png.mode == "P" and png.size == (48, 32)
    values = np.array(png)
    assert np.array_equal(values, result.class_mask_image())
    assert values[0, 0] == 1 and values[-1, -1] == 3 and values[-1, 0] == 0 and values[0, 41] == 2
    assert png.getpalette()[:12] == class_palette(4)
    assert len({tuple(class_palette(4)[i:i + 3]) for i in range(0, 12, 3)}) == 4  # distinct colours
    binary = np.array(Image.open(d["mask_png"]))
    assert np.array_equal(binary == 255, values > 0)


def test_class_png_names_are_unique_and_reserved_with_the_binary_name(tmp_path):
    names = MaskNames(tmp_path, tmp_path)
    first = names(str(tmp_path / "x"))
    second = names(str(tmp_path / "x"))
    assert first.name == "x_mask.png" and MaskNames.class_path(first).name == "x_mask_classes.png"
    assert second.name == "x_mask-2.png" and MaskNames.class_path(second).name == "x_mask-2_classes.png"
