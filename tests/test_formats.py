"""Text formats: concrete examples of every function, format -> parse round-trips, and fuzzing of the parsers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsvlm_edge import formats as F
from rsvlm_edge.tasks import TAGS

SETTINGS = settings(max_examples=200, deadline=None)


def angle_diff(a: float, b: float) -> float:
    """Distance between two angles modulo 180 degrees (an oriented box turned by 180 is the same box)."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


def blank_grid() -> list[list[str]]:
    return [[F.BACKGROUND] * F.MASK_SIZE for _ in range(F.MASK_SIZE)]


# ------------------------------------------------------------------------------------------------ boxes


def test_format_box_rounds_clamps_and_orders():
    assert F.format_box((12.4, 34.5, 56.6, 78.0)) == "[12, 35, 57, 78]"
    assert F.format_box((-5, 120, 30, 40)) == "[0, 40, 30, 100]"
    assert F.format_box((60, 70, 10, 20)) == "[10, 20, 60, 70]"


@pytest.mark.parametrize("bad", [(1, 2, 3), (1, 2, 3, float("nan")), (1, 2, 3, float("inf")), ("a", 1, 2, 3)])
def test_format_box_rejects_bad_input(bad):
    with pytest.raises(F.BoxFormatError):
        F.format_box(bad)


def test_format_boxes():
    assert F.format_boxes([(1, 2, 3, 4), (5, 6, 7, 8)]) == "[1, 2, 3, 4] [5, 6, 7, 8]"
    assert F.format_boxes([]) == "none"


def test_parse_boxes_tolerates_spacing_and_surrounding_text():
    assert F.parse_boxes("[1,2,3,4]") == [(1, 2, 3, 4)]
    assert F.parse_boxes("the plane is at [ 1 , 2 ,3,  4 ] and [5, 6, 7, 8].") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert F.parse_boxes(" None ") == []
    assert F.parse_boxes("[0, 0, 100, 100]") == [(0, 0, 100, 100)]


def test_parse_boxes_orders_swapped_corners():
    assert F.parse_boxes("[60, 70, 10, 20]") == [(10, 20, 60, 70)]


@pytest.mark.parametrize("text", [
    "", "no box here", "[1, 2, 3]", "[1, 2, 3, 4, 5]", "[1, 2, 3, 101]", "[-1, 2, 3, 4]", "[1.5, 2, 3, 4]",
    "[a, b, c, d]", "[1, 2, 3, 4] [5, 6", "[[1, 2, 3, 4]]", "[1, 2, 3, " + "9" * 5000 + "]", "[١, 2, 3, 4]", "[]",
])
def test_parse_boxes_rejects_malformed(text):
    with pytest.raises(F.BoxFormatError):
        F.parse_boxes(text)


def test_parse_box_takes_first_and_needs_one():
    assert F.parse_box("[1, 2, 3, 4] [5, 6, 7, 8]") == (1, 2, 3, 4)
    with pytest.raises(F.BoxFormatError):
        F.parse_box("none")


def test_error_hierarchy():
    assert issubclass(F.BoxFormatError, F.FormatError) and issubclass(F.MaskFormatError, F.FormatError)
    assert issubclass(F.FormatError, ValueError)


# ------------------------------------------------------------------------------------------------ oriented boxes


def test_normalize_obb_wraps_angle_into_half_open_range():
    assert F.normalize_obb(1, 2, 3, 4, 90) == (1.0, 2.0, 3.0, 4.0, -90.0)
    assert F.normalize_obb(1, 2, 3, 4, -90) == (1.0, 2.0, 3.0, 4.0, -90.0)
    assert F.normalize_obb(1, 2, 3, 4, 135)[4] == -45.0
    assert F.normalize_obb(1, 2, 3, 4, -200)[4] == -20.0
    assert -90.0 <= F.normalize_obb(0, 0, 1, 1, -90 - 1e-17)[4] < 90.0


def test_format_obb():
    assert F.format_obb((50.2, 49.6, 20, 10, 30)) == "[50, 50, 20, 10, 30]"
    assert F.format_obb((50, 50, 20, 10, 89.6)) == "[50, 50, 20, 10, -90]"  # rounds to 90, which wraps
    assert F.format_obb((50, 50, 20, 10, 180)) == "[50, 50, 20, 10, 0]"
    assert F.format_obb((-3, 104, -20, 130, -45)) == "[0, 100, 20, 100, -45]"
    assert F.format_obbs([]) == "none"
    assert F.format_obbs([(1, 2, 3, 4, 5), (6, 7, 8, 9, -10)]) == "[1, 2, 3, 4, 5] [6, 7, 8, 9, -10]"


