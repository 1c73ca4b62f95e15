"""Turn Samples into model-ready examples and batches (pixels prepared once, prompt/answer tokenised).

The synthetic stream is generated on the fly (deterministic by seed and index); real samples are prepared once and
held in memory as float16 pixels, which keeps AID (~5k tiles at 128 px) under a gigabyte.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.tasks import END, Turn, build_prompt
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.training.sample import Sample

if TYPE_CHECKING:  # torch-side types only; importing them here would load torch for data prep
    from rsvlm_edge.modeling import RSVLM
    from rsvlm_edge.training.vision_pretrain import VisionHeads

#: Label value ignored by the loss (prompt and padding positions).
IGNORE = -100


@dataclass
class Example:
    ids: np.ndarray  # int64 (S,) with each <image> expanded to num_visual_tokens slots
    labels: np.ndarray  # int64 (S,), IGNORE outside the answer
    pixels: list[np.ndarray]  # (C, H, W) float16
    sensor: str
    expert: int
    instruction_ids: np.ndarray  # the prompt without its tag, for the router loss
    tagged: bool
    box: np.ndarray | None = None  # (4,) float32 in image sizes (0-1) when the answer is one box ([VG]): pointer target


def render_prompt(sample: Sample, keep_tag: bool) -> str:
    return sample.prompt if keep_tag else sample.instruction


def encode(sample: Sample, tokenizer: Tokenizer, cfg: ModelConfig, keep_tag: bool = True,
           max_len: int | None = None) -> Example:
    """Tokenise one sample; the loss covers the answer and its stop token only."""
    prompt = build_prompt([Turn(render_prompt(sample, keep_tag))], num_images=len(sample.images))
    prompt_ids: list[int] = []
    for tok in tokenizer.encode(prompt):
        prompt_ids.extend([tok] * cfg.num_visual_tokens if tok == tokenizer.image_id else [tok])
    answer_ids = tokenizer.encode(sample.answer + END)
    ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    limit = max_len or cfg.max_position_embeddings
    if len(ids) > limit:
        ids, labels = ids[:limit], labels[:limit]
    pixels = [prepare_image(img, sample.sensor, cfg.image_size).astype(np.float16) for img in sample.images]
    return Example(
        ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        pixels=pixels,
        sensor=sample.sensor,
        expert=sample.expert,
        instruction_ids=np.asarray(tokenizer.encode(sample.instruction) or [tokenizer.pad_id], dtype=np.int64),
        tagged=keep_tag,
        box=answer_box(sample),
    )


def answer_box(sample: Sample) -> np.ndarray | None:
    """The [VG] answer's box in image sizes (0-1), or None for every other answer."""
    if sample.tag != "[VG]" or len(sample.images) != 1:
        return None
    boxes = sample.target.get("boxes") if isinstance(sample.target, dict) else None
    if not boxes or len(boxes) != 1:
        return None
    return np.asarray(boxes[0], dtype=np.float32) / 100.0


@dataclass
class Batch:
    ids: np.ndarray  # (B, S) right padded
    labels: np.ndarray
    mask: np.ndarray  # (B, S) float32
    pixels_by_sensor: dict[str, tuple[list[int], np.ndarray]]  # sensor -> (image slot order, stacked float32 pixels)
    num_images: int
    experts: np.ndarray  # (B,)
    instruction_ids: np.ndarray  # (B, L)
    instruction_mask: np.ndarray
    boxes: np.ndarray | None = None  # (B, 4) float32 pointer targets (0-1), rows without one are NaN


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(e.ids) for e in examples)
    b = len(examples)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.float32)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = e.ids
        labels[row, : len(e.labels)] = e.labels
        mask[row, : len(e.ids)] = 1
    # Images are spliced in batch order (row by row, first image first); group them by sensor for the encoder.
    images = [(e.sensor, px) for e in examples for px in e.pixels]
    inst_w = max(len(e.instruction_ids) for e in examples)
    inst = np.full((b, inst_w), pad_id, dtype=np.int64)
    inst_mask = np.zeros((b, inst_w), dtype=np.float32)
    for row, e in enumerate(examples):
        inst[row, : len(e.instruction_ids)] = e.instruction_ids
        inst_mask[row, : len(e.instruction_ids)] = 1
    boxes = None
    if any(e.box is not None for e in examples):
        boxes = np.stack([e.box if e.box is not None else np.full(4, np.nan, np.float32) for e in examples])
    return Batch(ids, labels, mask, group_by_sensor(images), len(images),
                 np.asarray([e.expert for e in examples], dtype=np.int64), inst, inst_mask, boxes)


