"""Evaluation metrics for ``rsvlm-edge eval`` (numpy only).

Conventions shared by every function here
-----------------------------------------
* Predictions may be malformed: ``None`` (an answer that did not parse) means *missing* and scores as a miss, and a
  prediction of the wrong type or shape is treated the same way. Predictions never raise.
* References are ground truth: a malformed reference, or prediction and reference lists of different lengths, is a
  caller bug and raises :class:`ValueError` naming the sample.
* Empty inputs, and ratios that are undefined (0 / 0: nothing to find and nothing predicted), score ``0.0``, never
  ``nan``, so reports stay valid JSON. Scores are plain Python floats.
* Boxes ``(x1, y1, x2, y2)`` and oriented boxes ``(cx, cy, w, h, angle)`` (whole degrees, the convention of
  :func:`rsvlm_edge.formats.obb_corners`) may be in any unit, as long as predictions and references share it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from numbers import Real
from typing import Any

import numpy as np

from rsvlm_edge.formats import BACKGROUND, obb_corners

__all__ = [
    "acc_at_iou",
    "accuracy",
    "bleu4",
    "box_iou",
    "caption_tokens",
    "change_f1",
    "change_scores",
    "cider",
    "detection_f1",
    "mask_class_ious",
    "mask_miou",
    "mask_scores",
    "normalize_answer",
    "obb_detection_f1",
    "obb_iou",
    "vqa_accuracy_by_type",
]


def _check_lengths(preds: Sequence[Any], refs: Sequence[Any], what: str = "references") -> None:
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} {what}")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


# --------------------------------------------------------------------------------------------------- answers


def normalize_answer(text: Any) -> str | None:
    """Lower-case, collapse whitespace, drop trailing periods; None (a missing answer) stays None."""
    if text is None:
        return None
    clean = " ".join(str(text).lower().split())
    return clean.rstrip(". ").strip()


def _matches(pred: Any, ref: Any) -> bool:
    p = normalize_answer(pred)
    return p is not None and p == normalize_answer(ref)


def accuracy(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Exact-match accuracy after :func:`normalize_answer` (``"Yes."`` == ``"yes"``); a None prediction misses."""
    _check_lengths(preds, refs)
    return _ratio(sum(_matches(p, r) for p, r in zip(preds, refs)), len(refs))


def vqa_accuracy_by_type(preds: Sequence[Any], refs: Sequence[Any], types: Sequence[Any]) -> dict[str, float]:
    """Exact-match accuracy per question type (``str(type)``, sorted) plus ``"overall"`` over every question."""
    _check_lengths(preds, refs)
    _check_lengths(preds, types, "question types")
    hits: dict[str, list[bool]] = {}
    for p, r, t in zip(preds, refs, types):
        hits.setdefault(str(t), []).append(_matches(p, r))
    out = {t: _ratio(sum(h), len(h)) for t, h in sorted(hits.items())}
    out["overall"] = accuracy(preds, refs)
    return out


# --------------------------------------------------------------------------------------------------- captions

_WORD = re.compile(r"[^\W_]+")


def caption_tokens(text: Any) -> list[str]:
    """Lower-case words: runs of letters/digits; whitespace and punctuation only separate (coco-caption drops
    punctuation too). None -> []."""
    if text is None:
        return []
    return _WORD.findall(str(text).lower())


