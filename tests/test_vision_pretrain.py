"""Stage ``vision``: dense targets, augmentation, the heads learning, and a CLI run through all three stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rsvlm_edge.cli import main
from rsvlm_edge.config import preset
from rsvlm_edge.modeling import build_model
from rsvlm_edge.training.synthetic import SCENE_CLASSES, make_scene
from rsvlm_edge.training.train import TrainConfig
from rsvlm_edge.training.vision_pretrain import (
    VisionHeads,
    VisionMixture,
    augment_affine,
    dense_targets,
    num_semantic_classes,
    scene_vocabulary,
    vision_loss,
)


def test_dense_targets_mark_each_object_centre_with_its_box():
    scene = make_scene(np.random.default_rng(3), 128, "harbor")
    semantic, centre, boxes = dense_targets(scene, "rgb", 8)
    assert semantic.shape == (64,) and centre.shape == (64,) and boxes.shape == (64, 4)
    assert semantic.min() >= 1 and semantic.max() < num_semantic_classes()
    objects = scene.visible("rgb")
    assert objects and 0 < centre.sum() <= len(objects)
    for k in np.flatnonzero(centre):
        row, col = divmod(int(k), 8)
        centre_xy = np.asarray([col * 16 + 8, row * 16 + 8] * 2)
        x1, y1, x2, y2 = absolute = boxes[k] * 128 + centre_xy  # offsets from the patch centre -> pixels
        assert x1 < x2 and y1 < y2
        assert col * 16 <= (x1 + x2) / 2 < (col + 1) * 16 and row * 16 <= (y1 + y2) / 2 < (row + 1) * 16
        assert any(np.allclose(absolute, o.box_px, atol=1e-4) for o in objects)
    assert not boxes[centre == 0].any()


def test_scene_vocabulary_merges_names():
    vocab = scene_vocabulary(["forest", "airport", "beach", "bridge"])
    assert vocab[: len(SCENE_CLASSES)] == list(SCENE_CLASSES)
    assert vocab[len(SCENE_CLASSES):] == ["beach", "bridge"]


def test_affine_augmentation_without_motion_is_identity_or_mirror():
    px = torch.rand(6, 3, 32, 32)
    out = augment_affine(px, torch.Generator().manual_seed(0), max_rotate=0.0, scale=(1.0, 1.0), max_shift=0.0)
    assert out.shape == px.shape
    for a, b in zip(out, px):
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)
    moved = augment_affine(px, torch.Generator().manual_seed(0))
    assert moved.shape == px.shape and not torch.allclose(moved, px)


def test_vision_heads_learn_a_fixed_batch():
    cfg = preset("tiny")
    real = [(np.random.default_rng(i).standard_normal((3, 128, 128)).astype(np.float16), name)
            for i, name in enumerate(["beach", "bridge", "forest", "beach"])]
    mix = VisionMixture(cfg, real, seed=0, synthetic_share=0.5, heldout=real)
    batch = next(mix.batches(8))
    assert batch.dense.any() and (~batch.dense).any()
    assert set(batch.augment) == {True, False} and (batch.augment == ~batch.dense).all()
    torch.manual_seed(0)
    encoder = build_model(cfg).vision
    heads = VisionHeads(cfg.hidden_size, len(mix.vocab), num_semantic_classes())
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch.augment[:] = False  # a fixed batch, so the loss must fall
    first = None
    for _ in range(12):
        loss, stats = vision_loss(encoder, heads, batch, cfg.grid_size, torch.Generator())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else stats["loss"]
    assert stats["loss"] < 0.7 * first
    assert {"scene_acc", "semantic_loss", "centre_loss", "box_l1"} <= set(stats)
    acc = mix.heldout_accuracy(encoder, heads)
    assert acc["heldout_n"] == 4 and 0.0 <= acc["heldout_scene_acc"] <= 1.0


def test_stage_boundaries():
    from rsvlm_edge.training.train import Trainer

    tc = TrainConfig(vision_steps=3, align_steps=2, instruct_steps=4)
    assert tc.total_steps == 9
    stages = [Trainer.stage_of(type("T", (), {"tc": tc})(), s) for s in range(9)]  # type: ignore[arg-type]
    assert stages == ["vision"] * 3 + ["align"] * 2 + ["instruct"] * 4


def test_train_cli_with_vision_stage_resumes_and_ships_no_heads(tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "no-real-data"
    empty.mkdir()
    args = ["train", str(out), "--vision-steps", "3", "--vision-batch-size", "4", "--align-steps", "1",
            "--instruct-steps", "1", "--batch-size", "2", "--data", str(empty), "--save-every", "2", "--threads", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if r["stage"] == "vision_eval"] == ["vision_eval"]
    assert log[-1]["step"] == 5
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert "heads" in state and state["train_config"]["vision_steps"] == 3
    from safetensors import safe_open

    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("heads") for k in f.keys())
    result = CliRunner().invoke(main, args[:9] + ["2"] + args[10:])  # one more instruct step resumes at step 5
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 6


def test_vision_stage_needs_a_scene_vocabulary(tmp_path):
    from rsvlm_edge.training.train import Trainer

    with pytest.raises(ValueError, match="num_scene_classes"):
        Trainer(tmp_path, preset("tiny"), None, TrainConfig(vision_steps=2), lambda stage: None,  # type: ignore[arg-type]
                progress=False)


def test_model_card_summarises_the_vision_stage():
    from rsvlm_edge.training.model_card import train_log_summary

    rows = [{"stage": "vision", "step": s, "sec": 1.5, "loss": 3.0} for s in (10, 20)]
    rows += [{"stage": "vision_eval", "step": 20, "heldout_scene_acc": 0.5, "heldout_n": 100}]
    rows += [{"stage": "align", "step": 30, "sec": 0.5, "lm_loss": 2.0}]
    lines = train_log_summary(rows, log_every=10)
    assert lines[0].startswith("- vision: 20 steps, 1.50 s per step") and "final loss 3.000" in lines[0]
    assert lines[1].startswith("- align: 10 steps")
    assert lines[2].endswith("0.500 top-1 on 100 held-out AID tiles")


def test_gradient_clipping_covers_the_training_only_heads(tmp_path):
    from rsvlm_edge.training.train import Trainer

    trainer = Trainer(tmp_path, preset("tiny"), None, TrainConfig(vision_steps=2), lambda stage: None,  # type: ignore[arg-type]
                      progress=False, num_scene_classes=5)
    assert trainer.heads is not None
    stepped = {id(p) for group in trainer.opt.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in trainer.trainable}
    assert {id(p) for p in trainer.heads.parameters()} <= stepped