def test_parse_obbs():
    assert F.parse_obbs("[50,50, 20, 10, -90] [1, 2, 3, 4, 89]") == [(50, 50, 20, 10, -90), (1, 2, 3, 4, 89)]
    assert F.parse_obbs("none") == []


@pytest.mark.parametrize("text", ["[50, 50, 20, 10, 90]", "[50, 50, 20, 10, -91]", "[50, 50, 101, 10, 0]",
                                  "[50, 50, 20, 10]", "nothing", "[1, 2, 3, 4, 5"])
def test_parse_obbs_rejects_malformed(text):
    with pytest.raises(F.BoxFormatError):
        F.parse_obbs(text)


def test_obb_corners_axis_aligned_and_turned():
    np.testing.assert_allclose(F.obb_corners(50, 50, 20, 10, 0), [[40, 45], [60, 45], [60, 55], [40, 55]])
    # 90 degrees in image coordinates (y down): the w edge points down the image.
    np.testing.assert_allclose(F.obb_corners(50, 50, 20, 10, 90), [[55, 40], [55, 60], [45, 60], [45, 40]],
                               atol=1e-9)


def test_obb_from_corners_dota_quad():
    quad = [[10, 10], [30, 10], [30, 20], [10, 20]]  # DOTA order: clockwise on screen
    assert F.obb_from_corners(quad) == pytest.approx((20, 15, 20, 10, 0))
    cx, cy, w, h, angle = F.obb_from_corners([[0, 0], [10, 10], [5, 15], [-5, 5]])
    assert (cx, cy) == pytest.approx((2.5, 7.5)) and angle == pytest.approx(45)
    assert (w, h) == pytest.approx((10 * 2 ** 0.5, 5 * 2 ** 0.5))


def test_obb_from_corners_zero_width_keeps_orientation():
    corners = F.obb_corners(50, 50, 0, 20, 30)
    cx, cy, w, h, angle = F.obb_from_corners(corners)
    assert (cx, cy, w, h) == pytest.approx((50, 50, 0, 20), abs=1e-9) and angle == pytest.approx(30)


def test_obb_from_corners_rejects_bad_shape():
    with pytest.raises(F.BoxFormatError):
        F.obb_from_corners([[0, 0], [1, 1], [2, 2]])


# ------------------------------------------------------------------------------------------------ detections


def test_format_detections_groups_by_first_appearance():
    items = [("plane", (1, 2, 3, 4)), ("ship", (10, 10, 20, 20)), ("plane", (5, 6, 7, 8))]
    assert F.format_detections(items) == "plane [1, 2, 3, 4] [5, 6, 7, 8]; ship [10, 10, 20, 20]"
    assert F.format_detections([]) == "none"
    assert F.format_detections([("Storage  Tank", (1, 2, 3, 4))]) == "storage tank [1, 2, 3, 4]"


@pytest.mark.parametrize("label", ["", "a;b", "plane [x]", "été", "-x", None])
def test_format_detections_rejects_unparseable_labels(label):
    with pytest.raises(F.BoxFormatError):
        F.format_detections([(label, (1, 2, 3, 4))])


def test_parse_detections():
    text = "plane [1, 2, 3, 4] [5,6,7,8]; storage tank [10, 10, 20, 20]; small-vehicle [0, 0, 1, 1];"
    assert F.parse_detections(text) == [
        ("plane", (1, 2, 3, 4)), ("plane", (5, 6, 7, 8)), ("storage tank", (10, 10, 20, 20)),
        ("small-vehicle", (0, 0, 1, 1)),
    ]
    assert F.parse_detections("none") == []
    assert F.parse_detections("Boeing737 [1, 2, 3, 4]") == [("boeing737", (1, 2, 3, 4))]


@pytest.mark.parametrize("text", ["", ";", "plane", "[1, 2, 3, 4]", "plane [1, 2, 3, 4] and [5, 6, 7, 8]",
                                  "plane [1, 2, 3]", "pl@ne [1, 2, 3, 4]", "plane [1, 2, 3, 400]"])
