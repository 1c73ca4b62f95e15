"""The ort backend creates the per-tile sessions in the background when it opens, so the first tile skips it."""

from __future__ import annotations

import numpy as np
import pytest

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt-preload"))
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("eng-preload") / "fp32")


def test_tile_sessions_are_open_before_the_first_tile(engine_dir):
    backend = OrtBackend.from_dir(engine_dir, threads=1, verify=False)
    assert backend._preload is not None
    backend._preload.join()
    assert {"vision_encoder", "router", "vision_stem_rgb"} <= set(backend._sessions)
    session = backend._sessions["vision_encoder"]
    pixels = np.zeros((1, 3, backend.config.image_size, backend.config.image_size), np.float32)
    backend.encode_images(pixels, "rgb")
    assert backend._sessions["vision_encoder"] is session  # the call used the preloaded session
    backend.close()


def test_without_preload_sessions_open_on_first_use(engine_dir):
    backend = OrtBackend.from_dir(engine_dir, threads=1, verify=False, preload=False)
    assert backend._preload is None and "vision_encoder" not in backend._sessions
    pixels = np.zeros((1, 3, backend.config.image_size, backend.config.image_size), np.float32)
    backend.encode_images(pixels, "rgb")
    assert "vision_encoder" in backend._sessions
    backend.close()
