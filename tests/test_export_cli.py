"""`rsvlm-edge export`: usage, progress, partial exports, atomic output directory, random-init presets."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rsvlm_edge.cli import main
from rsvlm_edge.export.testing import make_checkpoint
from rsvlm_edge.manifest import Manifest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-cli"))


def run(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


def test_help_teaches():
    res = run("--help")
    assert res.exit_code == 0
    for text in ("[CHECKPOINT] OUT_DIR", "decoder_trunk.bin", "--random-init", "--precision", "--components", "--check",
                 "--opset", "Examples"):
        assert text in res.output


def test_partial_export_with_checks(checkpoint, tmp_path):
    out = tmp_path / "text-only"
    res = run(checkpoint, out, "--components", "embedding,router", "--components", "stems")
    assert res.exit_code == 0, res.output
    assert "[1/6] vision_stem_rgb: tracing" in res.output and "router: checks ok" in res.output
    assert "all passed" in res.output
    manifest = Manifest.load(out)
    assert set(manifest.components) == {"embedding", "router", "vision_stem_rgb", "vision_stem_sar", "vision_stem_ir",
                                        "vision_stem_ms"}
    assert manifest.extra["export"]["checks"]["router"]["parity"]["max_abs_diff"] <= 1e-4
    assert manifest.extra["export"]["source"] == str(checkpoint)
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_failed_export_leaves_no_out_dir(checkpoint, tmp_path, monkeypatch):
    import rsvlm_edge.export.exporter as exporter

    monkeypatch.setattr(exporter, "FP32_TOLERANCE", -1.0)  # every parity check fails
    out = tmp_path / "never"
    res = run(checkpoint, out, "--components", "router")
    assert res.exit_code == 2 and "export check failed" in res.output and "router" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_dir_needs_overwrite(checkpoint, tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    res = run(checkpoint, out, "--components", "router", "--no-check")
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "old.txt").exists()
    res = run(checkpoint, out, "--components", "router", "--no-check", "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "router.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_random_init_preset(tmp_path):
    out = tmp_path / "random"
    res = run("--config", "tiny", "--random-init", out, "--components", "embedding", "--no-check", "--seed", "3")
    assert res.exit_code == 0, res.output
    data = json.loads((out / "manifest.json").read_text())
    assert data["export"]["source"] == "random-init tiny seed 3"
    assert (out / "tokenizer.json").is_file() and data["tokenizer"]["bytes"] == (out / "tokenizer.json").stat().st_size


@pytest.mark.parametrize("args, message", [
    ((), "give CHECKPOINT OUT_DIR"),
    (("--random-init", "out"), "--random-init needs --config"),
    (("--config", "tiny", "ckpt", "out"), "--config only applies with --random-init"),
    (("ckpt", "out", "--components", "lm"), "unknown component(s) lm"),
    (("ckpt", "out", "--fp16-lm-head"), "only applies with --precision fp16"),
    (("ckpt", "out", "--trt", "9.0"), "--trt takes versions"),
])
def test_usage_errors(args, message):
    res = run(*args)
    assert res.exit_code == 2 and message in res.output


def test_missing_checkpoint(tmp_path):
    res = run(tmp_path / "nope", tmp_path / "out")
    assert res.exit_code == 2 and "checkpoint directory not found" in res.output
