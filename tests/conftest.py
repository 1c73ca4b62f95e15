"""Shared fixtures: a random-init tiny model dir and its FP32 export (each built once per session) and paths to the real
sample data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSVLM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real sample data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """config.json + random-init model.safetensors + tokenizer.json for the tiny config."""
    from rsvlm_edge.config import tiny_config
    from rsvlm_edge.training.bootstrap import init_model_dir

    out = tmp_path_factory.mktemp("tiny-random")
    return init_model_dir(out, tiny_config(), seed=0, n_synthetic=200)


@pytest.fixture(scope="session")
def fp32_export(tmp_path_factory) -> Path:
    """The default synthetic checkpoint (``rsvlm_edge.export.testing.make_checkpoint``) exported to FP32 ONNX. Tests
    read it or build from it into their own dirs; none writes into it."""
    from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint

    return export_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ckpt-shared")),
                             tmp_path_factory.mktemp("eng-shared") / "fp32")


@pytest.fixture(scope="session")
def sample_png(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("tiles") / "tile.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 120, 3), dtype=np.uint8)).save(path)
    return path
