"""Train the dense heads on a frozen model: ``python -m rsvlm_edge.training.dense_train MODEL_DIR OUT_DIR``.

The trunk (vision encoder, decoder, experts, pointer) stays as trained; the heads
(:class:`rsvlm_edge.modeling.model.DenseHeads`) learn from its patch and answer-start states, which are computed
once (:mod:`rsvlm_edge.training.dense_features`) so the whole stage is a few minutes of feature extraction and a few
of head training on a CPU. Data: synthetic [DET], [OBB] and [SEG] (single-image and change) samples plus the train
splits of SIRST, HRSID and LEVIR-CD when ``../shared/data`` has them. OUT_DIR gets the model with the heads
(config.json with ``dense_heads`` on, model.safetensors, the source's tokenizer and side files) and
``dense_log.json`` (sample counts, losses per epoch, seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from rsvlm_edge.training.dense_targets import DENSE_LABELS, DENSE_OBJECTS, DenseTargets, build_targets
from rsvlm_edge.training.sample import Sample

#: Seeds of the synthetic training streams: far from the eval suites' (training.evaluate.SYNTHETIC_EVAL_SEED).
TRAIN_SEED = 900_000
#: Real sets too small to weigh anything at their size (``DenseTrainConfig.small_set_repeat``).
SMALL_SETS = ("levir_cd", "hrsid")
#: Side files of a model dir that the trained model keeps (its weights and config are rewritten).
SIDE_FILES = ("tokenizer.json", "train_config.json", "generation_config.json")


@dataclasses.dataclass
class DenseTrainConfig:
    det: int = 3000  # synthetic [DET] samples
    obb: int = 3000  # synthetic [OBB] samples
    seg: int = 4000  # synthetic [SEG] samples (a quarter of them change masks)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    box_weight: float = 10.0  # L1 of boxes in image sizes is ~0.01: scaled as the pointer's box loss
    obb_weight: float = 5.0
    object_pos_weight: float = 3.0  # an image has a few objects among 64 patches
    cell_pos_weight: float = 2.0  # > 1 favours recall of a label's cells (small objects cover few)
    small_set_repeat: int = 8  # LEVIR-CD and HRSID have a handful of tiles (x8 views): their rows count this often
    seed: int = 0
    threads: int = 0


def training_samples(tc: DenseTrainConfig, data_root: Path | None) -> tuple[list[Sample], dict[str, int]]:
    """Synthetic samples plus the real sets' train splits that are present, and how many came from each."""
    from rsvlm_edge.training import real_data
    from rsvlm_edge.training.synthetic import generate

    samples: list[Sample] = []
    counts: dict[str, int] = {}
    for offset, (tag, n) in enumerate((("[DET]", tc.det), ("[OBB]", tc.obb), ("[SEG]", tc.seg))):
        part = generate(n, seed=TRAIN_SEED + 10 * tc.seed + offset, tasks=(tag,)) if n else []
        samples += part
        counts[f"synthetic {tag}"] = len(part)
    for name in ("sirst", "hrsid", "levir_cd"):
        try:
            part = [s for s in getattr(real_data, f"load_{name}")("train", root=data_root)
                    if s.tag in ("[DET]", "[SEG]")]
        except FileNotFoundError:
            part = []
        samples += part
        counts[name] = len(part)
    return samples, counts


def _features(model_dir: Path, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(query, patches, patches_after) float16 of every sample and the order they are in (by image count)."""
    from rsvlm_edge.backends.torch_backend import TorchBackend
    from rsvlm_edge.generation import Generator
    from rsvlm_edge.pipeline import load_tokenizer
    from rsvlm_edge.training.dense_features import sample_features

    backend = TorchBackend.from_dir(model_dir)
    generator = Generator(backend, load_tokenizer(model_dir, backend.config.prompt_template))
    queries, before, after, order = [], [], [], []
    for count in sorted({len(s.images) for s in samples}):
        idx = [i for i, s in enumerate(samples) if len(s.images) == count]
        feats = sample_features(generator, [samples[i] for i in idx])
        queries.append(feats.query)
        before.append(feats.patches[:, 0])
        after.append(feats.patches[:, -1])
        order += idx
    return np.concatenate(queries), np.concatenate(before), np.concatenate(after), order


def dense_losses(image_out, change_out, t: dict, c: dict, tc: DenseTrainConfig):
    """The weighted sum of the heads' losses over what each sample knows (see dense_targets), and its parts.
    ``image_out``/``t``: the single-image rows' logits and targets; ``change_out``/``c``: the pairs' (or None)."""
    import torch
    import torch.nn.functional as F

    asked, objects, boxes, obbs, cells = image_out

    def mean(values, weights):
        return (values * weights).sum() / weights.sum().clamp(min=1.0)

    bce = F.binary_cross_entropy_with_logits
    parts = {
        "asked": mean(bce(asked, t["asked"], reduction="none").mean(1), t["asked_known"]),
        "objects": mean(bce(objects, t["objects"], reduction="none", pos_weight=torch.tensor(tc.object_pos_weight)),
                        t["objects_known"][:, None, :].expand_as(objects)),
        "boxes": mean((boxes - t["boxes"]).abs().sum(-1), t["boxes_known"]),
        "obbs": mean((obbs - t["obbs"]).abs().sum(-1), t["obbs_known"]),
        "cells": mean(bce(cells, t["cells"], reduction="none", pos_weight=torch.tensor(tc.cell_pos_weight)),
                      t["cells_known"][:, None, None, :].expand_as(cells)),
        "change": bce(change_out, c["change"]) if change_out is not None else torch.zeros(()),
    }
    total = (parts["asked"] + parts["objects"] + tc.box_weight * parts["boxes"] + tc.obb_weight * parts["obbs"]
             + parts["cells"] + parts["change"])
    return total, {k: float(v.detach()) for k, v in parts.items()}


def train_heads(heads, query: np.ndarray, before: np.ndarray, after: np.ndarray, targets: DenseTargets,
                tc: DenseTrainConfig, log) -> None:
    """AdamW with a one-cycle schedule over the cached states, seeded. Single-image rows train the image heads,
    pairs (change masks) the change head, each batch drawn from one shuffled order over all rows."""
    import torch

    torch.manual_seed(tc.seed)
    data = [torch.from_numpy(a.astype(np.float32)) for a in (query, before, after)]
    t = {k: torch.from_numpy(v) for k, v in dataclasses.asdict(targets).items()}
    pair = t["change_known"] > 0
    n = len(data[0])
    steps_per_epoch = max(1, n // tc.batch_size)
    opt = torch.optim.AdamW(heads.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, tc.lr, total_steps=tc.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(tc.seed)
    heads.train()
    for epoch in range(tc.epochs):
        perm = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            idx = perm[step * tc.batch_size:(step + 1) * tc.batch_size]
            single, pairs = idx[~pair[idx]], idx[pair[idx]]
            image_out = heads.image_logits(data[0][single], data[1][single])
            change_out = heads.change_logits(data[1][pairs], data[2][pairs]) if len(pairs) else None
            loss, parts = dense_losses(image_out, change_out, {k: v[single] for k, v in t.items()},
                                       {k: v[pairs] for k, v in t.items()}, tc)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / steps_per_epoch
        log({"epoch": epoch + 1, **{k: round(v, 5) for k, v in sums.items()}})
    heads.eval()


def write_model(src: Path, out: Path, model) -> None:
    """OUT_DIR: the source model with the trained heads (fp16 safetensors, config) and the source's side files."""
    from rsvlm_edge.modeling import save_model

    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    for name in SIDE_FILES:
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / name, out / name)