def _reference_list(refs: Any, index: int) -> list[str]:
    if refs is None:
        return []
    if isinstance(refs, str):
        return [refs]
    if isinstance(refs, Iterable):
        return [str(r) for r in refs if r is not None]
    raise ValueError(f"sample {index}: references must be a string or a list of strings, got {refs!r}")


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(candidates: Sequence[Any], references: Sequence[Any]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002): uniform weights over modified n-gram precisions n = 1..4, clipped by the
    largest count in any one reference, summed over the corpus, times the brevity penalty ``exp(1 - r / c)`` when the
    total candidate length ``c`` is not longer than ``r``, the summed lengths of the reference closest in length to
    each candidate (ties -> the shorter). No smoothing: a corpus without any matching 4-gram scores 0.0.

    ``references[i]`` is a list of strings (a single string is one reference). Text goes through
    :func:`caption_tokens`; a None candidate is the empty sentence.
    """
    _check_lengths(candidates, references)
    clipped, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        words = caption_tokens(cand)
        ref_words = [caption_tokens(r) for r in _reference_list(refs, i)]
        cand_len += len(words)
        if ref_words:
            ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, 5):
            counts = _ngrams(words, n)
            most: Counter[tuple[str, ...]] = Counter()
            for r in ref_words:
                most |= _ngrams(r, n)  # union keeps the larger count of each n-gram
            clipped[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            total[n - 1] += sum(counts.values())
    if cand_len == 0 or min(clipped) == 0:
        return 0.0
    log_precision = sum(math.log(c / t) for c, t in zip(clipped, total)) / 4.0
    brevity = 1.0 if cand_len > ref_len else math.exp(1.0 - ref_len / cand_len)
    return float(brevity * math.exp(log_precision))


def _all_ngrams(words: Sequence[str], max_n: int = 4) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        counts.update(_ngrams(words, n))
    return counts


def cider(candidates: Sequence[Any], references: Sequence[Any], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D as coco-caption computes it (Vedantam et al. 2015).

    For n = 1..4 every sentence becomes a TF-IDF vector of its n-grams: term count times
    ``log(N) - log(max(1, df))``, with ``N`` the number of evaluated samples and ``df`` the number of samples whose
    references contain the n-gram. **The IDF therefore comes from the reference set being evaluated**, not from a
    fixed corpus: scores of different sets are not comparable, and a single sample always scores 0. Per reference,
    the similarity is sum over the candidate's n-grams of ``min(cand, ref) * ref`` (clipping) divided by both norms,
    times the Gaussian length penalty ``exp(-delta**2 / (2 * sigma**2))`` where ``delta`` is the difference in
    bigram counts (coco-caption's choice; for sentences of 2+ words the word-count difference). A sample's score is
    the mean over n, averaged over its references, times 10; the corpus score is the mean over samples.
    Text goes through :func:`caption_tokens`; a None candidate is the empty sentence.
    """
    _check_lengths(candidates, references)
    if not candidates:
        return 0.0
    ref_counts = [[_all_ngrams(caption_tokens(r)) for r in _reference_list(refs, i)]
                  for i, refs in enumerate(references)]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs) if refs else ())
    log_docs = math.log(len(ref_counts))

    def vectorize(counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], np.ndarray, int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(4)]
        norm = np.zeros(4)
        bigrams = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
            vec[n][gram] = weight
            norm[n] += weight * weight
            if n == 1:
                bigrams += tf
        return vec, np.sqrt(norm), bigrams

    scores = []
    for cand, refs in zip(candidates, ref_counts):
        if not refs:
            scores.append(0.0)
            continue
        vh, nh, lh = vectorize(_all_ngrams(caption_tokens(cand)))
        total = np.zeros(4)
        for ref in refs:
            vr, nr, lr = vectorize(ref)
            penalty = math.exp(-((lh - lr) ** 2) / (2.0 * sigma ** 2))
            for n in range(4):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------------- boxes


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers, or None for anything else (strings, wrong length, nan ...)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != count or not all(math.isfinite(v) for v in out):
        return None
    return out


def _is_shape(value: Any, count: int) -> bool:
    """One box / oriented box (a flat sequence of ``count`` numbers), as opposed to a list of them."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.size == count
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == count
            and all(isinstance(v, Real) for v in value))


def box_iou(a: Any, b: Any) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes; a malformed box or an empty union gives 0.0. Corners are not
    reordered: a box with ``x2 < x1`` has no area (``formats.parse_boxes`` already orders model output)."""
    pa, pb = _numbers(a, 4), _numbers(b, 4)
    if pa is None or pb is None:
        return 0.0
    area_a = max(0.0, pa[2] - pa[0]) * max(0.0, pa[3] - pa[1])
    area_b = max(0.0, pb[2] - pb[0]) * max(0.0, pb[3] - pb[1])
    iw = min(pa[2], pb[2]) - max(pa[0], pb[0])
    ih = min(pa[3], pb[3]) - max(pa[1], pb[1])
    inter = max(0.0, iw) * max(0.0, ih)
    return _ratio(inter, area_a + area_b - inter)


def _ref_boxes(ref: Any, index: int) -> list[tuple[float, ...]]:
    items = [ref] if _is_shape(ref, 4) else ref
    try:
        boxes = [_numbers(b, 4) for b in items]
    except TypeError:
        boxes = [None]
    if not boxes or any(b is None for b in boxes):
        raise ValueError(f"sample {index}: reference must be a box (x1, y1, x2, y2) or a list of boxes, got {ref!r}")
    return boxes  # type: ignore[return-value]


