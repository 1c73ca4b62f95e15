"""Task metrics on held-out synthetic and real splits, through any backend (torch reference, ORT FP32/INT8 ...).

Every number in the model card comes from :func:`evaluate` via ``rsvlm-edge eval``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from rsvlm_edge import formats
from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.scores import AnswerScores, answer_scores
from rsvlm_edge.tasks import max_new_tokens_for
from rsvlm_edge.training import metrics
from rsvlm_edge.training.sample import Sample

#: Held-out synthetic scenes use seeds far from the training streams.
SYNTHETIC_EVAL_SEED = 10_007

SUITES = ("synthetic", "router", "grounding", "detection", "oriented", "segmentation", "change", "aid", "rsvqa_lr",
          "levir_cd", "sirst", "hrsid", "dota", "bigearthnet")
#: Synthetic one-task suites: name -> (seed offset, tag, keep change masks (True), single-image ones (False) or both)
TASK_SUITES: dict[str, tuple[int, str, bool | None]] = {
    "detection": (3, "[DET]", None), "oriented": (4, "[OBB]", None), "segmentation": (5, "[SEG]", False),
    "change": (6, "[SEG]", True)}


@dataclass
class Prediction:
    sample: Sample
    text: str
    parsed: formats.ParsedAnswer
    expert: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    pointed: bool = False  # the box pointer wrote the answer
    scores: AnswerScores | None = None  # the answer's confidences (rsvlm_edge.scores)
    headed: bool = False  # a head (the box pointer or the dense heads), not the LM's sampling, wrote the answer


def predict(generator: Generator, samples: list[Sample], batch_size: int = 8, max_new_tokens: int | None = None,
            progress: Callable[[int], None] | None = None, constrain: bool = True) -> list[Prediction]:
    """Greedy answers to ``samples``, as ``infer`` gives them: ``constrain`` masks each tagged answer to its grammar,
    and each batch gets its tasks' answer length (:func:`~rsvlm_edge.tasks.max_new_tokens_for`) unless
    ``max_new_tokens`` is given."""
    size, mode = generator.config.image_size, generator.config.image_preprocess  # the model's own preprocessing
    context = generator.config.max_position_embeddings
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].images), samples[i].tag))  # similar lengths batch
    results: dict[int, Prediction] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        requests = [Request(pixels=[prepare_image(im, samples[i].sensor, size, mode=mode) for im in samples[i].images],
                            sensor=samples[i].sensor, prompt=samples[i].prompt) for i in idx]
        room = context - max(len(generator.prompt_ids(r)) for r in requests)
        length = max_new_tokens or max(max_new_tokens_for(samples[i].tag, room) for i in idx)
        sampling = SamplingConfig(max_new_tokens=length, constrain=constrain)
        for i, gen in zip(idx, generator.generate(requests, sampling)):
            parsed = formats.parse_answer(samples[i].tag, gen.text)
            results[i] = Prediction(samples[i], gen.text, parsed, gen.routing.expert, list(gen.token_ids),
                                    gen.finish_reason, gen.pointer is not None, answer_scores(gen, parsed),
                                    gen.pointer is not None or gen.dense is not None)
        if progress:
            progress(len(idx))
    return [results[i] for i in range(len(samples))]


def score(predictions: Iterable[Prediction]) -> dict[str, Any]:
    """Per-task metrics; keys are ``task/metric``."""
    by_tag: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        by_tag[p.sample.tag].append(p)
    res: dict[str, Any] = {}
    for tag, preds in sorted(by_tag.items()):
        name = tag.strip("[]").lower()
        res[f"{name}/n"] = len(preds)
        res[f"{name}/parse_ok"] = float(np.mean([p.parsed.error is None for p in preds]))
        if tag in ("[CAP]", "[CCD]"):
            refs = [p.sample.target.get("captions") or [p.sample.answer] for p in preds]
            cands = [p.text for p in preds]
            res[f"{name}/bleu4"] = metrics.bleu4(cands, refs)
            res[f"{name}/cider"] = metrics.cider(cands, refs)
        elif tag == "[CLS]":
            single = [p for p in preds if "class_name" in p.sample.target]
            if single:
                res[f"{name}/accuracy"] = metrics.accuracy([p.text for p in single], [p.sample.target["class_name"] for p in single])
            multi = [p for p in preds if "labels" in p.sample.target and "class_name" not in p.sample.target]
            if multi:
                f1s = []
                for p in multi:
                    pred, ref = set(p.parsed.labels or []), set(p.sample.target["labels"])
                    f1s.append(2 * len(pred & ref) / max(1, len(pred) + len(ref)))
                res[f"{name}/multilabel_f1"] = float(np.mean(f1s))
        elif tag == "[VQA]":
            types = [p.sample.target.get("question_type", "all") for p in preds]
            refs = [str(p.sample.target.get("answer", p.sample.answer)) for p in preds]
            for qtype, acc in metrics.vqa_accuracy_by_type([p.text for p in preds], refs, types).items():
                res[f"{name}/accuracy_{qtype}"] = acc
        elif tag == "[VG]":
            boxes, refs = [p.parsed.boxes or [] for p in preds], [p.sample.target["boxes"] for p in preds]
            res[f"{name}/acc@0.5"] = metrics.acc_at_iou(boxes, refs, 0.5)
            res[f"{name}/pointer_share"] = float(np.mean([p.pointed for p in preds]))  # else the LM wrote the box
            dist = metrics.centre_distances(boxes, refs)
            # 0..100 units; a missing box counts as the image diagonal, so the report stays finite (strict JSON)
            res[f"{name}/centre_error_median"] = float(np.median(np.minimum(dist, np.hypot(100.0, 100.0))))
            res[f"{name}/centre_within_6"] = float(np.mean(dist <= 6.0))  # about half a patch of the 8x8 grid
        elif tag == "[REF]":
            res[f"{name}/label_accuracy"] = float(np.mean(
                [str(p.sample.target.get("label", "")).lower() in p.text.lower() for p in preds]))
        elif tag == "[DET]":
            f1 = metrics.detection_f1([p.parsed.detections for p in preds], [p.sample.target["detections"] for p in preds])
            res.update({f"{name}/{k}": v for k, v in f1.items()})
        elif tag == "[OBB]":
            f1 = metrics.obb_detection_f1([p.parsed.obbs for p in preds], [p.sample.target["obbs"] for p in preds])
            res.update({f"{name}/{k}": v for k, v in f1.items()})
        elif tag == "[SEG]":
            change = [p for p in preds if p.sample.target.get("change")]
            plain = [p for p in preds if not p.sample.target.get("change")]
            if plain:
                res[f"{name}/miou"] = metrics.mask_miou([p.parsed.mask for p in plain], [p.sample.target["mask"] for p in plain])
            if change:
                res[f"{name}/change_f1"] = metrics.change_f1(
                    [_change_pixels(p) for p in change], [_reference_change(p) for p in change])
    return res


def _reference_change(p: Prediction) -> np.ndarray:
    if "change_pixels" in p.sample.target:
        return np.asarray(p.sample.target["change_pixels"], dtype=bool)
    grid = p.sample.target["mask"]
    return np.any([formats.grid_to_mask(grid, lab) for lab in formats.grid_labels(grid)] or
                  [np.zeros((formats.MASK_SIZE,) * 2, bool)], axis=0)


def _change_pixels(p: Prediction) -> np.ndarray | None:
    """Predicted change mask at the reference's resolution (None when the answer did not parse)."""
    if p.parsed.mask is None:
        return None
    ref = _reference_change(p)
    labels = formats.grid_labels(p.parsed.mask)
    mask24 = np.any([formats.grid_to_mask(p.parsed.mask, lab) for lab in labels] or
                    [np.zeros((formats.MASK_SIZE,) * 2, bool)], axis=0)
    return formats.upsample_grid_mask(mask24, ref.shape[0], ref.shape[1])


