"""The box pointer's training side (``ModelConfig.box_pointer``): targets from [VG] answers, its loss, and weights
that survive save/load. Export and runtime do not use it yet."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rsvlm_edge.config import tiny_config
from rsvlm_edge.modeling import build_model, load_model, save_model
from rsvlm_edge.modeling.model import patch_centres
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.training.data import answer_box, collate, encode
from rsvlm_edge.training.synthetic import generate
from rsvlm_edge.training.train import batch_loss


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    cfg = dataclasses.replace(tiny_config(), box_pointer=True).validate()
    tok = Tokenizer.load(tiny_model_dir / "tokenizer.json")
    samples = generate(6, seed=3, tasks=("[VG]",)) + generate(2, seed=3, tasks=("[CLS]",))
    batch = collate([encode(s, tok, cfg) for s in samples], tok.pad_id)
    return cfg, tok, samples, batch


def test_targets_come_from_vg_answers_only(setup):
    _, _, samples, batch = setup
    for s, row in zip(samples, batch.boxes):
        if s.tag == "[VG]":
            np.testing.assert_allclose(row, np.asarray(s.target["boxes"][0]) / 100, rtol=1e-6)
            np.testing.assert_allclose(answer_box(s), row)
        else:
            assert answer_box(s) is None and np.isnan(row).all()


def test_patch_centres():
    got = patch_centres(torch.tensor([0, 9, 63]), 8)
    np.testing.assert_allclose(got.numpy(), [[1 / 16] * 4, [3 / 16] * 4, [15 / 16] * 4])


def test_pointer_loss_trains_the_pointer(setup):
    cfg, tok, _, batch = setup
    torch.manual_seed(0)
    model = build_model(cfg)
    loss, stats = batch_loss(model, batch, tok.image_id, router_weight=0.0)
    assert {"pointer_loss", "pointer_acc", "box_l1"} <= set(stats)
    loss.backward()
    assert model.box_pointer.query.weight.grad.abs().sum() > 0 and model.box_pointer.box[0].weight.grad.abs().sum() > 0
    # on one fixed batch, a few steps must drive the pointer's loss down
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = stats["pointer_loss"] + 10 * stats["box_l1"]
    for _ in range(40):
        opt.zero_grad()
        loss, stats = batch_loss(model, batch, tok.image_id, router_weight=0.0)
        loss.backward()
        opt.step()
    assert stats["pointer_loss"] + 10 * stats["box_l1"] < 0.5 * first
    # without VG rows (or with the weight at 0) nothing is added
    none = collate([encode(s, tok, cfg) for s in generate(2, seed=4, tasks=("[CLS]",))], tok.pad_id)
    assert "pointer_loss" not in batch_loss(model, none, tok.image_id, router_weight=0.0)[1]
    assert "pointer_loss" not in batch_loss(model, batch, tok.image_id, router_weight=0.0, pointer_weight=0.0)[1]


def test_pointer_weights_survive_save_and_load(setup, tmp_path):
    cfg, _, _, _ = setup
    model = build_model(cfg, seed=1)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.cfg.box_pointer and again.box_pointer is not None
    torch.testing.assert_close(again.box_pointer.key.weight, model.box_pointer.key.weight.half().float())
    assert build_model(tiny_config()).box_pointer is None  # off by default: the shipped model has none
