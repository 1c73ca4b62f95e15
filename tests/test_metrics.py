"""rsvlm_edge.training.metrics against values computed by hand (derivations in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsvlm_edge.formats import obb_corners
from rsvlm_edge.training import metrics as m

# --------------------------------------------------------------------------------------------------- answers


def test_accuracy_normalises_case_space_and_period():
    preds = ["Yes.", "  no ", "Two   Planes", None, "x"]
    refs = ["yes", "No", "two planes.", "yes", "y"]
    assert m.accuracy(preds, refs) == pytest.approx(3 / 5)
    assert m.normalize_answer(" A  Dense\tResidential Area. ") == "a dense residential area"
    assert m.normalize_answer(None) is None
    assert m.accuracy(["3.5"], ["3.5."]) == 1.0


def test_accuracy_empty_and_length_mismatch():
    assert m.accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        m.accuracy(["a"], [])


def test_vqa_accuracy_by_type():
    preds = ["yes", "no", "12", None, "Rural"]
    refs = ["yes", "yes", "12", "3", "rural"]
    types = ["presence", "presence", "count", "count", "rural_urban"]
    out = m.vqa_accuracy_by_type(preds, refs, types)
    assert out == {"count": 0.5, "presence": 0.5, "rural_urban": 1.0, "overall": pytest.approx(3 / 5)}
    assert m.vqa_accuracy_by_type([], [], []) == {"overall": 0.0}


# --------------------------------------------------------------------------------------------------- BLEU

REF = "a large plane is parked on the runway"
CAND = "a large plane is parked near the runway"


def test_caption_tokens():
    assert m.caption_tokens("A plane, parked near  the run-way.") == ["a", "plane", "parked", "near", "the", "run", "way"]
    assert m.caption_tokens(None) == []


def test_bleu_identical_is_one():
    assert m.bleu4([REF], [[REF]]) == pytest.approx(1.0)
    assert m.bleu4([REF, "two ships in the harbor"], [["something else entirely", REF.upper() + "."],
                                                      ["two ships in the harbor"]]) == pytest.approx(1.0)


def test_bleu_partial_overlap_by_hand():
    # 8 words each; precisions: 1-grams 7/8 (all but "near"), 2-grams 5/7, 3-grams 3/6, 4-grams 2/5; BP = 1
    # BLEU = (7/8 * 5/7 * 3/6 * 2/5) ** (1/4) = (1/8) ** (1/4)
    assert m.bleu4([CAND], [[REF]]) == pytest.approx(0.125 ** 0.25)


def test_bleu_brevity_penalty_by_hand():
    # every n-gram of the 5-word candidate is in the 8-word reference: precision 1, BP = exp(1 - 8/5)
    assert m.bleu4(["a large plane is parked"], [[REF]]) == pytest.approx(math.exp(-0.6))


def test_bleu_is_corpus_level():
    # unigrams (7+6)/(8+6), bigrams (5+5)/(7+5), trigrams (3+4)/(6+4), 4-grams (2+3)/(5+3); c = r = 14
    expected = (13 / 14 * 10 / 12 * 7 / 10 * 5 / 8) ** 0.25
    got = m.bleu4([CAND, "two ships in the harbor today"], [[REF], ["two ships in the harbor today"]])
    assert got == pytest.approx(expected)
    assert got != pytest.approx((0.125 ** 0.25 + 1) / 2)  # not a mean of sentence scores


def test_bleu_closest_reference_length_ties_to_shorter():
    # refs of 6 and 4 words are both 1 away from the 5-word candidate: r = 4 < c, so no brevity penalty
    assert m.bleu4(["a b c d e"], [["a b c d e f", "a b c d"]]) == pytest.approx(1.0)


def test_bleu_degenerate_inputs():
    assert m.bleu4([], []) == 0.0
    assert m.bleu4([None], [[REF]]) == 0.0
    assert m.bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0  # no 4-gram matches
    assert m.bleu4([REF], [REF]) == pytest.approx(1.0)  # a plain string is one reference
    assert m.bleu4([REF], [[]]) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------- CIDEr-D

REFS_A = ["a plane on the runway"]
REFS_B = ["a ship in the harbor"]


def test_cider_identical_candidates_score_ten():
    # n-grams unique to one image have idf log 2, shared ones ("a", "the") idf 0: an identical candidate has
    # cosine 1 for every n, no length penalty, so 10 * mean(1, 1, 1, 1) = 10
    assert m.cider(["a plane on the runway", "a ship in the harbor"], [REFS_A, REFS_B]) == pytest.approx(10.0)


def test_cider_partial_by_hand():
    # candidate A "a plane on a road" vs "a plane on the runway" (L = log 2, "road"/"on a"... unseen -> idf L):
    #   n=1: hyp {plane, on, road} L each, ref {plane, on, runway}: 2L^2 / (sqrt3 L)^2 = 2/3
    #   n=2: 2 shared of 4 each: 2/4;  n=3: 1 of 3: 1/3;  n=4: 0;  equal lengths: no penalty
    #   A = 10 * (2/3 + 1/2 + 1/3 + 0) / 4 = 3.75; B identical = 10; corpus = 6.875
    got = m.cider(["a plane on a road", "a ship in the harbor"], [REFS_A, REFS_B])
    assert got == pytest.approx(6.875)


def test_cider_ranks_identical_above_partial_above_unrelated():
    refs = [["a plane on the runway", "an airplane parked on the runway"], ["a ship in the harbor"],
            ["many trees in a green forest"]]
    tail = ["a ship in the harbor", "many trees in a green forest"]
    identical = m.cider(["a plane on the runway", *tail], refs)
    partial = m.cider(["a plane on the grass", *tail], refs)
    unrelated = m.cider(["green forest trees", *tail], refs)
    longer = m.cider(["a plane on the runway " + "on the runway " * 4, *tail], refs)
    assert identical > partial > unrelated
    assert identical > longer  # clipping and the length penalty punish repetition
    unrelated_alone = m.cider(["zebra xylophone quartz"], [["a plane on the runway"]] * 1)
    assert unrelated_alone == 0.0


def test_cider_degenerate_inputs():
    assert m.cider([], []) == 0.0
    # one sample: every idf is log(1) - log(1) = 0, so CIDEr is 0 whatever the candidate (documented)
    assert m.cider(["a plane on the runway"], [REFS_A]) == 0.0
    assert m.cider([None, "a ship in the harbor"], [REFS_A, REFS_B]) == pytest.approx(5.0)
    assert m.cider(["x", "a ship in the harbor"], [[], REFS_B]) == pytest.approx(5.0)  # no refs -> 0 for that one


# --------------------------------------------------------------------------------------------------- boxes


def test_box_iou_known_rectangles():
    assert m.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert m.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert m.box_iou([0, 0, 10, 10], [0, 0, 5, 10]) == pytest.approx(0.5)
    assert m.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching
    assert m.box_iou([0, 0, 10, 10], [30, 30, 40, 40]) == 0.0
    assert m.box_iou((0.0, 0.0, 1.0, 2.0), np.array([0, 1, 1, 3])) == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [None, [1, 2, 3], [0, 0, float("nan"), 1], "0 0 1 1", [[0, 0, 1, 1]], 7])
def test_box_iou_malformed_is_zero(bad):
    assert m.box_iou(bad, [0, 0, 10, 10]) == 0.0
    assert m.box_iou([0, 0, 10, 10], bad) == 0.0


def test_box_iou_degenerate():
    assert m.box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # swapped corners: no area
    assert m.box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # empty union


def test_centre_distances_take_the_first_box_and_the_nearest_reference():
    d = m.centre_distances([[[0, 0, 10, 10], [50, 50, 60, 60]], [20, 20, 30, 30], None, []],
                           [[[40, 40, 50, 50], [3, 4, 13, 14]], [20, 20, 30, 30], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert d[0] == pytest.approx(5.0) and d[1] == 0.0 and np.isinf(d[2]) and np.isinf(d[3])


def test_acc_at_iou():
    ref = [0, 0, 10, 10]
    preds = [[[0, 0, 10, 10], [50, 50, 60, 60]],  # first box right -> hit
             [[50, 50, 60, 60], [0, 0, 10, 10]],  # only the first counts -> miss
             None, [], [0, 0, 10, 10],  # missing, empty, one bare box (hit)
             ]
    assert m.acc_at_iou(preds, [ref] * 5) == pytest.approx(2 / 5)
    # IoU of [0,0,10,10] with [0,0,10,20] is exactly 0.5: a hit at 0.5 (>=), a miss above
    assert m.acc_at_iou([[[0, 0, 10, 10]]], [[0, 0, 10, 20]], 0.5) == 1.0
    assert m.acc_at_iou([[[0, 0, 10, 10]]], [[0, 0, 10, 20]], 0.51) == 0.0
    # a list of reference boxes: the best one counts
    assert m.acc_at_iou([[[50, 50, 60, 60]]], [[[0, 0, 10, 10], [50, 50, 60, 60]]]) == 1.0
    assert m.acc_at_iou([], []) == 0.0
    with pytest.raises(ValueError, match="sample 0"):
        m.acc_at_iou([None], [None])
    with pytest.raises(ValueError):
        m.acc_at_iou([None], [])


def test_detection_f1_by_hand():
    pred = [
        [("plane", [0, 0, 10, 10]), ("plane", [20, 20, 30, 30]), ("ship", [0, 0, 10, 10])],
        None,
        [("Plane ", [0, 0, 10, 10]), ("bad",), ("x", None)],
    ]
    ref = [
        [("plane", [0, 0, 10, 10]), ("ship", [50, 50, 60, 60])],
        [("plane", [0, 0, 10, 10])],
        [("plane", [1, 1, 10, 10])],
    ]
    # image 1: plane tp 1 fp 1, ship fp 1 fn 1 (IoU 0); image 2: fn 1; image 3: tp 1 (IoU .81, label
    # normalised), two malformed items fp 2 -> tp 2, fp 4, fn 2
    out = m.detection_f1(pred, ref)
    assert (out["tp"], out["fp"], out["fn"]) == (2, 4, 2)
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(0.4)


def test_detection_greedy_matching_is_one_to_one_and_order_free():
    # p1 overlaps r (10/18), p2 overlaps r better (18/20): p2 takes r, p1 is a false positive either way
    p1, p2, r = ("car", [0, 0, 10, 10]), ("car", [0, 0, 10, 20]), ("car", [0, 0, 10, 18])
    for order in ([p1, p2], [p2, p1]):
        out = m.detection_f1([order], [[r]])
        assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 0)
    # duplicates of one correct box: one TP, the copies are FPs
    out = m.detection_f1([[r, r, r]], [[r]])
    assert (out["tp"], out["fp"], out["fn"]) == (1, 2, 0)
    # labels must agree
    assert m.detection_f1([[("ship", r[1])]], [[r]])["f1"] == 0.0


def test_detection_f1_empty():
    assert m.detection_f1([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    assert m.detection_f1([[]], [[]])["f1"] == 0.0
    with pytest.raises(ValueError, match="sample 0"):
        m.detection_f1([[]], [[("plane", [1, 2])]])


# --------------------------------------------------------------------------------------------------- oriented boxes


def test_obb_iou_analytic_values():
    assert m.obb_iou((50, 50, 20, 10, 0), (50, 50, 20, 10, 0)) == pytest.approx(1.0)
    # a square and the same square turned 45 degrees: the overlap is a regular octagon of area 2*sqrt(2) - 2
    # (for side 1), so IoU = (2 sqrt2 - 2) / (4 - 2 sqrt2) = 1 / sqrt(2)
    assert m.obb_iou((50, 50, 20, 20, 0), (50, 50, 20, 20, 45)) == pytest.approx(1 / math.sqrt(2))
    assert m.obb_iou((50, 50, 20, 20, 10), (50, 50, 20, 20, -35)) == pytest.approx(1 / math.sqrt(2))
    # the same rectangle written two ways / turned by 180 degrees
    assert m.obb_iou((50, 50, 20, 10, 0), (50, 50, 10, 20, 90)) == pytest.approx(1.0)
    assert m.obb_iou((50, 50, 20, 10, -90), (50, 50, 20, 10, 90)) == pytest.approx(1.0)
    # shifted by half a side along its own (turned) w edge: overlap 1/2 of each, IoU 1/3
    assert m.obb_iou((50, 50, 20, 20, 0), (60, 50, 20, 20, 0)) == pytest.approx(1 / 3)
    t = math.radians(30)
    assert m.obb_iou((50, 50, 20, 20, 30), (50 + 10 * math.cos(t), 50 + 10 * math.sin(t), 20, 20, 30)) == \
        pytest.approx(1 / 3)
    # a thin rectangle across another at right angles: overlap 2x2 = 4, union 40 + 40 - 4
    assert m.obb_iou((50, 50, 20, 2, 0), (50, 50, 20, 2, 90)) == pytest.approx(4 / 76)


def test_obb_iou_degenerate_and_malformed():
    assert m.obb_iou((10, 10, 5, 5, 0), (80, 80, 5, 5, 30)) == 0.0
    assert m.obb_iou((10, 10, 0, 5, 0), (10, 10, 0, 5, 0)) == 0.0
    for bad in (None, (1, 2, 3, 4), (1, 2, 3, 4, float("inf")), "abc", [[1, 2, 3, 4, 5]]):
        assert m.obb_iou(bad, (50, 50, 20, 10, 0)) == 0.0


def test_obb_iou_matches_box_iou_without_rotation():
    rng = np.random.default_rng(0)
    for _ in range(100):
        a, b = rng.uniform(0, 100, 4), rng.uniform(0, 100, 4)
        xa, ya, xb, yb = np.sort(a[:2]), np.sort(a[2:]), np.sort(b[:2]), np.sort(b[2:])
        box_a, box_b = (xa[0], ya[0], xa[1], ya[1]), (xb[0], yb[0], xb[1], yb[1])
        obb_a = (xa.mean(), ya.mean(), xa[1] - xa[0], ya[1] - ya[0], 0)
        obb_b = (xb.mean(), yb.mean(), xb[1] - xb[0], yb[1] - yb[0], 0)
        assert m.obb_iou(obb_a, obb_b) == pytest.approx(m.box_iou(box_a, box_b), abs=1e-9)


def _raster_iou(a, b, n=600):
    """Independent estimate: count grid points inside both rectangles (projection onto each box's axes)."""
    xs = (np.arange(n) + 0.5) / n * 100
    px, py = np.meshgrid(xs, xs)

    def inside(o):
        c = obb_corners(*o)
        u, v = c[1] - c[0], c[3] - c[0]
        dx, dy = px - c[0][0], py - c[0][1]
        su, sv = (dx * u[0] + dy * u[1]) / (u @ u), (dx * v[0] + dy * v[1]) / (v @ v)
        return (su >= 0) & (su <= 1) & (sv >= 0) & (sv <= 1)

    ia, ib = inside(a), inside(b)
    return (ia & ib).sum() / max(1, (ia | ib).sum())


def test_obb_iou_against_rasterisation():
    rng = np.random.default_rng(1)
    for _ in range(12):
        a = (*rng.uniform(35, 65, 2), *rng.uniform(10, 40, 2), rng.uniform(-90, 90))
        b = (a[0] + rng.uniform(-10, 10), a[1] + rng.uniform(-10, 10), *rng.uniform(10, 40, 2), rng.uniform(-90, 90))
        got = m.obb_iou(a, b)
        assert got == pytest.approx(m.obb_iou(b, a), abs=1e-9)
        assert got == pytest.approx(_raster_iou(a, b), abs=0.015)


def test_obb_detection_f1():
    pred = [[("ship", (50, 50, 20, 20, 0)), ("ship", (10, 10, 4, 4, 0))], [("plane", (50, 50, 20, 20, 45))]]
    ref = [[("ship", (50, 50, 20, 20, 5))], [("plane", (50, 50, 20, 20, 0))]]
    # image 1: IoU high -> tp 1, the second ship fp 1; image 2: IoU 0.707 >= 0.5 -> tp 1 (miss at thr 0.75)
    assert m.obb_detection_f1(pred, ref) == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                                             "f1": pytest.approx(0.8), "tp": 2, "fp": 1, "fn": 0}
    assert m.obb_detection_f1(pred, ref, thr=0.75)["tp"] == 1