def _first_box(pred: Any) -> Any:
    """The box a grounding answer is scored by: ``pred`` itself when it is one box, else the first of a list of
    boxes; None for None, an empty list or something that is not iterable (the caller still validates the box)."""
    if pred is None or _is_shape(pred, 4):
        return pred
    try:
        return next(iter(pred), None)
    except TypeError:
        return None


def acc_at_iou(pred_boxes: Sequence[Any], ref_boxes: Sequence[Any], thr: float = 0.5) -> float:
    """Visual-grounding accuracy: the share of samples whose *first* predicted box has IoU >= ``thr`` with the
    reference (with the best of them when the reference is a list of boxes).

    ``pred_boxes[i]`` is a list of boxes (only the first counts) or one box; None, an empty list or a malformed
    box is a miss. ``ref_boxes[i]`` is one box or a non-empty list of boxes.
    """
    _check_lengths(pred_boxes, ref_boxes)
    hits = 0
    for i, (pred, ref) in enumerate(zip(pred_boxes, ref_boxes)):
        refs = _ref_boxes(ref, i)
        box = _first_box(pred)
        if box is not None and max(box_iou(box, r) for r in refs) >= thr:
            hits += 1
    return _ratio(hits, len(ref_boxes))


def centre_distances(pred_boxes: Sequence[Any], ref_boxes: Sequence[Any]) -> np.ndarray:
    """Per sample, the distance from the first predicted box's centre to the nearest reference box centre (``inf``
    for a missing or malformed box). It separates the two ways grounding fails: a box on the wrong object (far)
    against a box on the right object with loose edges (near, yet under the IoU threshold)."""
    _check_lengths(pred_boxes, ref_boxes)
    out = np.full(len(ref_boxes), np.inf)
    for i, (pred, ref) in enumerate(zip(pred_boxes, ref_boxes)):
        refs = _ref_boxes(ref, i)
        first = _first_box(pred)
        box = _numbers(first, 4) if first is not None else None
        if box is not None:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            out[i] = min(float(np.hypot(cx - (r[0] + r[2]) / 2, cy - (r[1] + r[3]) / 2)) for r in refs)
    return out


# --------------------------------------------------------------------------------------------------- oriented boxes