def test_parse_detections_rejects_malformed(text):
    with pytest.raises(F.BoxFormatError):
        F.parse_detections(text)


def test_oriented_detections():
    items = [("ship", (50, 50, 20, 10, 30)), ("harbor", (10, 10, 5, 5, -90)), ("ship", (1, 2, 3, 4, 100))]
    text = F.format_oriented_detections(items)
    assert text == "ship [50, 50, 20, 10, 30] [1, 2, 3, 4, -80]; harbor [10, 10, 5, 5, -90]"
    assert F.parse_oriented_detections(text) == [
        ("ship", (50, 50, 20, 10, 30)), ("ship", (1, 2, 3, 4, -80)), ("harbor", (10, 10, 5, 5, -90))]
    assert F.format_oriented_detections([]) == "none" and F.parse_oriented_detections("none") == []
    with pytest.raises(F.BoxFormatError):
        F.parse_oriented_detections("ship [1, 2, 3, 4]")


# ------------------------------------------------------------------------------------------------ masks


def test_format_and_parse_mask():
    grid = blank_grid()
    grid[3][4:9] = ["building"] * 5
    grid[3][20] = "low vegetation"
    text = F.format_mask(grid)
    lines = text.split("\n")
    assert len(lines) == 24 and lines[0] == "others*24"
    assert lines[3] == "others*4, building*5, others*11, low vegetation*1, others*3"
    assert F.parse_mask(text) == grid
    assert F.format_mask(np.array(grid)) == text  # numpy arrays of str work too


def test_parse_mask_tolerates_spacing_and_case():
    text = "\n".join(["Others * 24 "] * 23 + ["others*20,building*4"]) + "\n"
    grid = F.parse_mask(text)
    assert grid[0] == ["others"] * 24 and grid[23][20:] == ["building"] * 4


@pytest.mark.parametrize("text", [
    "\n".join(["others*24"] * 23),
    "\n".join(["others*24"] * 25),
    "\n".join(["others*24"] * 23 + ["others*23"]),
    "\n".join(["others*24"] * 23 + ["others*25"]),
    "\n".join(["others*24"] * 23 + ["others*0, building*24"]),
    "\n".join(["others*24"] * 23 + ["others*-4, building*28"]),
    "\n".join(["others*24"] * 23 + ["others"]),
    "\n".join(["others*24"] * 23 + ["oth*ers*24"]),
    "\n".join(["others*24"] * 23 + ["*24"]),
    "\n".join(["others*24"] * 23 + ["others*" + "9" * 5000]),
    "",
])
def test_parse_mask_rejects_malformed(text):
    with pytest.raises(F.MaskFormatError):
        F.parse_mask(text)


def test_format_mask_rejects_wrong_shape_and_labels():
    with pytest.raises(F.MaskFormatError):
        F.format_mask(blank_grid()[:23])
    grid = blank_grid()
    grid[0][0] = "a*b"
    with pytest.raises(F.MaskFormatError):
        F.format_mask(grid)


def test_mask_to_grid_divisible_majority_vote():
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[0:2, 0:2] = 1  # whole cell (0, 0)
    mask[0:2, 2] = 2  # half of cell (0, 1): a tie with background goes to the smaller id (0)
    mask[2:4, 2:4] = 2
    mask[2, 4:6] = 2
    mask[3, 4] = 2  # 3 of 4 pixels of cell (1, 2)
    grid = F.mask_to_grid(mask, {1: "plane", 2: "ship"})
    assert grid[0][0] == "plane" and grid[0][1] == "others"
    assert grid[1][1] == "ship" and grid[1][2] == "ship"
    assert sum(cell != "others" for row in grid for cell in row) == 3


def test_mask_to_grid_bool_uses_default_name():
    mask = np.zeros((24, 24), dtype=bool)
    mask[5, 7] = True
    grid = F.mask_to_grid(mask)
    assert grid[5][7] == "target" and F.grid_labels(grid) == ["target"]


