"""What a pipeline answers: :class:`Result`, the parsed answer with its geometry in the input's pixels.

Boxes come out of the model in 0..100 units of the image's width and height; a result gives them in pixels of its
first image (a before/after pair shares one frame). :meth:`Result.to_dict` is the record ``rsvlm-edge infer --json``
prints, key for key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from rsvlm_edge import formats
from rsvlm_edge.config import EXPERT_NAMES
from rsvlm_edge.generation import Generation, Pointing
from rsvlm_edge.inputs import Tile
from rsvlm_edge.scores import AnswerScores, answer_scores

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
OrientedBox = tuple[float, float, float, float, float]  # cx, cy, w, h in pixels, angle in degrees (y down)


@dataclass(frozen=True)
class Detection:
    label: str
    box_px: Box
    score: float | None = None  # confidence of this item (see rsvlm_edge.scores)


@dataclass(frozen=True)
class OrientedDetection:
    label: str
    obb_px: OrientedBox
    score: float | None = None


@dataclass
class Result:
    """One request's answer. ``text`` is what the model generated; the typed properties are its parsed structure
    (None when the task has none, or when the text does not parse: then ``parse_error`` says why)."""

    tile: Tile
    instruction: str
    generation: Generation
    parsed: formats.ParsedAnswer
    extras: dict[str, Any] = field(default_factory=dict)  # added to to_dict (the CLI's mask_png)

    # ------------------------------------------------------------------ request and routing
    @property
    def images(self) -> list[str]:
        """The request's images: file paths, or ``<array K>`` / ``<PIL K>`` for in-memory ones."""
        return list(self.tile.paths)

    @property
    def sensor(self) -> str:
        return self.tile.sensor

    @property
    def task(self) -> str:
        """The tag the answer was parsed as (``[CLS]``); untagged prompts get the tag the answer's shape suggests."""
        return self.parsed.task

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def expert(self) -> str:
        """The decoder expert that answered: ``image``, ``region`` or ``pixel``."""
        return EXPERT_NAMES[self.generation.routing.expert]

    expert_name = expert  # the name earlier code used

    @property
    def expert_source(self) -> str:
        """Who chose the expert: ``tag``, ``router``, ``rule`` (models without a router) or ``forced``."""
        return self.generation.routing.source

    @property
    def router_probs(self) -> dict[str, float] | None:
        probs = self.generation.routing.probs
        return None if probs is None else dict(zip(EXPERT_NAMES, probs))

    @property
    def finish_reason(self) -> str:
        """``stop`` (the model ended its answer) or ``length`` (max_new_tokens ran out)."""
        return self.generation.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self.generation.prompt_tokens

    @property
    def generated_tokens(self) -> int:
        return len(self.generation.token_ids)

    @property
    def timings(self) -> dict[str, float]:
        """``vision_ms``, ``ttft_ms``, ``decode_ms``, ``decode_tok_s`` ... as the generation loop measured them."""
        return dict(self.generation.timings)

    @property
    def pointer(self) -> Pointing | None:
        """Set when the box pointer, not sampled text, wrote the box."""
        return self.generation.pointer

    # ------------------------------------------------------------------ scores
    @cached_property
    def scores(self) -> AnswerScores:
        """Confidences in [0, 1] from the answer's token log-probabilities (:mod:`rsvlm_edge.scores`)."""
        return answer_scores(self.generation, self.parsed)

    @property
    def score(self) -> float | None:
        """The whole answer's confidence; None when the generation carries no token log-probabilities."""
        return self.scores.answer

    @property
    def box_scores(self) -> list[float] | None:
        """``[VG]``: one confidence per box of :attr:`boxes_px`."""
        return self.scores.items if self.parsed.boxes is not None else None

    @property
    def mask_label_scores(self) -> dict[str, float] | None:
        """``[SEG]``: one confidence per label of the mask (the runs that wrote it), background included."""
        return self.scores.mask_labels

    def _item_scores(self, count: int) -> list[float | None]:
        items = self.scores.items
        return list(items) if items is not None and len(items) == count else [None] * count

    # ------------------------------------------------------------------ parsed answer
    @property
    def parse_error(self) -> str | None:
        return self.parsed.error

    @property
    def partial(self) -> bool:
        """The structure (boxes, detections, mask) is not the whole answer: the model was cut by max_new_tokens
        (``finish_reason`` ``length``) or some items were malformed and dropped (:attr:`dropped`)."""
        structured = any(s is not None for s in (self.parsed.boxes, self.parsed.detections, self.parsed.obbs,
                                                 self.parsed.mask))
        return self.parsed.partial or (structured and self.finish_reason == "length")

    @property
    def dropped(self) -> int:
        """How many malformed items (boxes, mask rows) the parsed structure left out; ``parsed.notes`` says why."""
        return self.parsed.dropped

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the first image: the frame of every pixel coordinate below."""
        return self.tile.sizes[0]

    @property
    def boxes_px(self) -> list[Box] | None:
        """``[VG]`` boxes."""
        if self.parsed.boxes is None:
            return None
        return [formats.box_to_pixels(b, *self.size) for b in self.parsed.boxes]

    @property
    def detections(self) -> list[Detection] | None:
        """``[DET]`` labelled boxes."""
        if self.parsed.detections is None:
            return None
        items = self.parsed.detections
        return [Detection(label, formats.box_to_pixels(b, *self.size), score)
                for (label, b), score in zip(items, self._item_scores(len(items)))]

    @property
    def oriented_detections(self) -> list[OrientedDetection] | None:
        """``[OBB]`` labelled oriented boxes."""
        if self.parsed.obbs is None:
            return None
        items = self.parsed.obbs
        return [OrientedDetection(label, formats.obb_to_pixels(o, *self.size), score)
                for (label, o), score in zip(items, self._item_scores(len(items)))]

    @property
    def labels(self) -> list[str] | None:
        """``[CLS]`` scene labels."""
        return None if self.parsed.labels is None else list(self.parsed.labels)

    @property
    def mask(self) -> np.ndarray | None:
        """``[SEG]``: the 24 x 24 grid of labels the model answers (row-major over the image, ``others`` =
        background), as a numpy array of str. :meth:`mask_image` gives it at the image's pixel size."""
        return None if self.parsed.mask is None else np.array(self.parsed.mask, dtype=str)

    @property
    def mask_labels(self) -> list[str] | None:
        """The labels present in the ``[SEG]`` mask, background left out."""
        return None if self.parsed.mask is None else formats.grid_labels(self.parsed.mask)

    @property
    def mask_classes(self) -> list[str] | None:
        """The class of each value of :meth:`class_mask_image`: ``others`` (0), then the mask's labels in order of
        first appearance (row-major)."""
        return None if self.parsed.mask is None else mask_classes(self.parsed.mask)

    def class_mask_image(self) -> np.ndarray:
        """uint8 ``(height, width)`` class-index mask at the first image's size, values indexing
        :attr:`mask_classes`. Raises ValueError when the answer has no mask."""
        return full_size_class_mask(self._grid(), self.size)

    def mask_image(self, label: str | None = None) -> np.ndarray:
        """Boolean ``(height, width)`` mask at the first image's size: cells of ``label``, or of any label but the
        background when None. Raises ValueError when the answer has no mask."""
        return full_size_mask(self._grid(), label, self.size)

    def _grid(self) -> list[list[str]]:
        """The parsed 24x24 grid; ValueError naming the image when the answer has none."""
        if self.parsed.mask is None:
            raise ValueError(f"{self.images[0]}: the answer has no mask (task {self.task}"
                             f"{'; ' + self.parse_error if self.parse_error else ''})")
        return self.parsed.mask

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as ``infer --json`` prints it: boxes in pixels of the first image, numbers rounded, keys for
        structure only when the answer has it."""
        out: dict[str, Any] = {
            "images": self.images,
            "sensor": self.sensor,
            "instruction": self.instruction,
            "task": self.task,
            "text": self.text,
            "expert": self.expert,
            "expert_source": self.expert_source,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "timings_ms": {k: round(v, 3) for k, v in self.generation.timings.items()},
        }
        probs = self.router_probs
        if probs is not None:
            out["router_probs"] = {k: round(p, 4) for k, p in probs.items()}
        if self.pointer is not None:
            out["pointer"] = {"patch": self.pointer.patch, "probability": round(self.pointer.probability, 4)}
        if self.parse_error:
            out["parse_error"] = self.parse_error
        out["partial"] = self.partial
        if self.partial:
            out["dropped"] = self.dropped
            if self.parsed.notes:
                out["partial_notes"] = list(self.parsed.notes)
            if self.parsed.filled_rows:
                out["mask_rows_filled"] = list(self.parsed.filled_rows)
        out["score"] = _rounded(self.score)
        if self.boxes_px is not None:
            out["boxes_px"] = [list(b) for b in self.boxes_px]
            if self.box_scores is not None:
                out["box_scores"] = [_rounded(s) for s in self.box_scores]
        if self.detections is not None:
            out["detections"] = [{"label": d.label, "box_px": list(d.box_px), "score": _rounded(d.score)}
                                 for d in self.detections]
        if self.oriented_detections is not None:
            out["oriented_detections"] = [{"label": d.label, "obb_px": list(d.obb_px), "score": _rounded(d.score)}
                                          for d in self.oriented_detections]
        if self.labels is not None:
            out["labels"] = self.labels
        if self.mask_labels is not None:
            out["mask_labels"] = self.mask_labels
        if self.mask_label_scores is not None:
            out["mask_label_scores"] = {k: _rounded(v) for k, v in self.mask_label_scores.items()}
        out.update(self.extras)
        return out


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 4)


#: Earlier name of :class:`Result`.
InferenceResult = Result


def full_size_mask(grid: list[list[str]], label: str | None, size: tuple[int, int]) -> np.ndarray:
    """A 24 x 24 label grid -> boolean ``(height, width)`` mask of ``label`` (any non-background label if None)."""
    labels = formats.grid_labels(grid)
    mask24 = np.zeros((formats.MASK_SIZE, formats.MASK_SIZE), dtype=bool)
    for lab in labels if label is None else [label]:
        mask24 |= formats.grid_to_mask(grid, lab)
    return formats.upsample_grid_mask(mask24, size[1], size[0])


def save_mask_png(grid: list[list[str]], label: str | None, size: tuple[int, int], path: str | Path) -> None:
    """Write a parsed 24x24 mask, upsampled to the input's pixel size, as an 8-bit PNG (255 = label / foreground)."""
    from PIL import Image

    from rsvlm_edge.fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(full_size_mask(grid, label, size).astype(np.uint8) * 255).save(tmp, format="PNG")


