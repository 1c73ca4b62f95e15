"""End-to-end CLI on a random-init tiny model with the torch backend: every task prints parsed output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsvlm_edge.cli import main
from rsvlm_edge.tasks import TAGS

AID_TILE = "aid/Airport/airport_1.jpg"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.mark.parametrize("tag", TAGS)
def test_infer_every_task_prints_json(tiny_model_dir, sample_png, tag):
    task = tag.strip("[]").lower()
    images = [sample_png, sample_png] if tag == "[CCD]" else [sample_png]
    res = run("infer", tiny_model_dir, *images, "--task", task, "--backend", "torch", "--json",
              "--max-new-tokens", "12")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["task"] == tag
    assert out["instruction"].startswith(tag)
    assert out["expert"] == {"[SEG]": "pixel", "[VG]": "region", "[REF]": "region"}.get(tag, "image")
    assert out["expert_source"] == "tag"
    assert 0 < out["generated_tokens"] <= 12
    assert out["timings_ms"]["ttft_ms"] > 0
    # A random model rarely produces a parseable structure: then the error is reported, never a crash.
    if tag in ("[VG]", "[DET]", "[OBB]", "[SEG]", "[CLS]"):
        assert ("parse_error" in out) or any(k in out for k in ("boxes_px", "detections", "oriented_detections",
                                                                "mask_labels", "labels"))


def test_infer_real_tile_text_output_and_router(tiny_model_dir, data_root):
    res = run("infer", tiny_model_dir, data_root / AID_TILE, "--prompt", "Describe the image.", "--backend", "torch",
              "--max-new-tokens", "8", "--verbose", "--no-stream")
    assert res.exit_code == 0, res.output
    assert "(from router)" in res.output
    assert "first token" in res.output


def test_infer_folder_of_tiles(tiny_model_dir, sample_png):
    folder = sample_png.parent
    res = run("infer", tiny_model_dir, folder, "--task", "cls", "--backend", "torch", "--json",
              "--max-new-tokens", "4", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == len(list(folder.glob("*.png")))
    # stderr is not a terminal here: no progress bar, and the summary line still gives the rate.
    summary = res.stderr.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"infer: {len(lines)} answered, 0 failed of {len(lines)} tiles")
    assert summary[0].endswith("tiles/s)")


def test_infer_errors_are_clear(tiny_model_dir, sample_png, tmp_path):
    res = run("infer", tiny_model_dir, tmp_path / "missing.png", "--task", "cap", "--backend", "torch")
    assert res.exit_code == 2 and "no such image" in res.output
    res = run("infer", tiny_model_dir, sample_png, "--task", "ccd", "--backend", "torch")
    assert res.exit_code == 2 and "compares two images" in res.output
    res = run("infer", tiny_model_dir, sample_png, "--backend", "torch")
    assert res.exit_code == 2 and "--task" in res.output
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = run("infer", tiny_model_dir, bad, "--task", "cap", "--backend", "torch")
    assert res.exit_code == 2 and "corrupt.png" in res.output
    res = run("infer", tmp_path / "nomodel", sample_png, "--task", "cap", "--backend", "torch")
    assert res.exit_code == 2 and "not found" in res.output
    res = run("infer", tiny_model_dir, sample_png, "--task", "cap", "--sensor", "sar", "--backend", "torch")
    assert res.exit_code == 2 and "band" in res.output


def test_info_prints_parameter_counts():
    res = run("info", "--config", "rsunivlm-1b")
    assert res.exit_code == 0, res.output
    assert "730 visual tokens" in res.output
    # RSUniVLM's 1,657,325,600 stored tensors less SigLIP's unused post_layernorm (2 x 1152)
    assert "1,657,323,296 / 1,029,750,560" in res.output and "1.657 B stored" in res.output


def test_help_teaches():
    res = run("infer", "--help")
    assert res.exit_code == 0
    assert "Examples" in res.output and "--expert-budget" in res.output


def test_infer_verbose_reports_the_automatic_thread_count(data_root, monkeypatch):
    demo = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
    if not (demo / "manifest.json").exists():
        pytest.skip("demo model not built")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    res = run("infer", demo, data_root / AID_TILE, "--task", "cls", "-v", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    assert "threads: 1 (auto: small decoder" in res.stderr