# --------------------------------------------------------------------------------------------------- masks


def _grid(*bands: tuple[str, int]) -> list[list[str]]:
    rows = [label for label, count in bands for _ in range(count)]
    assert len(rows) == 24
    return [[label] * 24 for label in rows]


def test_mask_iou_by_hand():
    ref = _grid(("building", 12), ("others", 12))
    pred = _grid(("Building", 6), ("others", 12), ("road", 6))
    # building: 6 rows shared of 12 -> 1/2; others: rows 12-17 shared, rows 6-23 in either -> 6/18;
    # road only predicted -> 0
    assert m.mask_class_ious([pred], [ref]) == {"building": 0.5, "others": pytest.approx(1 / 3), "road": 0.0}
    scores = m.mask_scores([pred], [ref])
    assert scores["miou"] == pytest.approx(0.25)  # (1/2 + 0) / 2: foreground only
    assert scores["background_iou"] == pytest.approx(1 / 3)
    assert scores["miou_with_background"] == pytest.approx((0.5 + 1 / 3 + 0) / 3)
    assert m.mask_miou([pred], [ref]) == pytest.approx(0.25)
    assert m.mask_miou([np.array(ref)], [np.array(ref)]) == 1.0


def test_mask_iou_accumulates_over_dataset_and_handles_missing():
    ref = _grid(("building", 12), ("others", 12))
    pred = _grid(("building", 6), ("others", 12), ("road", 6))
    empty = _grid(("others", 24))
    # a missing prediction for an all-background reference adds 576 cells to the background union only:
    # others IoU = 144 / (432 + 576) = 1/7; the foreground mIoU does not change
    for missing in (None, "garbage", [["others"] * 23] * 24, [[1] * 24] * 24):
        scores = m.mask_scores([pred, missing], [ref, empty])
        assert scores["background_iou"] == pytest.approx(1 / 7)
        assert scores["miou"] == pytest.approx(0.25)
    assert m.mask_miou([], []) == 0.0
    assert m.mask_scores([empty], [empty]) == {"miou": 0.0, "background_iou": 1.0, "miou_with_background": 1.0}
    with pytest.raises(ValueError, match="sample 0"):
        m.mask_miou([empty], [None])


