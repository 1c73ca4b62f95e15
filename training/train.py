"""Staged training of the MoE VLM on CPU (or a GPU when present), resumable, with a JSONL loss log.

Stage ``vision`` (optional, ``vision_steps``): the encoder alone learns scene classes and per-patch boxes through
training-only heads (:mod:`rsvlm_edge.training.vision_pretrain`), standing in for RSUniVLM's pretrained SigLIP.
Stage ``align``: captions and classification only, everything through expert 0 (image); the vision encoder,
projector and decoder trunk learn to talk about tiles. At the switch, experts 1 and 2 start as copies of expert 0
(upcycling, as RSUniVLM initialises its granularity experts from one FFN).
Stage ``instruct``: every task, each request through its tag's expert, plus the router's cross-entropy on the
tag-free instruction; a share of prompts drops the tag so the model also answers untagged requests.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO, cast

import numpy as np
import torch
import torch.nn.functional as F

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.fileio import atomic_path, atomic_write_text
from rsvlm_edge.generation import patch_positions
from rsvlm_edge.modeling import RSVLM, build_model, save_model
from rsvlm_edge.modeling.model import DecoderLayer, centre_patch, patch_centres
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.training.data import IGNORE, Batch, Mixture, encode_by_sensor
from rsvlm_edge.training.vision_pretrain import VisionHeads, VisionMixture, num_semantic_classes, vision_loss

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    vision_steps: int = 0
    vision_batch_size: int = 64
    align_steps: int = 300
    instruct_steps: int = 1500
    batch_size: int = 24
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    router_weight: float = 0.2
    pointer_weight: float = 1.0  # models with box_pointer: pointer cross-entropy + box L1 on [VG] answers
    box_l1_weight: float = 10.0  # box L1 in the pointer loss: edges are image fractions, small beside a 64-way CE
    untagged_share: float = 0.2
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # 0 = torch default
    precision: str = "auto"  # auto | fp32 | bf16 (autocast compute, fp32 master weights)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.vision_steps + self.align_steps + self.instruct_steps

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A saved ``train_config.json``: fields added since it was written take their defaults (their default is
        what those runs used)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown train config keys: {', '.join(unknown)}")
        return cls(**values)


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.total_steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


PRECISIONS = ("auto", "fp32", "bf16")


#: CPU flags (Linux /proc/cpuinfo names) of native bf16 dot products.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The first CPU's feature flags, or None where the file is missing (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    """AVX512-BF16 / AMX cores run bf16 GEMMs much faster than fp32 (the demo run: 0.45 s per align step vs 0.84 s).
    oneDNN's own check (``_is_mkldnn_bf16_supported``) also says yes on plain AVX512 cores, where it emulates bf16:
    on such a Xeon a vision step took 3.7 s in bf16 against 2.2 s in fp32, so on Linux the flags decide."""
    flags = cpu_flags() if flags is None else flags
    if flags is not None:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where the CPU has native bf16 dot products, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def pointer_loss(model: RSVLM, batch: Batch, hidden: torch.Tensor, image_token_id: int, box_l1_weight: float = 10.0
                 ) -> tuple[torch.Tensor, dict[str, float]] | None:
    """For the rows whose answer is one box: cross-entropy of the pointer over the image's patch tokens (target:
    the patch holding the box centre) plus ``box_l1_weight`` times the L1 of the box read at that patch. None without
    such rows."""
    pointer = model.box_pointer
    if pointer is None or batch.boxes is None:
        return None
    grid = model.cfg.grid_size
    queries, patches, targets, boxes = [], [], [], []
    for row in np.nonzero(~np.isnan(batch.boxes[:, 0]))[0]:
        answer = np.nonzero(batch.labels[row] != IGNORE)[0]
        image = patch_positions(batch.ids[row], image_token_id, grid)
        if not len(answer) or len(image) < grid * grid:
            continue
        box = batch.boxes[row]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        targets.append(centre_patch(cx, cy, grid))
        queries.append(hidden[row, answer[0] - 1])  # the state that predicts the answer's first token
        patches.append(hidden[row, torch.from_numpy(image)])
        boxes.append(box)
    if not targets:
        return None
    keys = torch.stack(patches).float()
    scores = pointer.scores(torch.stack(queries).float(), keys)
    target = torch.tensor(targets)
    ce = F.cross_entropy(scores, target)
    rows = torch.arange(len(targets))
    read = pointer.boxes(keys[rows, target]).float() + patch_centres(target, grid)
    l1 = F.l1_loss(read, torch.from_numpy(np.stack(boxes)))
    stats = {"pointer_loss": float(ce.detach()), "pointer_acc": float((scores.argmax(-1) == target).float().mean()),
             "box_l1": float(l1.detach())}
    return ce + box_l1_weight * l1, stats


def batch_loss(model: RSVLM, batch: Batch, image_token_id: int, router_weight: float,
               force_expert: int | None = None, pointer_weight: float = 1.0, box_l1_weight: float = 10.0
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer-token cross-entropy (+ router cross-entropy, + the box pointer's loss) for one batch."""
    slots = encode_by_sensor(batch.pixels_by_sensor, batch.num_images,
                             lambda sensor, _, pixels: model.encode_images(torch.from_numpy(pixels), sensor))
    image_embeds = torch.stack(slots) if slots else None
    ids = torch.from_numpy(batch.ids)
    experts = torch.from_numpy(batch.experts)
    expert: int | torch.Tensor = force_expert if force_expert is not None else experts
    hidden = model.hidden_states(ids, torch.from_numpy(batch.mask), image_embeds, image_token_id, expert)
    targets = torch.from_numpy(batch.labels)[:, 1:]
    where = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][where]).float()
    lm = F.cross_entropy(logits, targets[where])
    stats = {"lm_loss": float(lm.detach()), "tokens": int(where.sum())}
    loss = lm
    if router_weight > 0 and model.router is not None:  # tag-routed models (config.router false) have no router
        router_logits = model.route(torch.from_numpy(batch.instruction_ids), torch.from_numpy(batch.instruction_mask))
        rl = F.cross_entropy(router_logits, experts)
        loss = loss + router_weight * rl
        stats["router_loss"] = float(rl.detach())
        stats["router_acc"] = float((router_logits.argmax(-1) == experts).float().mean())
    if pointer_weight > 0:
        found = pointer_loss(model, batch, hidden, image_token_id, box_l1_weight)
        if found is not None:
            loss = loss + pointer_weight * found[0]
            stats.update(found[1])
    stats["loss"] = float(loss.detach())
    return loss, stats


