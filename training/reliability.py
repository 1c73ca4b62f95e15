"""Do answer scores mean what they say? Reliability curves and expected calibration error (ECE) per task.

Each scored unit is (confidence, right or wrong): a ``[CLS]`` answer (its label is the reference class), a ``[VG]``
box (IoU >= 0.5 with the reference), a ``[DET]`` / ``[OBB]`` item (a true positive under the F1 matching of
:mod:`rsvlm_edge.training.metrics`). Scores are binned into equal-width bins over [0, 1]; ECE is the count-weighted
mean gap between each bin's mean score and its share of right units (Guo et al. 2017). A score ranks well when
accuracy rises with the bins; it is calibrated when the gaps are small.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from rsvlm_edge.training import metrics

#: Tasks whose units can be judged right or wrong against a sample's reference.
SCORED_TASKS = ("[CLS]", "[VG]", "[DET]", "[OBB]")


def scored_units(predictions: Iterable[Any]) -> dict[str, list[tuple[float, bool]]]:
    """``evaluate.Prediction`` s -> per task tag, (score, right) for every unit that has a score."""
    units: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for p in predictions:
        scores, tag, target = p.scores, p.sample.tag, p.sample.target
        if scores is None or tag not in SCORED_TASKS:
            continue
        if tag == "[CLS]" and "class_name" in target and scores.answer is not None:
            units[tag].append((scores.answer, metrics.accuracy([p.text], [target["class_name"]]) == 1.0))
        elif tag == "[VG]" and p.parsed.boxes and scores.items:
            right = metrics.acc_at_iou([p.parsed.boxes], [target["boxes"]], 0.5) == 1.0
            units[tag].append((scores.items[0], right))
        elif tag in ("[DET]", "[OBB]") and scores.items:
            items = p.parsed.detections if tag == "[DET]" else p.parsed.obbs
            key = "detections" if tag == "[DET]" else "obbs"
            hits = metrics.detection_hits(items, target[key], 0.5, oriented=tag == "[OBB]")
            units[tag] += list(zip(scores.items, hits))
    return dict(units)


def reliability(units: Sequence[tuple[float, bool]], bins: int = 10) -> dict[str, Any]:
    """ECE, overall accuracy and mean score, and the curve: per non-empty bin [low, high, count, mean score,
    accuracy]. Also the AUROC of the score for telling right from wrong units (0.5 = no better than chance; None
    when every unit is right or every unit wrong)."""
    if not units:
        return {"n": 0}
    score = np.clip(np.array([u[0] for u in units], dtype=np.float64), 0.0, 1.0)
    right = np.array([u[1] for u in units], dtype=bool)
    which = np.minimum((score * bins).astype(int), bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        mean_score, accuracy = float(score[sel].mean()), float(right[sel].mean())
        ece += sel.sum() / len(score) * abs(mean_score - accuracy)
        curve.append([b / bins, (b + 1) / bins, int(sel.sum()), round(mean_score, 4), round(accuracy, 4)])
    return {"n": len(units), "accuracy": float(right.mean()), "mean_score": float(score.mean()), "ece": float(ece),
            "auroc": auroc(score, right), "curve": curve}


def auroc(score: np.ndarray, right: np.ndarray) -> float | None:
    """P(a right unit scores above a wrong one), ties counting half: the Mann-Whitney U statistic."""
    pos, neg = score[right], score[~right]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    start = 0
    for end in range(1, len(values) + 1):  # average ranks over ties
        if end == len(values) or values[end] != values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def format_reliability(name: str, report: dict[str, Any]) -> str:
    """A reliability curve as a text table, as ``rsvlm-edge eval --reliability`` prints it."""
    if not report.get("n"):
        return f"{name}: no scored units"
    auc = report["auroc"]
    lines = [f"{name}: n={report['n']} accuracy={report['accuracy']:.3f} mean score={report['mean_score']:.3f} "
             f"ECE={report['ece']:.3f} AUROC={'n/a' if auc is None else f'{auc:.3f}'}",
             "  score bin     n  mean score  accuracy"]
    for low, high, count, mean_score, accuracy in report["curve"]:
        lines.append(f"  {low:.1f}-{high:.1f}  {count:5d}  {mean_score:10.3f}  {accuracy:8.3f}")
    return "\n".join(lines)