def _signed_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """z of (a - o) x (b - o): > 0 when b lies to the left of o->a."""
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of polygon ``subject`` inside convex polygon ``clip`` (both counter-clockwise
    in the array's frame, i.e. positive signed area). Returns an (k, 2) array, k = 0 when they do not overlap."""
    points = list(subject)
    n = len(clip)
    for k in range(n):
        a, b = clip[k], clip[(k + 1) % n]
        if not points:
            break
        inside = [_cross(a, b, p) >= 0.0 for p in points]
        kept: list[np.ndarray] = []
        for j, cur in enumerate(points):
            prev, prev_in = points[j - 1], inside[j - 1]
            if inside[j] != prev_in:  # the edge prev->cur crosses the clip line: add the crossing point
                d_prev, d_cur = _cross(a, b, prev), _cross(a, b, cur)
                t = d_prev / (d_prev - d_cur)
                kept.append(prev + t * (cur - prev))
            if inside[j]:
                kept.append(cur)
        points = kept
    return np.asarray(points, dtype=float).reshape(-1, 2)


def _obb_polygon(obb: Any) -> np.ndarray | None:
    values = _numbers(obb, 5)
    if values is None:
        return None
    cx, cy, w, h, angle = values
    if abs(w) * abs(h) <= 0.0:
        return None
    poly = obb_corners(cx, cy, abs(w), abs(h), angle)
    return poly if _signed_area(poly) > 0 else poly[::-1].copy()


def obb_iou(a: Any, b: Any) -> float:
    """IoU of two rotated rectangles ``(cx, cy, w, h, angle_degrees)``: the intersection is one rectangle clipped
    by the other (Sutherland-Hodgman), areas by the shoelace formula. Malformed or zero-area boxes give 0.0."""
    pa, pb = _obb_polygon(a), _obb_polygon(b)
    if pa is None or pb is None:
        return 0.0
    inter_poly = _clip_convex(pa, pb)
    inter = abs(_signed_area(inter_poly)) if len(inter_poly) >= 3 else 0.0
    area_a, area_b = _signed_area(pa), _signed_area(pb)
    inter = min(inter, area_a, area_b)  # rounding in the clip must not push IoU past 1
    return _ratio(inter, area_a + area_b - inter)


# --------------------------------------------------------------------------------------------------- detection


def _label(value: Any) -> str | None:
    return " ".join(value.lower().split()) if isinstance(value, str) and value.strip() else None


def _grouped(items: Any, count: int, *, strict: bool, index: int) -> tuple[dict[str, list[tuple[float, ...]]], int]:
    """Group (label, shape) pairs by normalised label; returns (groups, number of malformed items)."""
    groups: dict[str, list[tuple[float, ...]]] = {}
    bad = 0
    if items is None:
        return groups, 0
    try:
        entries = list(items)
    except TypeError:
        entries = [items]
    for entry in entries:
        label = shape = None
        if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
            label, shape = _label(entry[0]), _numbers(entry[1], count)
        if label is None or shape is None:
            if strict:
                raise ValueError(f"sample {index}: reference items must be (label, shape) pairs, got {entry!r}")
            bad += 1
            continue
        groups.setdefault(label, []).append(shape)
    return groups, bad


def _greedy_matches(preds: list[tuple[float, ...]], refs: list[tuple[float, ...]],
                    iou: Callable[[Any, Any], float], thr: float) -> set[int]:
    """The predictions matched one-to-one, taking (pred, ref) pairs by decreasing IoU while IoU >= thr."""
    pairs = sorted(((iou(p, r), i, j) for i, p in enumerate(preds) for j, r in enumerate(refs)),
                   key=lambda x: (-x[0], x[1], x[2]))
    used_p: set[int] = set()
    used_r: set[int] = set()
    for value, i, j in pairs:
        if value < thr:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
    return used_p


def _detection_scores(pred: Sequence[Any], ref: Sequence[Any], thr: float, count: int,
                      iou: Callable[[Any, Any], float]) -> dict[str, float | int]:
    _check_lengths(pred, ref)
    tp = fp = fn = 0
    for i, (p_items, r_items) in enumerate(zip(pred, ref)):
        p_groups, bad = _grouped(p_items, count, strict=False, index=i)
        r_groups, _ = _grouped(r_items, count, strict=True, index=i)
        fp += bad
        for label in p_groups.keys() | r_groups.keys():
            ps, rs = p_groups.get(label, []), r_groups.get(label, [])
            matched = len(_greedy_matches(ps, rs, iou, thr))
            tp, fp, fn = tp + matched, fp + len(ps) - matched, fn + len(rs) - matched
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"precision": precision, "recall": recall, "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "fn": fn}


def detection_hits(pred: Sequence[Any], ref: Sequence[Any], thr: float = 0.5, oriented: bool = False) -> list[bool]:
    """Per predicted item of one image, whether :func:`detection_f1`'s matching counts it a true positive
    (``oriented``: :func:`obb_detection_f1`'s). A malformed item is a miss."""
    count, iou = (5, obb_iou) if oriented else (4, box_iou)
    r_groups, _ = _grouped(ref, count, strict=True, index=0)
    items = list(pred or [])
    by_label: dict[str, list[int]] = {}
    for k, item in enumerate(items):
        groups, bad = _grouped([item], count, strict=False, index=0)
        if not bad:
            by_label.setdefault(next(iter(groups)), []).append(k)
    hits = [False] * len(items)
    for label, idx in by_label.items():
        shapes = [_numbers(items[k][1], count) for k in idx]
        for i in _greedy_matches(shapes, r_groups.get(label, []), iou, thr):  # type: ignore[arg-type]
            hits[idx[i]] = True
    return hits


def detection_f1(pred: Sequence[Any], ref: Sequence[Any], thr: float = 0.5) -> dict[str, float | int]:
    """Horizontal-box detection: per image and per label, predictions and references are matched one-to-one
    greedily by decreasing IoU (>= ``thr``); TP/FP/FN are summed over the dataset (micro average).

    ``pred[i]`` / ``ref[i]`` are lists of ``(label, (x1, y1, x2, y2))``; labels compare lower-cased with collapsed
    whitespace. A None image prediction predicts nothing; a malformed predicted item counts as a false positive.
    Returns ``{"precision", "recall", "f1", "tp", "fp", "fn"}``.
    """
    return _detection_scores(pred, ref, thr, 4, box_iou)


def obb_detection_f1(pred: Sequence[Any], ref: Sequence[Any], thr: float = 0.5) -> dict[str, float | int]:
    """:func:`detection_f1` for oriented boxes ``(label, (cx, cy, w, h, angle))`` with :func:`obb_iou`."""
    return _detection_scores(pred, ref, thr, 5, obb_iou)


# --------------------------------------------------------------------------------------------------- masks


def _label_grid(grid: Any) -> np.ndarray | None:
    """A 2-D object array of normalised labels, or None when ``grid`` is not a rectangular grid of strings."""
    if grid is None:
        return None
    try:
        rows = [list(row) for row in grid]
    except TypeError:
        return None
    if not rows or any(len(row) != len(rows[0]) for row in rows) or not rows[0]:
        return None
    if not all(isinstance(cell, str) for row in rows for cell in row):
        return None
    out = np.empty((len(rows), len(rows[0])), dtype=object)
    for r, row in enumerate(rows):
        out[r] = [" ".join(cell.lower().split()) for cell in row]
    return out


def _mask_counts(pred_grids: Sequence[Any], ref_grids: Sequence[Any]) -> tuple[Counter[str], Counter[str]]:
    _check_lengths(pred_grids, ref_grids)
    inter: Counter[str] = Counter()
    union: Counter[str] = Counter()
    for i, (pred, ref) in enumerate(zip(pred_grids, ref_grids)):
        r = _label_grid(ref)
        if r is None:
            raise ValueError(f"sample {i}: reference mask must be a rectangular grid of labels")
        p = _label_grid(pred)
        if p is None or p.shape != r.shape:
            for label, n in Counter(r.ravel().tolist()).items():
                union[label] += n
            continue
        for label in set(p.ravel().tolist()) | set(r.ravel().tolist()):
            in_p, in_r = p == label, r == label
            inter[label] += int(np.count_nonzero(in_p & in_r))
            union[label] += int(np.count_nonzero(in_p | in_r))
    return inter, union


def mask_class_ious(pred_grids: Sequence[Any], ref_grids: Sequence[Any]) -> dict[str, float]:
    """IoU per label (background ``others`` included) over the whole dataset: cells are accumulated across all
    samples before dividing. Only labels present in some prediction or reference appear.

    Grids are 24x24 label grids (lists of rows, or arrays of strings); labels compare lower-cased. A None,
    malformed or wrong-shaped prediction predicts no label at all (every reference cell is a miss).
    """
    inter, union = _mask_counts(pred_grids, ref_grids)
    return {label: _ratio(inter[label], union[label]) for label in sorted(union)}


def mask_scores(pred_grids: Sequence[Any], ref_grids: Sequence[Any]) -> dict[str, float]:
    """``miou``: mean IoU over the *foreground* labels present in predictions or references (a hallucinated label
    counts with IoU 0); ``background_iou``: IoU of ``others``; ``miou_with_background``: mean over all labels."""
    ious = mask_class_ious(pred_grids, ref_grids)
    fg = [v for k, v in ious.items() if k != BACKGROUND]
    return {"miou": float(np.mean(fg)) if fg else 0.0,
            "background_iou": ious.get(BACKGROUND, 0.0),
            "miou_with_background": float(np.mean(list(ious.values()))) if ious else 0.0}


def mask_miou(pred_grids: Sequence[Any], ref_grids: Sequence[Any]) -> float:
    """Foreground mIoU of :func:`mask_scores` (see there; ``background_iou`` comes with it)."""
    return mask_scores(pred_grids, ref_grids)["miou"]


def _bool_mask(mask: Any) -> np.ndarray | None:
    if mask is None:
        return None
    try:
        arr = np.asarray(mask)
        if arr.dtype == object:
            return None
        return arr.astype(bool)
    except (TypeError, ValueError):
        return None


def change_scores(pred_masks: Sequence[Any], ref_masks: Sequence[Any]) -> dict[str, float]:
    """Pixel-level precision / recall / F1 / IoU of the change class, TP/FP/FN summed over the dataset.

    Masks are bool arrays (non-zero = change). A None, malformed or wrong-shaped prediction predicts no change.
    """
    _check_lengths(pred_masks, ref_masks)
    tp = fp = fn = 0
    for i, (pred, ref) in enumerate(zip(pred_masks, ref_masks)):
        r = _bool_mask(ref)
        if r is None:
            raise ValueError(f"sample {i}: reference change mask must be a numeric or bool array")
        p = _bool_mask(pred)
        if p is None or p.shape != r.shape:
            p = np.zeros_like(r)
        tp += int(np.count_nonzero(p & r))
        fp += int(np.count_nonzero(p & ~r))
        fn += int(np.count_nonzero(~p & r))
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn)}


def change_f1(pred_masks: Sequence[Any], ref_masks: Sequence[Any]) -> float:
    """Pixel F1 of the change class over the dataset (see :func:`change_scores`)."""
    return change_scores(pred_masks, ref_masks)["f1"]

