"""Stage ``vision``: supervised pre-training of the vision encoder before any language is involved.

RSUniVLM starts from a pretrained SigLIP encoder; the demo model starts from random weights, and a 4-layer decoder
reading class names and box numbers off an untrained encoder learns both slowly. This stage gives the encoder the
two skills the target tasks need, with cheap heads on the visual tokens the decoder will read (after the projector),
and without the decoder's cost:

* scene classes (AID's 30 plus the synthetic generator's 10, one label space by name) from the mean visual token;
* on synthetic scenes, per patch: the majority semantic class (land cover or object), whether an object's centre
  falls in the patch, and that object's box edges relative to the patch centre (FCOS/CenterNet style). The decoder
  knows which patch a visual token is from its sequence position, so grounding then only has to pick the right
  patch and add its offsets. (Absolute coordinates train slowly, barely beating a constant box: the CNN features
  carry no position and the ViT's learned position embedding starts near zero. The L1 of offsets equals the L1 of
  the absolute boxes they give.)

The heads are training-only: they are not in the shipped model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.training.data import encode_by_sensor, group_by_sensor

if TYPE_CHECKING:
    from rsvlm_edge.modeling import RSVLM

#: Loss weights of the dense terms relative to the scene cross-entropy.
SEMANTIC_WEIGHT, CENTRE_WEIGHT, BOX_WEIGHT = 0.5, 1.0, 10.0


@dataclass
class VisionBatch:
    pixels_by_sensor: dict[str, tuple[list[int], np.ndarray]]  # sensor -> (row order, stacked float32 pixels)
    scene: np.ndarray  # (B,) int64 scene class index
    dense: np.ndarray  # (B,) bool: the row has dense (synthetic) targets
    semantic: np.ndarray  # (B, G*G) int64 majority semantic class per patch (-100 where not dense)
    centre: np.ndarray  # (B, G*G) float32 1 where an object's centre is in the patch
    boxes: np.ndarray  # (B, G*G, 4) float32 that object's box edges minus the patch centre, in image sizes
    augment: np.ndarray  # (B,) bool: geometric augmentation allowed (scene-only rows)


@dataclass
class VisionExample:
    pixels: np.ndarray  # (C, H, W) float16/float32
    sensor: str
    scene: int
    semantic: np.ndarray | None = None
    centre: np.ndarray | None = None
    boxes: np.ndarray | None = None


def scene_vocabulary(real_names: Sequence[str]) -> list[str]:
    """One scene label space: the synthetic classes, then the real classes not already named (sorted)."""
    from rsvlm_edge.training.synthetic import SCENE_CLASSES

    return list(SCENE_CLASSES) + sorted(set(real_names) - set(SCENE_CLASSES))


def num_semantic_classes() -> int:
    from rsvlm_edge.training.synthetic import LANDCOVER_CLASSES, OBJECT_CLASSES

    return len(LANDCOVER_CLASSES) + len(OBJECT_CLASSES) + 1  # Scene.semantic(): 0 unused, 1.. land cover, objects


def dense_targets(scene, sensor: str, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch of a ``grid`` x ``grid`` layout: majority semantic class, centre flag and the centred object's box
    as (x1, y1, x2, y2) minus the patch centre, in image sizes. Where two visible objects centre in one patch, the
    larger one wins (it is the one a box can match)."""
    size = scene.size
    cell = size // grid
    sem = scene.semantic(sensor)[: cell * grid, : cell * grid]
    blocks = sem.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    counts = np.zeros((grid * grid, num_semantic_classes()), np.int64)
    np.add.at(counts, (np.repeat(np.arange(grid * grid), cell * cell), blocks.ravel()), 1)
    semantic = counts.argmax(1).astype(np.int64)
    centre = np.zeros(grid * grid, np.float32)
    boxes = np.zeros((grid * grid, 4), np.float32)
    best_area = np.zeros(grid * grid, np.int64)
    for obj in scene.visible(sensor):
        x1, y1, x2, y2 = obj.box_px
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        k = min(grid - 1, int(cy // cell)) * grid + min(grid - 1, int(cx // cell))
        if obj.area > best_area[k]:
            best_area[k] = obj.area
            centre[k] = 1.0
            px, py = (k % grid + 0.5) * cell, (k // grid + 0.5) * cell
            boxes[k] = np.asarray([x1 - px, y1 - py, x2 - px, y2 - py], np.float32) / size
    return semantic, centre, boxes


class VisionHeads(nn.Module):
    """Scene classifier on the pooled visual tokens plus a per-patch semantic / centre / box head."""

    def __init__(self, hidden: int, num_scenes: int, num_semantic: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.scene = nn.Linear(hidden, num_scenes)
        self.dense = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, num_semantic + 5))
        self.num_semantic = num_semantic

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, G*G, D) -> scene logits (B, S), semantic logits (B, N, K), centre logits (B, N), box offsets
        (B, N, 4) from the patch centre in image sizes (the raw outputs are in tenths of the image)."""
        h = self.norm(tokens)
        dense = self.dense(h)
        k = self.num_semantic
        return self.scene(h.mean(1)), dense[..., :k], dense[..., k], 0.1 * dense[..., k + 1:]


def augment_affine(pixels: torch.Tensor, rng: torch.Generator, max_rotate: float = 180.0,
                   scale: tuple[float, float] = (0.7, 1.0), max_shift: float = 0.15) -> torch.Tensor:
    """Random rotation, mirror, zoom-in and shift in one batched resample (reflection padded): scene classes survive it, and
    it gives ~150 tiles per class far more variety than flips and 90-degree turns."""
    b = pixels.shape[0]
    angle = (torch.rand(b, generator=rng) * 2 - 1) * max_rotate * torch.pi / 180
    s = scale[0] + torch.rand(b, generator=rng) * (scale[1] - scale[0])
    shift = (torch.rand(b, 2, generator=rng) * 2 - 1) * max_shift
    flip = torch.where(torch.rand(b, generator=rng) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def vision_loss(encoder: nn.Module, heads: VisionHeads, batch: VisionBatch, grid_size: int,
                rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    def encode(sensor: str, order: list[int], pixels: np.ndarray) -> torch.Tensor:
        px = torch.from_numpy(pixels)
        aug = torch.from_numpy(batch.augment[order])
        if aug.any():
            px = px.clone()
            px[aug] = augment_affine(px[aug], rng)
        return encoder(px, sensor)[:, : grid_size * grid_size]  # drop the newline token

    tokens = encode_by_sensor(batch.pixels_by_sensor, len(batch.scene), encode)
    scene_logits, sem_logits, centre_logits, boxes = heads(torch.stack(tokens))
    scene = torch.from_numpy(batch.scene)
    scene_loss = F.cross_entropy(scene_logits.float(), scene)
    stats = {"scene_loss": float(scene_loss.detach()),
             "scene_acc": float((scene_logits.argmax(-1) == scene).float().mean())}
    loss = scene_loss
    dense = torch.from_numpy(batch.dense)
    if dense.any():
        sem_loss = F.cross_entropy(sem_logits[dense].flatten(0, 1).float(), torch.from_numpy(batch.semantic)[dense].flatten())
        centre = torch.from_numpy(batch.centre)[dense]
        centre_loss = F.binary_cross_entropy_with_logits(centre_logits[dense].float(), centre)
        pos = centre > 0
        box_loss = (F.l1_loss(boxes[dense][pos].float(), torch.from_numpy(batch.boxes)[dense][pos])
                    if pos.any() else boxes.sum() * 0)
        loss = loss + SEMANTIC_WEIGHT * sem_loss + CENTRE_WEIGHT * centre_loss + BOX_WEIGHT * box_loss
        stats.update(semantic_loss=float(sem_loss.detach()), centre_loss=float(centre_loss.detach()),
                     box_l1=float(box_loss.detach()))
    stats["loss"] = float(loss.detach())
    return loss, stats


def collate_vision(examples: Sequence[VisionExample], grid: int, augment: Sequence[bool]) -> VisionBatch:
    b, n = len(examples), grid * grid
    semantic = np.full((b, n), -100, np.int64)
    centre = np.zeros((b, n), np.float32)
    boxes = np.zeros((b, n, 4), np.float32)
    dense = np.zeros(b, bool)
    for row, e in enumerate(examples):
        if e.semantic is not None:
            dense[row] = True
            semantic[row], centre[row], boxes[row] = e.semantic, e.centre, e.boxes
    return VisionBatch(group_by_sensor([(e.sensor, e.pixels) for e in examples]),
                       np.asarray([e.scene for e in examples], np.int64), dense, semantic, centre, boxes,
                       np.asarray(augment, bool))


class VisionMixture:
    """Batches for stage ``vision``: real scene tiles (geometrically augmented on the fly) and fresh synthetic scenes
    with dense targets, in the ratio ``synthetic_share``. Same interface as :class:`~rsvlm_edge.training.data.Mixture`
    (``rng``, ``batches``, ``heldout_scores``) so the trainer drives both alike."""

    def __init__(self, cfg: ModelConfig, real: Sequence[tuple[np.ndarray, str]], seed: int = 0,
                 synthetic_share: float = 0.5, heldout: Sequence[tuple[np.ndarray, str]] = ()):
        from rsvlm_edge.training.synthetic import SCENE_CLASSES, SENSOR_MIXTURE, SENSOR_SCENES

        self.cfg, self.synthetic_share = cfg, synthetic_share if real else 1.0
        self.vocab = scene_vocabulary([name for _, name in real])
        index = {name: i for i, name in enumerate(self.vocab)}
        self.real = [(pixels, index[name]) for pixels, name in real]
        self.heldout = [(pixels, index[name]) for pixels, name in heldout if name in index]
        self.scene_index = {name: index[name] for name in SCENE_CLASSES}
        self.sensor_scenes = SENSOR_SCENES
        self.sensors, self.sensor_weights = list(SENSOR_MIXTURE), list(SENSOR_MIXTURE.values())
        self.rng = random.Random(seed)

    def synthetic_example(self, rng: random.Random) -> VisionExample:
        from rsvlm_edge.training.synthetic import make_scene, render

        sensor = rng.choices(self.sensors, weights=self.sensor_weights)[0]
        classes = self.sensor_scenes[sensor]
        np_rng = np.random.default_rng(rng.getrandbits(63))
        scene = make_scene(np_rng, self.cfg.image_size, classes[rng.randrange(len(classes))])
        pixels = prepare_image(render(scene, sensor), sensor, self.cfg.image_size)
        semantic, centre, boxes = dense_targets(scene, sensor, self.cfg.grid_size)
        return VisionExample(pixels, sensor, self.scene_index[scene.scene_class], semantic, centre, boxes)

    def heldout_accuracy(self, encoder: nn.Module, heads: VisionHeads, bf16: bool = False,
                         chunk: int = 128) -> dict[str, float]:
        """Scene top-1 of the head on the held-out real tiles: how much the encoder learned before any language."""
        if not self.heldout:
            return {}
        was_training = encoder.training, heads.training
        encoder.eval(), heads.eval()
        right = 0
        n = self.cfg.grid_size ** 2
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(self.heldout), chunk):
                part = self.heldout[i:i + chunk]
                pixels = torch.from_numpy(np.stack([p for p, _ in part]).astype(np.float32))
                logits = heads(encoder(pixels, "rgb")[:, :n])[0]
                right += int((logits.argmax(-1) == torch.tensor([label for _, label in part])).sum())
        encoder.train(was_training[0]), heads.train(was_training[1])
        return {"heldout_scene_acc": right / len(self.heldout), "heldout_n": len(self.heldout)}

    def heldout_scores(self, model: RSVLM, heads: VisionHeads | None, bf16: bool = False) -> dict[str, float]:
        """The trainer's end-of-stage scores: :meth:`heldout_accuracy` of the model's encoder with the stage's heads."""
        if heads is None:
            raise ValueError("stage vision is scored with its training-only heads; the trainer builds them with vision_steps")
        return self.heldout_accuracy(model.vision, heads, bf16)

    def batches(self, batch_size: int, pad_id: int = 0) -> Iterator[VisionBatch]:
        """``pad_id`` is unused (no text); it keeps the signature of ``Mixture.batches``."""
        while True:
            examples, augment = [], []
            for _ in range(batch_size):
                if self.rng.random() < self.synthetic_share:
                    examples.append(self.synthetic_example(self.rng))
                    augment.append(False)
                else:
                    pixels, label = self.real[self.rng.randrange(len(self.real))]
                    examples.append(VisionExample(pixels, "rgb", label))
                    augment.append(True)
            yield collate_vision(examples, self.cfg.grid_size, augment)
