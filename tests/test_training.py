"""Training pipeline: schedule, precision choice, augmentation, recipe, and a short resumable CLI run."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.cli import main
from rsvlm_edge.training.recipe import STAGE_WEIGHTS, SYNTHETIC_STREAMS, jitter
from rsvlm_edge.training.train import TrainConfig, lr_at, resolve_precision


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(align_steps=10, instruct_steps=90, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(99, tc) < lr_at(50, tc) < lr_at(10, tc)
    assert lr_at(10_000, tc) == pytest.approx(1e-4)


def test_train_config_files_written_before_a_field_existed_still_load():
    saved = asdict(TrainConfig(align_steps=7, pointer_weight=0.5))
    assert TrainConfig.from_dict(saved) == TrainConfig(align_steps=7, pointer_weight=0.5)
    del saved["box_l1_weight"]  # an older train_config.json
    assert TrainConfig.from_dict(saved).box_l1_weight == TrainConfig().box_l1_weight == 10.0
    with pytest.raises(ValueError, match="unknown train config keys: box_weight"):
        TrainConfig.from_dict({**saved, "box_weight": 1.0})


def test_text_mixtures_have_no_heldout_scores_of_their_own():
    from rsvlm_edge.training.data import ListSource, Mixture

    mixture = Mixture({"one": (1.0, ListSource([object()]))})  # type: ignore[list-item]
    assert mixture.heldout_scores(None, None) == {}  # type: ignore[arg-type]


def test_precision_choice():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")


def test_jitter_keeps_shape_dtype_and_content_statistics():
    rng = random.Random(0)
    tile = np.random.default_rng(0).standard_normal((3, 32, 32)).astype(np.float16)
    out = jitter(tile, rng, max_shift=4)
    assert out.shape == tile.shape and out.dtype == tile.dtype
    assert not np.array_equal(out, tile)
    assert abs(float(out.astype(np.float32).std()) - float(tile.astype(np.float32).std())) < 0.3
    still = jitter(tile, random.Random(1), max_shift=0, contrast=0.0, brightness=0.0)
    np.testing.assert_array_equal(still, tile)


def test_recipe_sources_are_known():
    for stage, weights in STAGE_WEIGHTS.items():
        assert abs(sum(weights.values()) - 1.0) < 1e-6, stage
        for name in weights:
            if name.startswith("synthetic"):
                assert name in SYNTHETIC_STREAMS


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_cli_runs_and_resumes(tmp_path, precision):
    out = tmp_path / "run"
    empty = tmp_path / "no-real-data"
    empty.mkdir()
    args = ["train", str(out), "--align-steps", "2", "--instruct-steps", "2", "--batch-size", "4",
            "--data", str(empty), "--precision", precision, "--save-every", "2", "--threads", "1"]
    if precision == "bf16":  # one of the two runs also turns the visual-token position embedding and the pointer on
        args += ["--token-pos-embed", "--box-pointer"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and all(np.isfinite(r["loss"]) for r in log)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json"):
        assert (out / "model" / name).is_file()
    saved = json.loads((out / "model" / "train_config.json").read_text())
    assert saved["precision"] == precision and TrainConfig.from_dict(saved).box_l1_weight == 10.0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["token_pos_embed"] is (precision == "bf16") and config["box_pointer"] is (precision == "bf16")
    # re-running with more instruct steps resumes at step 4 instead of starting over
    result = CliRunner().invoke(main, args[:5] + ["4"] + args[6:])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps.count(4) == 1
    walls = [json.loads(line)["wall_s"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert walls == sorted(walls) and walls[0] > 0  # the wall clock carries on across the resume


def test_model_card_summarises_the_train_log():
    from rsvlm_edge.training.model_card import train_log_summary

    rows = [{"stage": "align", "step": s, "sec": 0.5, "lm_loss": 2.0} for s in (10, 20)]
    rows += [{"stage": "instruct", "step": s, "sec": 1.0, "lm_loss": 1.0} for s in (30, 40, 50)]
    lines = train_log_summary(rows, log_every=10)
    assert lines[0].startswith("- align: 20 steps, 0.50 s per step")
    assert lines[1].startswith("- instruct: 30 steps, 1.00 s per step") and "final loss 1.000" in lines[1]
    rows[-1]["wall_s"] = 5400.0
    assert train_log_summary(rows, log_every=10)[-1].endswith("summed over resumes): 90 min")
    rows[-2].update(pointer_acc=0.5, box_l1=0.02)
    rows[-1].update(pointer_acc=1.0, box_l1=0.04)
    assert "patch accuracy 0.750, box L1 0.0300" in train_log_summary(rows, log_every=10)[2]


def test_native_bf16_comes_from_the_cpu_flags(tmp_path):
    from rsvlm_edge.training.train import cpu_flags, cpu_has_fast_bf16

    assert cpu_has_fast_bf16({"avx512f", "avx512_bf16"}) and cpu_has_fast_bf16({"amx_bf16", "amx_tile"})
    assert not cpu_has_fast_bf16({"avx512f", "avx512bw", "avx512_vnni"})  # oneDNN would emulate bf16 here
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) is None
