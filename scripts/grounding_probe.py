"""Grounding probe: fine-tune a trained demo model on [VG] (and [REF]) only, with one of the candidate fixes, and
score the boxes on held-out synthetic scenes. Short runs (300 steps, ~4 min on 2 cores in bf16) that ask whether a
change moves grounding at all before a 2-hour training run is spent on it.

Variants (flags combine):
  --pos        add the 2-D position embedding to the visual tokens (``ModelConfig.token_pos_embed``, sincos init)
  --num-loss W expected-value L1 over the 101 number tokens at box positions (an ordinal signal besides the CE)
  --ptr W      pointer loss: the hidden state before the answer, against the visual tokens' hidden states, must pick
               the patch holding the object's centre (a training-only bilinear head); prints its accuracy
  --numinit S  initialise the lm_head rows of the number tokens from a 1-D sincos code of the value, aligned with
               the position embedding's code of the patch column / row
  --box W      (with --ptr) a training-only box head on the visual tokens' hidden states: at the patch holding the
               object's centre it regresses the box edges minus the patch centre (L1, weight W). At the end it
               scores the pointer-then-box design on held-out scenes: the box read at the patch the pointer picks

    python scripts/grounding_probe.py /tmp/probe-pos --pos
    python scripts/grounding_probe.py /tmp/probe-ptr --pos --ptr 1.0 --lr 1e-3 --tasks "[VG]"

Scores: Acc@0.5, the share of boxes centred within 6 units (0..100 scale, half a patch) of the object, and the
same split by expression kind (plain "the ship" / "the ship at the top" against superlatives like "the leftmost").
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.formats import BoxFormatError, parse_box
from rsvlm_edge.modeling import build_model, save_model
from rsvlm_edge.modeling.model import centre_patch, patch_centres
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.training import metrics
from rsvlm_edge.training.data import IGNORE, Mixture, SyntheticSource, encode_by_sensor


def load(src: str, pos: bool):
    cfg = ModelConfig.load(f"{src}/config.json")
    if pos:
        cfg = dataclasses.replace(cfg, token_pos_embed=True).validate()
    model = build_model(cfg)
    state = {k: v.float() for k, v in load_file(f"{src}/model.safetensors").items()}
    model.load_state_dict(state, strict=False)  # a new token_pos_embed keeps its sincos init
    return cfg, Tokenizer.load(f"{src}/tokenizer.json"), model


def number_code(cfg: ModelConfig) -> torch.Tensor:
    """(101, hidden): the value v in patch units, coded like one half of ``sincos_2d``, for both halves."""
    quarter = cfg.hidden_size // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter).float() / quarter))
    u = torch.arange(101).float() * cfg.grid_size / 100 - 0.5
    code = torch.cat([(u[:, None] * freqs).sin(), (u[:, None] * freqs).cos()], 1)
    return torch.cat([code, code], 1)


def pointer_targets(batch, tok: Tokenizer, hidden: torch.Tensor, grid: int):
    """(query states, visual states, centre patch, box in 0-1 units) of the rows whose answer is a box."""
    qs, ks, ts, boxes = [], [], [], []
    for r in range(batch.ids.shape[0]):
        pos = np.nonzero(batch.labels[r] != IGNORE)[0]
        text = tok.decode([int(x) for x in batch.labels[r][pos]])
        if not text.lstrip().startswith("["):
            continue
        try:
            box = parse_box(text)
        except BoxFormatError:
            continue
        cx, cy = (box[0] + box[2]) / 200, (box[1] + box[3]) / 200
        ts.append(centre_patch(cx, cy, grid))
        boxes.append([v / 100 for v in box])
        vis = np.nonzero(batch.ids[r] == tok.image_id)[0][:grid * grid]
        qs.append(hidden[r, pos[0] - 1])
        ks.append(hidden[r, vis])
    return qs, ks, ts, boxes


def pointer_box_eval(model, tok: Tokenizer, cfg: ModelConfig, heads, batches: int, batch_size: int) -> None:
    """Held-out scenes (their own seed): Acc@0.5 of the box the head reads at the pointer's patch and at the
    true centre patch, and the pointer's accuracy."""
    wq, wk, box_head = heads
    source = SyntheticSource(tok, cfg, seed=12_345, untagged=0.0, tasks=("[VG]",))
    stream = Mixture({"grounding": (1.0, source)}, seed=1).batches(batch_size, tok.pad_id)
    picked, right, hits = [], [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(batches):
            b = next(stream)
            slots = encode_by_sensor(b.pixels_by_sensor, b.num_images,
                                     lambda s, _, px: model.encode_images(torch.from_numpy(px), s))
            hidden = model.hidden_states(torch.from_numpy(b.ids), torch.from_numpy(b.mask), torch.stack(slots),
                                         tok.image_id, torch.from_numpy(b.experts))
            qs, ks, ts, boxes = pointer_targets(b, tok, hidden, cfg.grid_size)
            if not qs:
                continue
            keys = torch.stack(ks).float()
            choice = torch.einsum("bd,bnd->bn", wq(torch.stack(qs).float()), wk(keys)).argmax(-1)
            truth = torch.tensor(ts)
            rows = torch.arange(len(ts))
            offsets = box_head(keys).float()  # (B, N, 4)
            for patches, out in ((choice, picked), (truth, right)):
                pred = (offsets[rows, patches] + patch_centres(patches, cfg.grid_size)).clamp(0, 1) * 100
                out += [metrics.box_iou([round(float(v)) for v in p], [100 * v for v in t])
                        for p, t in zip(pred, boxes)]
            hits += (choice == truth).tolist()
    for name, ious in (("pointer's patch", picked), ("true centre patch", right)):
        ious_a = np.asarray(ious)
        print(f"box head at the {name}: n {len(ious_a)} Acc@0.5 {np.mean(ious_a >= 0.5):.3f} "
              f"mean IoU {ious_a.mean():.3f}")
    print(f"held-out pointer accuracy {np.mean(hits):.3f}")


def finetune(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, tok, model = load(args.src, args.pos)
    num_ids = torch.tensor([tok.encode(str(v))[0] for v in range(101)])
    value_of = torch.full((cfg.vocab_size,), -1.0)
    value_of[num_ids] = torch.arange(101).float()
    if args.numinit:
        with torch.no_grad():
            w, code = model.lm_head.weight, number_code(cfg)
            w[num_ids] = args.numinit * code * w.norm(dim=1).mean() / code.norm(dim=1).mean()
    source = SyntheticSource(tok, cfg, seed=3, untagged=0.2, tasks=tuple(args.tasks.split(",")))
    stream = Mixture({"grounding": (1.0, source)}, seed=0).batches(args.batch_size, tok.pad_id)
    wq, wk = torch.nn.Linear(cfg.hidden_size, 128), torch.nn.Linear(cfg.hidden_size, 128)
    box_head = torch.nn.Sequential(torch.nn.Linear(cfg.hidden_size, cfg.hidden_size), torch.nn.GELU(),
                                   torch.nn.Linear(cfg.hidden_size, 4))
    params = (list(model.parameters()) + list(wq.parameters()) + list(wk.parameters())
              + list(box_head.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps):
        b = next(stream)
        lr = args.lr * min(1, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            slots = encode_by_sensor(b.pixels_by_sensor, b.num_images,
                                     lambda s, _, px: model.encode_images(torch.from_numpy(px), s))
            hidden = model.hidden_states(torch.from_numpy(b.ids), torch.from_numpy(b.mask), torch.stack(slots),
                                         tok.image_id, torch.from_numpy(b.experts))
            targets = torch.from_numpy(b.labels)[:, 1:]
            where = targets != IGNORE
            logits = model.lm_head(hidden[:, :-1][where]).float()
            t = targets[where]
            lm = F.cross_entropy(logits, t)
            loss, num_l, ptr_l, ptr_acc, box_l = lm, 0.0, 0.0, 0.0, 0.0
            values = value_of[t]
            is_num = values >= 0
            if args.num_loss and is_num.any():
                expected = logits[is_num][:, num_ids].softmax(-1) @ torch.arange(101).float()
                nl = (expected - values[is_num]).abs().mean() / 10
                loss, num_l = loss + args.num_loss * nl, float(nl.detach())
            if args.ptr:
                qs, ks, ts, boxes = pointer_targets(b, tok, hidden, cfg.grid_size)
                if qs:
                    scores = torch.einsum("bd,bnd->bn", wq(torch.stack(qs).float()), wk(torch.stack(ks).float()))
                    scores = scores / 128 ** 0.5
                    tt = torch.tensor(ts)
                    pl = F.cross_entropy(scores, tt)
                    loss, ptr_l = loss + args.ptr * pl, float(pl.detach())
                    ptr_acc = float((scores.argmax(-1) == tt).float().mean())
                    if args.box:
                        at = torch.stack([k[t] for k, t in zip(ks, ts)]).float()
                        target = torch.tensor(boxes) - patch_centres(tt, cfg.grid_size)
                        bl = F.l1_loss(box_head(at).float(), target) * 10
                        loss, box_l = loss + args.box * bl, float(bl.detach())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"{step} lm {float(lm.detach()):.3f} num {num_l:.3f} ptr {ptr_l:.3f} ptr_acc {ptr_acc:.2f} box {box_l:.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    save_model(model.eval(), args.out)
    tok.save(f"{args.out}/tokenizer.json")
    if args.ptr and args.box:
        pointer_box_eval(model, tok, cfg, (wq, wk, box_head), args.eval_batches, args.batch_size)


def expression_kind(expr: str) -> str:
    return "superlative" if re.search(r"most|largest|smallest", expr) else "plain or region"


def score(model_dir: str, n: int) -> None:
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.training.evaluate import predict
    from rsvlm_edge.training.synthetic import generate

    pipe = Pipeline(model_dir, backend="torch")
    try:
        preds = predict(pipe.generator, generate(n, seed=10_012, tasks=("[VG]",)), batch_size=16, max_new_tokens=24)
    finally:
        pipe.close()
    groups: dict[str, list[tuple[float, float]]] = {}
    for p in preds:
        ref = p.sample.target["boxes"][0]
        box = p.parsed.boxes[0] if p.parsed.error is None and p.parsed.boxes else None
        centre = float(metrics.centre_distances([[box]] if box else [None], [ref])[0])
        iou = metrics.box_iou(box, ref) if box else 0.0
        for key in ("all", expression_kind(p.sample.target["expression"])):
            groups.setdefault(key, []).append((centre, iou))
    for key, rows in groups.items():
        centre, iou = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        print(f"{model_dir} {key}: n {len(rows)} acc@0.5 {np.mean(iou >= 0.5):.3f} centred within 6 "
              f"{np.mean(centre < 6):.3f} median centre error {np.median(np.minimum(centre, 142)):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="where the fine-tuned model dir goes")
    ap.add_argument("--src", default="models/tiny-demo", help="trained model dir to start from")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--tasks", default="[VG],[REF]", help="comma-separated synthetic tasks to train on")
    ap.add_argument("--pos", action="store_true")
    ap.add_argument("--num-loss", type=float, default=0.0)
    ap.add_argument("--ptr", type=float, default=0.0)
    ap.add_argument("--numinit", type=float, default=0.0)
    ap.add_argument("--box", type=float, default=0.0)
    ap.add_argument("--eval-batches", type=int, default=10, help="held-out batches for the pointer-then-box score")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score", type=int, default=240, help="held-out [VG] samples to score (0: skip)")
    args = ap.parse_args()
    finetune(args)
    if args.score:
        score(args.out, args.score)


if __name__ == "__main__":
    main()