def router_accuracy(generator: Generator, samples: list[Sample]) -> dict[str, float]:
    """The router alone on tag-free instructions: does it pick the tag's expert?"""
    routings = generator.route([s.instruction for s in samples])
    right = [r.expert == s.expert for r, s in zip(routings, samples)]
    res = {"router/accuracy": float(np.mean(right)), "router/n": len(samples)}
    for e in sorted({s.expert for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.expert == e]
        res[f"router/accuracy_expert{e}"] = float(np.mean([right[i] for i in idx]))
    return res


def suite_samples(name: str, limit: int | None, data_root: Path | None, seed: int = SYNTHETIC_EVAL_SEED) -> list[Sample]:
    if name in ("synthetic", "router", "grounding"):
        from rsvlm_edge.training.synthetic import generate

        if name == "grounding":  # [VG] only: the synthetic mix holds ~70 of them in 600 samples
            return generate(limit or 200, seed=seed + 2, tasks=("[VG]",))
        return generate(limit or 200, seed=seed + (1 if name == "router" else 0))
    if name in TASK_SUITES:  # one task only: the mixed suite holds ~70 samples of each
        from rsvlm_edge.training.synthetic import SyntheticGenerator

        offset, tag, change = TASK_SUITES[name]
        stream = SyntheticGenerator(seed=seed + offset, tasks=(tag,)).samples(10 * (limit or 200))
        kept = (s for s in stream if change is None or bool(s.target.get("change")) == change)
        return [s for _, s in zip(range(limit or 200), kept)]
    from rsvlm_edge.training import real_data

    samples = getattr(real_data, f"load_{name}")("test", root=data_root)
    if name == "aid":
        samples = [s for s in samples if s.tag == "[CLS]"]
    if limit and len(samples) > limit:
        rng = np.random.default_rng(seed)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), size=limit, replace=False))]
    return samples