def mask_classes(grid: list[list[str]]) -> list[str]:
    """Class names by index: the background first, then the grid's labels in first-appearance order."""
    return [formats.BACKGROUND] + formats.grid_labels(grid)


def full_size_class_mask(grid: list[list[str]], size: tuple[int, int]) -> np.ndarray:
    """A 24 x 24 label grid -> uint8 ``(height, width)`` class indices into :func:`mask_classes`. The 24x24 grid
    holds at most 576 labels, but a PNG palette 256, so a grid with more than 255 labels is refused."""
    classes = mask_classes(grid)
    if len(classes) > 256:
        raise ValueError(f"the mask has {len(classes) - 1} labels; a class-indexed PNG holds at most 255")
    index = {name: i for i, name in enumerate(classes)}
    mask24 = np.array([[index[cell] for cell in row] for row in grid], dtype=np.uint8)
    return formats.upsample_grid_mask(mask24, size[1], size[0])


def class_palette(count: int) -> list[int]:
    """RGB palette for ``count`` classes: black background, then hues spread by the golden angle so neighbouring
    class indices get clearly different colours."""
    import colorsys

    palette = [0, 0, 0]
    for i in range(1, count):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        palette += [round(r * 255), round(g * 255), round(b * 255)]
    return palette


def save_class_mask_png(grid: list[list[str]], size: tuple[int, int], path: str | Path) -> list[str]:
    """Write a parsed 24x24 mask as a palette PNG at the input's pixel size (0 = background, 1..N the labels in
    order of first appearance); the class names by index back."""
    from PIL import Image

    from rsvlm_edge.fileio import atomic_path

    classes = mask_classes(grid)
    image = Image.fromarray(full_size_class_mask(grid, size)).convert("P")  # uint8 -> "L"; indices kept
    image.putpalette(class_palette(len(classes)))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return classes