def test_mask_to_grid_non_divisible_and_small_sizes():
    mask = np.zeros((50, 37), dtype=np.int32)
    mask[48:, 35:] = 1  # bottom-right corner: rows 48..49 and cols 35..36 are the last cell exactly
    grid = F.mask_to_grid(mask)
    assert grid[23][23] == "target" and F.grid_to_mask(grid, "target").sum() == 1
    small = np.zeros((10, 7), dtype=np.int64)
    small[9, 6] = 1
    grid = F.mask_to_grid(small)
    assert len(grid) == 24 and all(len(row) == 24 for row in grid)
    assert grid[23][23] == "target" and grid[0][0] == "others"


def test_mask_to_grid_errors():
    with pytest.raises(F.MaskFormatError):
        F.mask_to_grid(np.full((24, 24), 3))  # id 3 has no name
    with pytest.raises(F.MaskFormatError):
        F.mask_to_grid(np.zeros((24, 24), dtype=float))
    with pytest.raises(F.MaskFormatError):
        F.mask_to_grid(np.zeros((0, 24), dtype=int))


def test_grid_to_mask_and_labels():
    grid = blank_grid()
    grid[1][2] = "ship"
    grid[0][5] = "plane"
    grid[4][4] = "ship"
    assert F.grid_labels(grid) == ["plane", "ship"]
    m = F.grid_to_mask(grid, "ship")
    assert m.shape == (24, 24) and m.dtype == bool and m.sum() == 2 and m[1, 2] and m[4, 4]
    assert F.grid_labels(blank_grid()) == []


def test_upsample_grid_mask():
    mask24 = np.zeros((24, 24), dtype=bool)
    mask24[0, 0] = True
    up = F.upsample_grid_mask(mask24, 48, 72)
    assert up.shape == (48, 72) and up[:2, :3].all() and up.sum() == 6
    small = F.upsample_grid_mask(mask24, 5, 3)
    assert small.shape == (5, 3) and not small.any()  # pixel (0, 0) maps to the last cell that sampled it
    with pytest.raises(F.MaskFormatError):
        F.upsample_grid_mask(np.zeros((10, 10)), 5, 5)


# ------------------------------------------------------------------------------------------------ class lists


def test_class_lists():
    assert F.format_class_list(["Airport", "dense  residential"]) == "airport, dense residential"
    assert F.format_class_list([]) == "none"
    assert F.parse_class_list(" Airport ,, dense residential , ") == ["airport", "dense residential"]
    assert F.parse_class_list("NONE") == []
    for bad in (["a,b"], [""], ["none"]):
        with pytest.raises(F.FormatError):
            F.format_class_list(bad)


# ------------------------------------------------------------------------------------------------ pixels


def test_box_pixels_round_trip():
    assert F.box_to_pixels((10, 20, 50, 100), 200, 50) == (20.0, 10.0, 100.0, 50.0)
    assert F.box_from_pixels((20, 10, 100, 50), 200, 50) == pytest.approx((10, 20, 50, 100))
    assert F.box_from_pixels((-10, 0, 250, 60), 200, 50) == (0.0, 0.0, 100.0, 100.0)
    with pytest.raises(ValueError):
        F.box_to_pixels((1, 2, 3, 4), 0, 10)


def test_obb_to_pixels():
    assert F.obb_to_pixels((50, 50, 20, 10, 30), 200, 200) == pytest.approx((100, 100, 40, 20, 30))
    # Non-square, axis-aligned: each side scales by its own axis.
    assert F.obb_to_pixels((50, 25, 20, 10, 0), 200, 100) == pytest.approx((100, 25, 40, 10, 0))
    cx, cy, w, h, angle = F.obb_to_pixels((50, 25, 20, 10, -90), 200, 100)
    assert (cx, cy, w, h) == pytest.approx((100, 25, 20, 20)) and angle_diff(angle, -90) < 1e-9
    # Non-square and turned: the w edge keeps its pixel length and direction.
    cx, cy, w, h, angle = F.obb_to_pixels((50, 50, 20, 10, 45), 200, 100)
    assert w == pytest.approx(np.hypot(20 * 2 * 0.5 ** 0.5, 20 * 0.5 ** 0.5))
    assert angle == pytest.approx(np.degrees(np.arctan2(1, 2)))


# ------------------------------------------------------------------------------------------------ answers