def _cached_features(model_dir: Path, trunk, samples: list[Sample], counts: dict[str, int],
                     path: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """:func:`_features`, kept in ``path`` (npz) when given: a later run with the same samples (counts) on the same
    trunk (a hash of every weight but the dense heads') loads them instead of running the trunk again."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(trunk.state_dict().items()):
        if not name.startswith("dense_heads."):
            digest.update(name.encode() + tensor.detach().to(torch.float16).contiguous().numpy().tobytes())
    key = json.dumps({"samples": counts, "trunk": digest.hexdigest()})
    if path is not None and path.is_file():
        with np.load(path) as data:
            if str(data["key"]) == key:
                return data["query"], data["before"], data["after"], [int(i) for i in data["order"]]
    query, before, after, order = _features(model_dir, samples)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, key=np.asarray(key), query=query, before=before, after=after, order=np.asarray(order))
    return query, before, after, order


def run(model_dir: Path, out_dir: Path, tc: DenseTrainConfig, data_root: Path | None = None,
        features: Path | None = None) -> dict:
    import torch

    from rsvlm_edge.modeling import load_model
    from rsvlm_edge.modeling.model import DenseHeads

    if tc.threads:
        torch.set_num_threads(tc.threads)
    t0 = time.time()
    base = load_model(model_dir)
    if not base.cfg.box_pointer:
        raise ValueError(f"{model_dir}: the dense heads read the box pointer's hidden states; train the model with "
                         f"--box-pointer")
    cfg = dataclasses.replace(base.cfg, dense_heads=True, dense_labels=list(DENSE_LABELS),
                              dense_objects=list(DENSE_OBJECTS)).validate()
    log_rows: list[dict] = []

    def log(row: dict) -> None:
        log_rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    samples, counts = training_samples(tc, data_root)
    log({"stage": "samples", **counts, "seconds": round(time.time() - t0, 1)})
    query, before, after, order = _cached_features(model_dir, base, samples, counts, features)
    rows = [k for k, i in enumerate(order)
            for _ in range(tc.small_set_repeat if samples[i].source in SMALL_SETS else 1)]
    query, before, after = query[rows], before[rows], after[rows]
    targets = build_targets([samples[order[k]].target for k in rows], cfg.grid_size)
    log({"stage": "features", "n": len(order), "seconds": round(time.time() - t0, 1)})
    torch.manual_seed(tc.seed)
    heads = DenseHeads(cfg)
    train_heads(heads, query, before, after, targets, tc, log)
    base.cfg = cfg
    base.dense_heads = heads
    write_model(model_dir, out_dir, base)
    summary = {"config": dataclasses.asdict(tc), "samples": counts, "seconds": round(time.time() - t0, 1),
               "log": log_rows}
    (out_dir / "dense_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsvlm_edge.training.dense_train", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="trained model dir (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("out_dir", type=Path, help="where the model with dense heads goes (may be MODEL_DIR)")
    parser.add_argument("--data", type=Path, default=None, help="real data root (default ../shared/data)")
    parser.add_argument("--features", type=Path, default=None,
                        help="keep the trunk's states here (npz) and reuse them on a re-run with the same samples")
    defaults = DenseTrainConfig()
    for f in dataclasses.fields(DenseTrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir} is not a model dir (no config.json)")
    tc = DenseTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DenseTrainConfig)})
    summary = run(args.model_dir, args.out_dir, tc, args.data, args.features)
    print(f"dense heads trained in {summary['seconds']:.0f} s; model written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
