"""Answers from the dense heads: detections, oriented detections and masks written as the task's text.

The demo model's text decoder cannot write dozens of boxes or a 24x24 mask reliably, but its image patch states
carry where things are (the box pointer showed it for one box). The dense heads (``dense_heads`` component,
:class:`rsvlm_edge.modeling.model.DenseHeads`) read those states once per request and give, per patch, the objects
whose centre lies in it (per label probability, box, oriented box) and, per 24x24 mask cell, label probabilities
and a change probability; from the answer-start state they give which labels the instruction asks for. This module
turns those arrays into the same answer text the decoder would write (:mod:`rsvlm_edge.formats`), so parsers,
results and chat history see no difference, plus a probability for the answer. numpy only: it runs in the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rsvlm_edge.backends.base import Backend
from rsvlm_edge.config import ModelConfig
from rsvlm_edge.formats import (
    BACKGROUND,
    MASK_SIZE,
    NONE_TEXT,
    format_detections,
    format_mask,
    format_oriented_detections,
)
from rsvlm_edge.manifest import DENSE_OUTPUTS
from rsvlm_edge.tasks import split_tag
from rsvlm_edge.tokenizer import Tokenizer

#: Tasks whose answer the dense heads write (single image; a two-image [SEG] is a change mask).
DENSE_TAGS = ("[DET]", "[OBB]", "[SEG]")
#: A label is asked for, an object reported, a mask cell labelled, when its probability reaches this.
THRESHOLD = 0.5
#: Two detections of one label overlapping more than this (IoU) are one object: the less probable goes.
NMS_IOU = 0.5


@dataclass
class DenseOutputs:
    """One request's head outputs (what the ``dense_heads`` graph returns, batch row taken).

    ``asked`` (L,): probability that the instruction asks for each label. ``objects`` (N, L): per patch, probability
    that an object of the label has its centre in it. ``boxes`` (N, 4): x1, y1, x2, y2 in image sizes. ``obbs`` (N, 6):
    cx, cy, w, h in image sizes, cos and sin of twice the angle. ``cells`` (N, k*k, L): per patch, its k x k mask
    cells' label probabilities (row-major). ``change`` (N, k*k): the cells' change probability (two images).
    """

    asked: np.ndarray
    objects: np.ndarray
    boxes: np.ndarray
    obbs: np.ndarray
    cells: np.ndarray
    change: np.ndarray


@dataclass
class DenseAnswer:
    """The answer the heads wrote: its text, a probability for the whole answer and one per item (detection or
    mask label), in the order they appear in the text."""

    text: str
    probability: float
    items: list[tuple[str, float]] = field(default_factory=list)


def asked_labels(outputs: DenseOutputs, labels: list[str], allowed: list[int] | None = None) -> list[int]:
    """Indices of the labels the instruction asks for (at least the most probable one of ``allowed``)."""
    pool = list(range(len(labels))) if allowed is None else allowed
    chosen = [i for i in pool if outputs.asked[i] >= THRESHOLD]
    return chosen or [max(pool, key=lambda i: float(outputs.asked[i]))]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def _detections(outputs: DenseOutputs, labels: list[str], objects: list[int]) -> list[tuple[int, int, float]]:
    """(patch, label index, probability) of the asked objects, greedy NMS per label on the horizontal boxes."""
    asked = asked_labels(outputs, labels, objects)
    found = []
    for patch in range(outputs.objects.shape[0]):
        best = max(asked, key=lambda i: float(outputs.objects[patch, i]))
        p = float(outputs.objects[patch, best])
        if p >= THRESHOLD:
            found.append((patch, best, p))
    found.sort(key=lambda d: -d[2])
    kept: list[tuple[int, int, float]] = []
    for det in found:
        if all(k[1] != det[1] or _iou(outputs.boxes[k[0]], outputs.boxes[det[0]]) <= NMS_IOU for k in kept):
            kept.append(det)
    return sorted(kept, key=lambda d: (d[1], d[0]))


def _answer(items: list[tuple[str, float]], text: str, empty_probability: float) -> DenseAnswer:
    probability = float(np.mean([p for _, p in items])) if items else empty_probability
    return DenseAnswer(text, probability, items)


def detection_answer(outputs: DenseOutputs, labels: list[str], objects: list[int], oriented: bool) -> DenseAnswer:
    """[DET] (``oriented`` False) or [OBB] answer text. ``objects``: indices of the labels that are objects. With
    nothing found the text is ``none`` and its probability that of the most probable patch not being an object."""
    found = _detections(outputs, labels, objects)
    asked = asked_labels(outputs, labels, objects)
    if oriented:
        text = format_oriented_detections([(labels[i], _obb(outputs.obbs[patch])) for patch, i, _ in found])
    else:
        text = format_detections([(labels[i], [float(v) * 100.0 for v in outputs.boxes[patch]]) for patch, i, _ in found])
    items = [(labels[i], p) for _, i, p in found]
    empty = 1.0 - float(outputs.objects[:, asked].max()) if outputs.objects.size else 1.0
    return _answer(items, text, empty)


def _obb(values: np.ndarray) -> tuple[float, float, float, float, float]:
    cx, cy, w, h, c2, s2 = (float(v) for v in values)
    angle = math.degrees(0.5 * math.atan2(s2, c2))
    return cx * 100.0, cy * 100.0, abs(w) * 100.0, abs(h) * 100.0, angle


def cell_grid(per_patch: np.ndarray, grid: int) -> np.ndarray:
    """(grid^2, k*k, ...) per-patch cell values -> (grid*k, grid*k, ...) image-order grid."""
    k = int(round(math.sqrt(per_patch.shape[1])))
    rest = per_patch.shape[2:]
    out = per_patch.reshape(grid, grid, k, k, *rest).swapaxes(1, 2)
    return out.reshape(grid * k, grid * k, *rest)


def mask_answer(outputs: DenseOutputs, labels: list[str], grid: int, change: bool = False) -> DenseAnswer:
    """[SEG] answer: one image -> each cell the most probable asked label when it reaches :data:`THRESHOLD`, else
    background; two images (``change``) -> cells whose change probability reaches it are ``change``. The answer's
    probability is the mean over its labels of the mean probability of that label's cells (background's: one
    minus the best label probability, so an empty mask has a probability too)."""
    if change:
        probs = cell_grid(outputs.change[..., None], grid)[..., 0]
        names = np.where(probs >= THRESHOLD, "change", BACKGROUND)
        chosen_p = np.where(probs >= THRESHOLD, probs, 1.0 - probs)
    else:
        asked = asked_labels(outputs, labels)
        probs = cell_grid(outputs.cells[..., asked], grid)  # (24, 24, A)
        best = probs.argmax(-1)
        top = probs.max(-1)
        names = np.where(top >= THRESHOLD, np.asarray([labels[i] for i in asked], dtype=object)[best], BACKGROUND)
        chosen_p = np.where(top >= THRESHOLD, top, 1.0 - top)
    if names.shape != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"the dense heads give a {names.shape[0]}x{names.shape[1]} mask, the format needs "
                         f"{MASK_SIZE}x{MASK_SIZE}")
    grid_text = [[str(c) for c in row] for row in names]
    items = [(str(lab), float(chosen_p[names == lab].mean())) for lab in dict.fromkeys(names.ravel().tolist())]
    return _answer(items, format_mask(grid_text), 1.0)


def dense_answer(tag: str, outputs: DenseOutputs, labels: list[str], objects: list[int], grid: int,
                 num_images: int) -> DenseAnswer:
    """The answer of a :data:`DENSE_TAGS` request from its head outputs."""
    if tag == "[SEG]":
        return mask_answer(outputs, labels, grid, change=num_images == 2)
    if tag in ("[DET]", "[OBB]"):
        return detection_answer(outputs, labels, objects, oriented=tag == "[OBB]")
    raise ValueError(f"the dense heads do not answer {tag}; they answer {', '.join(DENSE_TAGS)}")


def uses_dense(backend: Backend, prompt: str, num_images: int) -> bool:
    """Whether the dense heads write this request's answer: a :data:`DENSE_TAGS` tag on one image, or [SEG] on a
    pair (a change mask), on a backend that runs the heads."""
    tag = split_tag(prompt)[0]
    return (backend.has_dense_heads and tag in DENSE_TAGS
            and (num_images == 1 or (num_images == 2 and tag == "[SEG]")))


def image_patches(config: ModelConfig, image_slots: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """(images, grid^2, D): each image's patch-token states of one row (newline tokens left out); ``image_slots``
    is the row's bool mask of visual-token positions."""
    per, n = config.num_visual_tokens, config.grid_size ** 2
    slots = np.nonzero(image_slots)[0]
    if len(slots) < n or len(slots) % per:
        raise ValueError(f"the dense heads need {per} visual tokens per image, the prompt has {len(slots)}")
    return np.stack([hidden[slots[k * per:k * per + n]] for k in range(len(slots) // per)])


def write_answers(backend: Backend, tokenizer: Tokenizer, queries: np.ndarray, patch_sets: list[np.ndarray],
                  prompts: list[str]) -> list[tuple[list[int], DenseAnswer]]:
    """(R, D) answer-start states, per row its :func:`image_patches` and prompt -> per row the answer's token ids
    (fed through the decoder like sampled ones, so a chat continues from them) and the :class:`DenseAnswer`."""
    cfg = backend.config
    before = np.stack([p[0] for p in patch_sets])
    after = np.stack([p[-1] for p in patch_sets])
    raw = backend.dense(queries, before, after)
    out = []
    for row, prompt in enumerate(prompts):
        outputs = DenseOutputs(**{name: np.asarray(raw[name][row], dtype=np.float64) for name in DENSE_OUTPUTS})
        answer = dense_answer(str(split_tag(prompt)[0]), outputs, list(cfg.dense_labels),
                              [cfg.dense_labels.index(o) for o in cfg.dense_objects], cfg.grid_size,
                              len(patch_sets[row]))
        out.append((tokenizer.encode(answer.text), answer))
    return out


__all__ = ["DENSE_TAGS", "NONE_TEXT", "DenseAnswer", "DenseOutputs", "dense_answer", "detection_answer",
           "mask_answer", "cell_grid", "asked_labels", "uses_dense", "image_patches", "write_answers"]