def test_parse_answer_by_tag():
    vg = F.parse_answer("[VG]", "[1, 2, 3, 4]<|end|>")
    assert vg.boxes == [(1, 2, 3, 4)] and vg.error is None and vg.text == "[1, 2, 3, 4]"
    det = F.parse_answer("[DET]", "plane [1, 2, 3, 4]; ship [5, 6, 7, 8]")
    assert det.detections == [("plane", (1, 2, 3, 4)), ("ship", (5, 6, 7, 8))]
    obb = F.parse_answer("[OBB]", "ship [50, 50, 20, 10, 30] <|end|>")
    assert obb.obbs == [("ship", (50, 50, 20, 10, 30))] and obb.detections is None
    cls = F.parse_answer("[CLS]", "airport, beach")
    assert cls.labels == ["airport", "beach"]
    grid = blank_grid()
    grid[0][0] = "building"
    seg = F.parse_answer("[SEG]", F.format_mask(grid) + "<|end|>")
    assert seg.mask == grid and seg.error is None
    for tag in ("[CAP]", "[VQA]", "[REF]", "[CCD]"):
        free = F.parse_answer(tag, "  A plane [1, 2] near a runway. <|end|>")
        assert free.text == "A plane [1, 2] near a runway." and free.error is None
        assert (free.boxes, free.obbs, free.detections, free.mask, free.labels) == (None,) * 5


def test_parse_answer_reports_errors_instead_of_raising():
    bad = F.parse_answer("[VG]", "somewhere on the left")
    assert bad.boxes is None and "no box" in bad.error
    seg = F.parse_answer("[SEG]", "others*24")
    assert seg.mask is None and "24 rows" in seg.error
    unknown = F.parse_answer("[XYZ]", "hello")
    assert unknown.error and "unknown task tag" in unknown.error and unknown.text == "hello"


def test_to_dict_is_json_ready():
    d = F.parse_answer("[OBB]", "ship [50, 50, 20, 10, 30]").to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["obbs"] == [{"label": "ship", "obb": [50, 50, 20, 10, 30]}] and d["boxes"] is None
    d = F.parse_answer("[DET]", "plane [1, 2, 3, 4]").to_dict()
    assert d["detections"] == [{"label": "plane", "box": [1, 2, 3, 4]}] and d["task"] == "[DET]"
    assert set(d) == {"task", "text", "boxes", "obbs", "detections", "mask", "labels", "error", "partial", "dropped",
                      "notes", "filled_rows"}
    assert (d["partial"], d["dropped"], d["notes"], d["filled_rows"]) == (False, 0, [], [])


# ------------------------------------------------------------------------------------------------ properties

coord = st.integers(0, 100)
int_boxes = st.tuples(coord, coord, coord, coord).map(lambda b: (min(b[0], b[2]), min(b[1], b[3]),
                                                                 max(b[0], b[2]), max(b[1], b[3])))
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
labels = st.builds(lambda first, rest: first + "".join(sep + word for sep, word in rest),
                   words, st.lists(st.tuples(st.sampled_from(" -_"), words), max_size=2))
int_obbs = st.tuples(coord, coord, coord, coord, st.integers(-1000, 1000))


def grouped(items):
    """What a grouped format gives back: items stably ordered by the first appearance of their label."""
    first = {}
    for i, (label, _) in enumerate(items):
        first.setdefault(label, i)
    return sorted(items, key=lambda item: first[item[0]])


@SETTINGS
@given(st.lists(int_boxes, max_size=6))
def test_boxes_round_trip(boxes):
    assert F.parse_boxes(F.format_boxes(boxes)) == boxes


@SETTINGS
@given(st.tuples(*[st.floats(-50, 150, allow_nan=False)] * 4))
def test_float_box_formats_to_valid_box(box):
    x1, y1, x2, y2 = F.parse_box(F.format_box(box))
    assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 100
    assert abs(x1 - min(max(min(box[0], box[2]), 0), 100)) <= 0.5


@SETTINGS
@given(st.lists(int_obbs, max_size=6))
def test_obbs_round_trip_up_to_180(obbs):
    parsed = F.parse_obbs(F.format_obbs(obbs))
    assert len(parsed) == len(obbs)
    for (cx, cy, w, h, angle), got in zip(obbs, parsed):
        assert got[:4] == (cx, cy, w, h)
        assert -90 <= got[4] < 90 and (got[4] - angle) % 180 == 0