def upcycle_experts(model: RSVLM) -> None:
    """Copy expert 0's FFN into the others (start of instruction tuning)."""
    with torch.no_grad():
        for layer in model.layers:
            experts = cast(DecoderLayer, layer).experts
            for other in experts[1:]:
                other.load_state_dict(experts[0].state_dict())


class Trainer:
    def __init__(self, out_dir: str | Path, cfg: ModelConfig, tokenizer: Tokenizer, tc: TrainConfig,
                 mixtures: Callable[[str], Mixture | VisionMixture], progress: bool = True,
                 num_scene_classes: int = 0):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg, self.tokenizer, self.tc, self.mixtures, self.progress = cfg, tokenizer, tc, mixtures, progress
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.precision = resolve_precision(tc.precision)
        self.model = build_model(cfg, seed=tc.seed)
        # Training-only heads of stage ``vision``; they share the optimizer (no gradients after that stage).
        self.heads: VisionHeads | None = None
        if tc.vision_steps:
            if num_scene_classes < 1:
                raise ValueError("stage vision needs num_scene_classes (the recipe's scene vocabulary)")
            self.heads = VisionHeads(cfg.hidden_size, num_scene_classes, num_semantic_classes())
        self.augment_rng = torch.Generator().manual_seed(tc.seed)
        named = list(self.model.named_parameters()) + (
            [(f"heads.{n}", p) for n, p in self.heads.named_parameters()] if self.heads else [])
        self.trainable = [p for _, p in named]  # everything the optimizer steps, so clipping sees the heads too
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
        self.step = 0
        self.wall_s = 0.0  # training wall time so far, over every resume (checkpointed)
        self._resume()
        self._run_start = time.perf_counter()

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["model_config"] != self.cfg.to_dict():
            raise ValueError(f"{path} was written for another model config; use a fresh output dir")
        self.model.load_state_dict(state["model"])
        if self.heads is not None and "heads" in state:
            self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.wall_s = float(state.get("wall_s", 0.0))
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> None:
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                        "wall_s": self._wall(), "model_config": self.cfg.to_dict(), "train_config": asdict(self.tc),
                        "torch_rng": torch.get_rng_state(),
                        **({"heads": self.heads.state_dict()} if self.heads is not None else {})}, tmp)

    def _wall(self) -> float:
        return self.wall_s + time.perf_counter() - self._run_start

    def stage_of(self, step: int) -> str:
        if step < self.tc.vision_steps:
            return "vision"
        return "align" if step < self.tc.vision_steps + self.tc.align_steps else "instruct"

    def run(self) -> Path:
        """Train from ``self.step`` to the end of the schedule, then write the shippable model dir."""
        from tqdm import tqdm

        tc = self.tc
        streaming: str | None = None  # the stage whose batches ``stream`` draws
        self._run_start = time.perf_counter()
        with tqdm(total=tc.total_steps, initial=self.step, desc=f"train ({self.precision})", dynamic_ncols=True,
                  disable=not self.progress) as bar, open(self.out / LOG, "a") as log:
            while self.step < tc.total_steps:
                # stage switch
                stage = self.stage_of(self.step)
                if stage != streaming:
                    mixture, stream = self.start_stage(stage)
                    streaming = stage
                t0 = time.perf_counter()
                batch = next(stream)

                # learning rate
                lr = lr_at(self.step, tc)
                for group in self.opt.param_groups:
                    group["lr"] = lr

                # forward-backward
                loss, stats = self.stage_loss(stage, batch)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.trainable, tc.grad_clip)
                self.opt.step()
                self.step += 1

                # logging
                row = {**stats, "step": self.step, "stage": stage, "lr": lr, "sec": time.perf_counter() - t0,
                       "wall_s": round(self._wall(), 1)}
                if self.step % tc.log_every == 0 or self.step == tc.total_steps:
                    write_row(log, row)
                bar.set_postfix(stage=stage, loss=f"{stats['loss']:.3f}")
                bar.update(1)

                # evaluate and checkpoint
                if stage == "vision" and self.step == tc.vision_steps:  # the encoder's score before any language
                    scores = mixture.heldout_scores(self.model, self.heads, self.precision == "bf16")
                    write_row(log, {"step": self.step, "stage": "vision_eval", **scores})
                if self.step % tc.save_every == 0 or self.step == tc.total_steps:
                    self.save_checkpoint()

        # termination: the schedule is done (the loop's condition); ship the model
        return self.export_model()

    def start_stage(self, stage: str) -> tuple[Mixture | VisionMixture, Iterator[Any]]:
        """The stage's mixture and its batches (``VisionBatch`` in stage vision). The stream is seeded by the step,
        so a resumed run draws what an unbroken one would have. Instruct's first step upcycles the experts."""
        if stage == "instruct" and self.step == self.tc.vision_steps + self.tc.align_steps:
            upcycle_experts(self.model)
        mixture = self.mixtures(stage)
        mixture.rng.seed(self.tc.seed * 1_000_003 + self.step)
        size = self.tc.vision_batch_size if stage == "vision" else self.tc.batch_size
        return mixture, mixture.batches(size, self.tokenizer.pad_id)

    def stage_loss(self, stage: str, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The stage's loss: the vision heads' in stage vision; in align, expert 0 only and no router or pointer."""
        tc, instruct = self.tc, stage == "instruct"
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if stage == "vision":  # stage vision exists only with vision_steps, which build the heads
                return vision_loss(self.model.vision, cast(VisionHeads, self.heads), batch, self.cfg.grid_size,
                                   self.augment_rng)
            return batch_loss(self.model, batch, self.tokenizer.image_id,
                              router_weight=tc.router_weight if instruct else 0.0,
                              force_expert=None if instruct else 0,
                              pointer_weight=tc.pointer_weight if instruct else 0.0, box_l1_weight=tc.box_l1_weight)

    def export_model(self) -> Path:
        """The shippable model dir: config.json, model.safetensors (fp16), tokenizer.json, train_config.json."""
        model_dir = self.out / "model"
        save_model(self.model.eval(), model_dir)
        self.tokenizer.save(model_dir / "tokenizer.json")
        atomic_write_text(model_dir / "train_config.json", json.dumps(asdict(self.tc), indent=2) + "\n")
        return model_dir


def write_row(log: TextIO, row: dict[str, Any]) -> None:
    """One JSON line, flushed: the log is read while training runs and must survive a killed run."""
    log.write(json.dumps(row) + "\n")
    log.flush()


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
