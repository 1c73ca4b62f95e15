"""How precise a box can the demo model's *visual tokens* give, before the decoder is involved?

Freezes a trained model's vision encoder (through the projector: the tokens the decoder reads), trains a fresh
per-patch centre / box head on them (the vision stage's heads, :class:`VisionHeads`) on synthetic scenes, then scores
held-out [VG] targets two ways:

* ``right patch``: the box the head reads at the patch holding the true object's centre; an upper bound for any
  decoder that finds the right patch and copies that patch's box (Acc@0.5 as ``rsvlm-edge eval`` computes it);
* ``best centre of the right class``: the box at the patch the head scores most likely to hold an object centre,
  among patches whose semantic class is the target's; a detector-style baseline that ignores the expression's
  position words (fair for "the ship" in a scene with one ship).

It first prints what Acc@0.5 asks of a box on these targets (no model involved): the score of the true box with
every coordinate moved by a uniform random error of up to +-e units (0-100 scale), and of boxes centred on the centre
of the right patch. ``--tolerance-only`` stops there.

    python scripts/box_readout_probe.py --src models/tiny-demo --steps 400
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from rsvlm_edge.modeling import load_model
from rsvlm_edge.modeling.model import centre_patch
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.training import metrics
from rsvlm_edge.training.synthetic import LANDCOVER_CLASSES, OBJECT_CLASSES, generate
from rsvlm_edge.training.vision_pretrain import VisionHeads, VisionMixture, collate_vision, num_semantic_classes


def box_at(offsets: torch.Tensor, patch: int, grid: int) -> list[float]:
    """The 0-100 box the head reads at ``patch``: its (x1, y1, x2, y2) offsets plus the patch centre."""
    px, py = (patch % grid + 0.5) / grid, (patch // grid + 0.5) / grid
    b = offsets[patch].numpy() + np.array([px, py, px, py])
    return [float(v) for v in np.clip(np.round(b * 100), 0, 100)]


def tolerance(n: int, grid: int = 8) -> None:
    """Acc@0.5 of the true [VG] boxes under coordinate noise, and of boxes centred on the right patch's centre."""
    boxes = np.array([s.target["boxes"][0] for s in generate(n, seed=10_012, tasks=("[VG]",))], float)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    print(f"{n} held-out [VG] targets: median box {np.median(w):.0f} x {np.median(h):.0f} units (0-100 scale)")

    def acc(pred: np.ndarray) -> float:
        return float(np.mean([metrics.box_iou(list(p), list(b)) >= 0.5 for p, b in zip(pred, boxes)]))

    rng = np.random.default_rng(0)
    for e in (1, 2, 3, 4, 6):
        noisy = np.round(boxes + rng.uniform(-e, e, boxes.shape))
        print(f"  true box, each coordinate off by up to +-{e}: Acc@0.5 {acc(noisy):.3f}")
    cell = 100 / grid
    centre = lambda v: (np.floor(v / cell).clip(0, grid - 1) + 0.5) * cell  # noqa: E731
    cx, cy = centre((boxes[:, 0] + boxes[:, 2]) / 2), centre((boxes[:, 1] + boxes[:, 3]) / 2)
    median = (np.full_like(w, np.median(w)), np.full_like(h, np.median(h)))
    for name, (bw, bh) in (("true size", (w, h)), ("median size", median)):
        pred = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
        print(f"  centred on the right patch's centre, {name}: Acc@0.5 {acc(pred):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="models/tiny-demo")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval", type=int, default=300, help="held-out [VG] samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerance-only", action="store_true", help="print the precision analysis and stop")
    args = ap.parse_args()
    tolerance(args.eval)
    if args.tolerance_only:
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.src).eval()
    cfg, grid = model.cfg, model.cfg.grid_size
    heads = VisionHeads(cfg.hidden_size, 1, num_semantic_classes())
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr)
    mixture = VisionMixture(cfg, real=[], seed=1)
    rng = random.Random(1)

    def tokens(sensor: str, pixels: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_images(torch.from_numpy(pixels.astype(np.float32)), sensor)[:, : grid * grid]

    t0 = time.time()
    for step in range(args.steps):
        batch = collate_vision([mixture.synthetic_example(rng) for _ in range(args.batch_size)], grid,
                               [False] * args.batch_size)
        rows = {}
        for sensor, (order, pixels) in batch.pixels_by_sensor.items():
            for i, t in zip(order, tokens(sensor, pixels)):
                rows[i] = t
        h = torch.stack([rows[i] for i in range(args.batch_size)])
        _, sem, centre, boxes = heads(h)
        target_centre = torch.from_numpy(batch.centre)
        pos = target_centre > 0
        loss = (0.5 * F.cross_entropy(sem.flatten(0, 1), torch.from_numpy(batch.semantic).flatten())
                + F.binary_cross_entropy_with_logits(centre, target_centre)
                + 10 * F.l1_loss(boxes[pos], torch.from_numpy(batch.boxes)[pos]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"{step} loss {float(loss.detach()):.3f} {time.time() - t0:.0f}s", flush=True)

    heads.eval()
    semantic_of = {name: 1 + len(LANDCOVER_CLASSES) + i for i, name in enumerate(OBJECT_CLASSES)}
    right, best_of_class = [], []
    for sample in generate(args.eval, seed=10_012, tasks=("[VG]",)):
        ref = [float(v) for v in sample.target["boxes"][0]]
        pixels = prepare_image(sample.images[0], sample.sensor, cfg.image_size)[None]
        with torch.no_grad():
            _, sem, centre, boxes = heads(tokens(sample.sensor, pixels))
        cx, cy = (ref[0] + ref[2]) / 200, (ref[1] + ref[3]) / 200
        k = centre_patch(cx, cy, grid)

        right.append(metrics.box_iou(box_at(boxes[0], k, grid), ref))
        cls = semantic_of.get(str(sample.target.get("label", "")))
        scores = centre[0].clone()
        if cls is not None:
            scores[sem[0].argmax(-1) != cls] = -1e9
        best_of_class.append(metrics.box_iou(box_at(boxes[0], int(scores.argmax()), grid), ref))
    for name, ious in (("right patch", right), ("best centre of the right class", best_of_class)):
        ious = np.asarray(ious)
        print(f"{name}: n {len(ious)} Acc@0.5 {np.mean(ious >= 0.5):.3f} mean IoU {ious.mean():.3f}")


if __name__ == "__main__":
    main()