@SETTINGS
@given(st.floats(0, 100), st.floats(0, 100), st.floats(1, 100), st.floats(0, 100), st.floats(-720, 720))
def test_corners_round_trip(cx, cy, w, h, angle):
    got = F.obb_from_corners(F.obb_corners(cx, cy, w, h, angle))
    assert got[:4] == pytest.approx((cx, cy, w, h), abs=1e-9)
    assert -90 <= got[4] < 90 and angle_diff(got[4], angle) < 1e-7


@SETTINGS
@given(st.lists(st.tuples(labels, int_boxes), max_size=8))
def test_detections_round_trip(items):
    assert F.parse_detections(F.format_detections(items)) == grouped(items)


@SETTINGS
@given(st.lists(st.tuples(labels, st.tuples(coord, coord, coord, coord, st.integers(-90, 89))), max_size=8))
def test_oriented_detections_round_trip(items):
    assert F.parse_oriented_detections(F.format_oriented_detections(items)) == grouped(items)


@SETTINGS
@given(st.lists(labels, min_size=1, max_size=4, unique=True), st.integers(0, 2 ** 32 - 1), st.integers(1, 24))
def test_mask_round_trip(names, seed, block):
    # Blocks of block x block cells give long runs for large blocks and one-cell runs for block == 1.
    rng = np.random.default_rng(seed)
    coarse = rng.choice(names + [F.BACKGROUND], size=(24 // block + 1, 24 // block + 1))
    grid = np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:24, :24].tolist()
    text = F.format_mask(grid)
    assert len(text.split("\n")) == 24
    assert F.parse_mask(text) == grid


@settings(max_examples=40, deadline=None)
@given(st.integers(24, 90), st.integers(24, 90), st.integers(0, 2 ** 32 - 1))
def test_upsample_then_downsample_gives_grid_back(height, width, seed):
    mask24 = np.random.default_rng(seed).integers(0, 3, size=(24, 24))
    full = F.upsample_grid_mask(mask24, height, width)
    assert full.shape == (height, width)
    grid = F.mask_to_grid(full, {1: "plane", 2: "ship"})
    assert F.grid_to_mask(grid, "ship").tolist() == (mask24 == 2).tolist()
    assert F.grid_to_mask(grid, "plane").tolist() == (mask24 == 1).tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(0, 2 ** 32 - 1))
def test_small_masks_survive_grid_and_back(height, width, seed):
    # Up to 24 pixels a side every pixel is sampled by some cell, and upsampling maps it back to such a cell.
    mask = np.random.default_rng(seed).integers(0, 2, size=(height, width)).astype(bool)
    grid = F.mask_to_grid(mask)
    assert len(grid) == 24 and all(len(row) == 24 for row in grid)
    assert F.upsample_grid_mask(F.grid_to_mask(grid, "target"), height, width).tolist() == mask.tolist()


@SETTINGS
@given(st.lists(labels.filter(lambda s: s != "none"), max_size=6))
def test_class_list_round_trip(names):
    assert F.parse_class_list(F.format_class_list(names)) == names


# Fuzzing: arbitrary text, and text from the formats' own alphabet so the deeper branches are reached too.
fuzz_text = st.one_of(st.text(), st.text(alphabet="[]0123456789,;* -\nothersnplaei<|>", max_size=200))
STRICT_PARSERS = [F.parse_boxes, F.parse_box, F.parse_obbs, F.parse_detections, F.parse_oriented_detections,
                  F.parse_mask, F.parse_class_list]


@SETTINGS
@given(fuzz_text)
def test_strict_parsers_raise_only_format_error(text):
    for parser in STRICT_PARSERS:
        try:
            result = parser(text)
        except F.FormatError as exc:
            assert str(exc)  # errors carry a message for the runtime's parse_error field
        else:
            assert isinstance(result, (list, tuple))


@SETTINGS
@given(st.sampled_from(TAGS), fuzz_text)
def test_parse_answer_never_raises(tag, text):
    answer = F.parse_answer(tag, text)
    assert answer.task == tag and isinstance(answer.text, str)
    assert not (answer.error or "").startswith("internal parser error")
    structured = [answer.boxes, answer.obbs, answer.detections, answer.mask, answer.labels]
    if answer.error is not None:
        assert all(s is None for s in structured)
    json.dumps(answer.to_dict())