def test_change_f1_by_hand():
    ref = np.zeros((4, 4), bool)
    ref[0] = True
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = pred[1, :2] = True
    # tp 2, fp 2, fn 2 -> precision = recall = F1 = 1/2, IoU 2/6
    assert m.change_scores([pred], [ref]) == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "iou": pytest.approx(1 / 3)}
    # plus a missing prediction for 2 change pixels: fn 4 -> F1 = 4 / (4 + 2 + 4), accumulated not averaged
    ref2 = np.zeros((2, 2), bool)
    ref2[0] = True
    assert m.change_f1([pred, None], [ref, ref2]) == pytest.approx(0.4)
    assert m.change_f1([pred, np.ones((3, 3), bool)], [ref, ref2]) == pytest.approx(0.4)  # wrong shape = missing
    assert m.change_f1([pred.astype(np.uint8) * 255], [ref]) == 0.5  # non-zero means change
    assert m.change_f1([], []) == 0.0
    assert m.change_f1([np.zeros((2, 2))], [np.zeros((2, 2))]) == 0.0  # 0/0 -> 0.0 (documented)


# --------------------------------------------------------------------------------------------------- robustness

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(junk)
def test_malformed_predictions_never_crash(pred):
    box, obb = [0, 0, 10, 10], (50, 50, 10, 10, 0)
    grid = _grid(("others", 24))
    for value in (
        m.accuracy([pred], ["yes"]),
        m.bleu4([pred], [["a plane"]]),
        m.cider([pred, "a"], [["a plane"], ["b"]]),
        m.box_iou(pred, box),
        m.obb_iou(pred, obb),
        m.acc_at_iou([pred], [box]),
        m.detection_f1([pred], [[("plane", box)]])["f1"],
        m.obb_detection_f1([pred], [[("plane", obb)]])["f1"],
        m.mask_miou([pred], [grid]),
        m.change_f1([pred], [np.ones((2, 2), bool)]),
    ):
        assert isinstance(value, float) and math.isfinite(value)


def test_grounding_report_separates_wrong_objects_from_loose_boxes():
    from rsvlm_edge import formats
    from rsvlm_edge.training.evaluate import Prediction, score
    from rsvlm_edge.training.sample import Sample

    ref = [40, 40, 60, 60]
    answers = ["[40, 40, 60, 60]", "[45, 45, 55, 55]", "[0, 0, 10, 10]", "none"]  # exact, right centre but small, far, none
    preds = [Prediction(Sample([], "rgb", "[VG] the ship", formats.format_box(ref), target={"boxes": [ref]}),
                        text, formats.parse_answer("[VG]", text), expert=1) for text in answers]
    res = score(preds)
    assert res["vg/acc@0.5"] == pytest.approx(0.25)
    assert res["vg/centre_within_6"] == pytest.approx(0.5)  # the exact and the small box are on the object
    assert res["vg/centre_error_median"] == pytest.approx(45 * 2 ** 0.5 / 2)  # median of 0, 0, 45*sqrt2, diagonal