def group_by_sensor(images: Sequence[tuple[str, np.ndarray]]) -> dict[str, tuple[list[int], np.ndarray]]:
    """(sensor, pixels) in batch order -> sensor -> (their positions, stacked float32 pixels): the encoder runs once
    per sensor and the caller puts each output back at its position."""
    slots: dict[str, list[int]] = {}
    arrays: dict[str, list[np.ndarray]] = {}
    for k, (sensor, px) in enumerate(images):
        slots.setdefault(sensor, []).append(k)
        arrays.setdefault(sensor, []).append(px.astype(np.float32))
    return {s: (slots[s], np.stack(arrays[s])) for s in slots}


def encode_by_sensor(groups: dict[str, tuple[list[int], np.ndarray]], count: int,
                     encode: Callable[[str, list[int], np.ndarray], Any]) -> list[Any]:
    """Run ``encode(sensor, positions, pixels)`` once per group of :func:`group_by_sensor` and return the outputs
    back in batch order (``count`` images). ``encode`` returns anything indexed by row (a tensor or a list)."""
    slots: list[Any] = [None] * count
    for sensor, (order, pixels) in groups.items():
        out = encode(sensor, order, pixels)
        for j, k in enumerate(order):
            slots[k] = out[j]
    return slots


class Mixture:
    """Weighted mixture of example sources; each draw picks a source by weight, then an example from it."""

    def __init__(self, sources: dict[str, tuple[float, "Source"]], seed: int = 0):
        if not sources:
            raise ValueError("empty training mixture")
        self.names = list(sources)
        weights = np.asarray([sources[n][0] for n in self.names], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.sources = {n: sources[n][1] for n in self.names}
        self.rng = random.Random(seed)

    def batches(self, batch_size: int, pad_id: int, bucket: int = 16) -> Iterator[Batch]:
        """Draw ``bucket`` batches' worth, sort by length, cut into batches: far less padding when a few long
        answers (masks, DOTA scenes) share a pool with short ones (class names). With only 4 batches per pool, the
        few long answers of each pool padded a whole batch of short ones to a mask's length; with 16 they mostly
        fill a batch of their own."""
        while True:
            picks = self.rng.choices(self.names, weights=list(self.probs), k=batch_size * bucket)
            pool = sorted((self.sources[name].draw(self.rng) for name in picks), key=lambda e: len(e.ids))
            chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            self.rng.shuffle(chunks)
            for chunk in chunks:
                yield collate(chunk, pad_id)

    def heldout_scores(self, model: RSVLM, heads: VisionHeads | None, bf16: bool = False) -> dict[str, float]:
        """Scores the trainer logs at the end of the stage. None for text mixtures: answers are scored by generating
        them (``rsvlm-edge eval`` on the exported model), which a training step cannot afford."""
        return {}


class Source:
    def draw(self, rng: random.Random) -> Example:  # pragma: no cover - interface
        raise NotImplementedError


class ListSource(Source):
    """Pre-encoded examples (real data): sampled with replacement."""

    def __init__(self, examples: list[Example]):
        if not examples:
            raise ValueError("ListSource needs at least one example")
        self.examples = examples

    def draw(self, rng: random.Random) -> Example:
        return self.examples[rng.randrange(len(self.examples))]


class SyntheticSource(Source):
    """Fresh synthetic scenes each draw; ``untagged`` is the share of prompts whose tag is dropped (router training)."""

    def __init__(self, tokenizer: Tokenizer, cfg: ModelConfig, seed: int, untagged: float = 0.2,
                 tasks: Sequence[str] | None = None, task_weights: dict[str, float] | None = None):
        from rsvlm_edge.training.synthetic import SyntheticGenerator

        self.gen = SyntheticGenerator(size=cfg.image_size, seed=seed, task_weights=task_weights)
        self.tokenizer, self.cfg, self.untagged, self.tasks = tokenizer, cfg, untagged, tasks

    def draw(self, rng: random.Random) -> Example:
        task = rng.choice(self.tasks) if self.tasks else None
        sample = self.gen.sample(task=task)
        return encode(sample, self.tokenizer, self.cfg, keep_tag=rng.random() >= self.untagged)


def encode_all(samples: list[Sample], tokenizer: Tokenizer, cfg: ModelConfig, untagged: float = 0.0,
               seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [encode(s, tokenizer, cfg, keep_tag=rng.random() >= untagged) for s in samples]
