"""The demo model's data recipe: which sources, in what proportion, for each stage."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.training.data import Example, ListSource, Mixture, Source, SyntheticSource, encode_all
from rsvlm_edge.training.vision_pretrain import VisionMixture, scene_vocabulary

log = logging.getLogger(__name__)

#: Stage -> source -> weight. Real sources missing on this machine are dropped (the weights renormalise). The sets
#: with only a handful of tiles (DOTA: 2 scenes of ~750-token answers, HRSID: 4 crops) get small weights: they
#: cannot generalise anyway, and their long answers cost several times a short sample's step time (a batch of 24
#: masks takes ~6.5 s against ~0.45 s for class names on 2 cores), so the budget goes to the short-answer tasks.
STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "align": {"synthetic_caption": 0.35, "aid": 0.65},
    "instruct": {
        "synthetic": 0.22, "synthetic_grounding": 0.22, "aid": 0.31, "rsvqa_lr": 0.20, "levir_cd": 0.015,
        "sirst": 0.02, "bigearthnet": 0.01, "dota": 0.0025, "hrsid": 0.0025,
    },
}

#: Synthetic streams: name -> (seed offset, tasks or None for the generator's own task mix, untagged share or None for
#: the recipe's). ``synthetic_grounding`` tops up [VG], the task that needs the most steps to learn (choosing the box
#: pointer's patch: docs/training.md, "Grounding"). At 0.22, with the [VG] share of the mixed stream, the demo
#: recipe's 4600 x 24 answers hold ~27k [VG]; [VG] answers are short, so it also keeps the stage cheap.
SYNTHETIC_STREAMS: dict[str, tuple[int, tuple[str, ...] | None, float | None]] = {
    "synthetic": (1, None, None),
    "synthetic_caption": (2, ("[CAP]", "[CLS]"), 0.0),
    "synthetic_grounding": (3, ("[VG]",), None),
}

#: Task shares that differ from the generator's own mix, per synthetic stream. A 24x24 [SEG] mask answer is ~190
#: tokens against ~10 for most tasks: at the generator's 13% share, masks were 69% of the synthetic answer tokens,
#: and the 7% of instruct steps holding them (4-17 s each, against ~0.9 s) took a third of the stage's time, while
#: the shipped model still scored 0.0 mask mIoU. A 4% share keeps the task in training at a third of that cost.
SYNTHETIC_TASK_WEIGHTS: dict[str, dict[str, float]] = {"synthetic": {"[SEG]": 0.04}}

#: Tasks whose answers do not change when the tile is flipped or rotated by 90 degrees.
ORIENTATION_FREE = {"[CLS]", "[CAP]"}


class AugmentedListSource(ListSource):
    """Real tiles drawn with a random flip / 90-degree rotation where the answer allows it (AID scenes)."""

    def __init__(self, examples: list[Example], augmentable: list[bool]):
        super().__init__(examples)
        self.augmentable = augmentable

    def draw(self, rng: random.Random) -> Example:
        i = rng.randrange(len(self.examples))
        ex = self.examples[i]
        if not self.augmentable[i]:
            return ex
        k, flip = rng.randrange(4), rng.random() < 0.5
        pixels = [np.rot90(p, k, axes=(1, 2)) for p in ex.pixels]
        if flip:
            pixels = [p[:, :, ::-1] for p in pixels]
        pixels = [jitter(p, rng) for p in pixels]  # fresh contiguous arrays
        return Example(ex.ids, ex.labels, pixels, ex.sensor, ex.expert, ex.instruction_ids, ex.tagged)


def jitter(pixels: np.ndarray, rng: random.Random, max_shift: int = 10, contrast: float = 0.15,
           brightness: float = 0.1) -> np.ndarray:
    """A cheap photometric + translation augmentation for scene tiles: shift by up to ``max_shift`` px (reflect
    padded), scale contrast around the tile mean and offset brightness. Class labels do not change under either;
    with ~150 AID tiles per class the model otherwise memorises them within a few epochs."""
    _, h, w = pixels.shape
    dy, dx = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
    padded = np.pad(pixels, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="reflect")
    out = padded[:, abs(dy) + dy: abs(dy) + dy + h, abs(dx) + dx: abs(dx) + dx + w].astype(np.float32)
    mean = out.mean(axis=(1, 2), keepdims=True)
    scale = 1.0 + rng.uniform(-contrast, contrast)
    out = (out - mean) * scale + mean + rng.uniform(-brightness, brightness)
    return out.astype(pixels.dtype)


def load_real(name: str, root: Path | None, split: str = "train"):
    from rsvlm_edge.training import real_data

    loader = getattr(real_data, f"load_{name}")
    return loader(split, root=root)


class Recipe:
    """Builds (and caches) the mixture for each stage."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, data_root: Path | None = None, seed: int = 0,
                 untagged_share: float = 0.2, real_limit: int | None = None):
        self.cfg, self.tokenizer, self.root, self.seed = cfg, tokenizer, data_root, seed
        self.untagged_share, self.real_limit = untagged_share, real_limit
        self._real: dict[str, AugmentedListSource | None] = {}
        self._samples: dict[str, list] = {}
        self._tiles: dict[str, list[tuple[np.ndarray, str]]] = {}

    def real_samples(self, name: str) -> list:
        """Raw train-split samples of one real set (empty when it is not on this machine)."""
        if name not in self._samples:
            try:
                samples = load_real(name, self.root)
            except (FileNotFoundError, OSError) as exc:
                log.warning("skipping real source %s: %s", name, exc)
                samples = []
            self._samples[name] = samples[: self.real_limit] if self.real_limit else samples
        return self._samples[name]

    def real_texts(self) -> list[str]:
        """Prompts and answers of every real set, for the tokenizer corpus."""
        names = {n for weights in STAGE_WEIGHTS.values() for n in weights if n not in SYNTHETIC_STREAMS}
        return [text for name in sorted(names) for s in self.real_samples(name) for text in (s.prompt, s.answer)]

    def real_source(self, name: str) -> AugmentedListSource | None:
        if name not in self._real:
            samples = self.real_samples(name)
            if samples:
                examples = encode_all(samples, self.tokenizer, self.cfg, untagged=self.untagged_share, seed=self.seed)
                self._real[name] = AugmentedListSource(examples, [s.tag in ORIENTATION_FREE and s.source == "aid"
                                                                  for s in samples])
            else:
                self._real[name] = None
        return self._real[name]

    def scene_tiles(self, split: str) -> list[tuple[np.ndarray, str]]:
        """(prepared float16 pixels, class name) of every AID tile of a split, for stage ``vision``."""
        if split == "train":
            samples = self.real_samples("aid")
        else:
            try:
                samples = load_real("aid", self.root, split)[: 2 * self.real_limit if self.real_limit else None]
            except (FileNotFoundError, OSError):
                samples = []
        return [(prepare_image(s.images[0], s.sensor, self.cfg.image_size).astype(np.float16), s.answer)
                for s in samples if s.tag == "[CLS]"]

    def scene_vocabulary(self) -> list[str]:
        """The scene label space of stage ``vision`` (synthetic classes + the AID classes on this machine)."""
        return scene_vocabulary(sorted({name for _, name in self._vision_tiles("train")}))

    def _vision_tiles(self, split: str) -> list[tuple[np.ndarray, str]]:
        if split not in self._tiles:
            self._tiles[split] = self.scene_tiles(split)
        return self._tiles[split]

    def __call__(self, stage: str) -> Mixture | VisionMixture:
        if stage == "vision":
            return VisionMixture(self.cfg, self._vision_tiles("train"), seed=self.seed,
                                 heldout=self._vision_tiles("test"))
        sources: dict[str, tuple[float, Source]] = {}
        for name, weight in STAGE_WEIGHTS[stage].items():
            if name in SYNTHETIC_STREAMS:
                offset, tasks, untagged = SYNTHETIC_STREAMS[name]
                sources[name] = (weight, SyntheticSource(
                    self.tokenizer, self.cfg, self.seed + offset,
                    untagged=self.untagged_share if untagged is None else untagged, tasks=tasks,
                    task_weights=SYNTHETIC_TASK_WEIGHTS.get(name)))
            else:
                source = self.real_source(name)
                if source is not None:
                    if stage == "align":  # image-level tasks only
                        keep = [i for i, e in enumerate(source.examples) if e.expert == 0]
                        source = AugmentedListSource([source.examples[i] for i in keep],
                                                     [source.augmentable[i] for i in keep]) if keep else None
                    if source is not None:
                        sources[name] = (weight, source)
        return Mixture(sources, seed=self.seed)