def loaded_suites(suites: list[str], limit: int | None, data_root: Path | None,
                  report: dict[str, Any]) -> Iterator[tuple[str, list[Sample]]]:
    """(suite, held-out samples) for each named suite; a suite whose data is missing is noted in ``report``."""
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"unknown eval suite {suite!r}; choose from {', '.join(SUITES)}")
        try:
            samples = suite_samples(suite, limit, data_root)
        except FileNotFoundError as exc:
            report[f"{suite}/skipped"] = str(exc)
            continue
        yield suite, samples


def evaluate(generator: Generator, suites: list[str], limit: int | None = None, data_root: Path | None = None,
             batch_size: int = 8, progress: bool = True, constrain: bool = True,
             reliability: bool = False) -> dict[str, Any]:
    """Per-suite metrics (:func:`score`); ``reliability``: also each scored task's reliability curve and ECE, under
    ``suite/task/reliability`` (:mod:`rsvlm_edge.training.reliability`)."""
    from tqdm import tqdm

    from rsvlm_edge.training import reliability as rel

    report: dict[str, Any] = {}
    for suite, samples in loaded_suites(suites, limit, data_root, report):
        if suite == "router":
            report.update(router_accuracy(generator, samples))
            continue
        with tqdm(total=len(samples), desc=f"eval {suite}", disable=not progress, dynamic_ncols=True) as bar:
            preds = predict(generator, samples, batch_size=batch_size, progress=bar.update, constrain=constrain)
        report.update({f"{suite}/{k}": v for k, v in score(preds).items()})
        if reliability:
            for tag, units in rel.scored_units(preds).items():
                report[f"{suite}/{tag.strip('[]').lower()}/reliability"] = rel.reliability(units)
    return report


def format_report(report: dict[str, Any]) -> str:
    width = max((len(k) for k in report), default=10)
    lines = []
    for key, value in report.items():
        if key.endswith("/reliability"):
            from rsvlm_edge.training.reliability import format_reliability

            lines.append(format_reliability(key, value))
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)

