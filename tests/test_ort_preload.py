"""The ort backend creates the per-tile sessions in the background when it opens, so the first tile skips it."""

from __future__ import annotations

import numpy as np

from rsvlm_edge.backends.ort_backend import OrtBackend


def test_tile_sessions_are_open_before_the_first_tile(fp32_export):
    backend = OrtBackend.from_dir(fp32_export, threads=1, verify=False)
    assert backend._preload is not None
    backend._preload.join()
    assert {"vision_encoder", "router", "vision_stem_rgb"} <= set(backend._sessions)
    session = backend._sessions["vision_encoder"]
    pixels = np.zeros((1, 3, backend.config.image_size, backend.config.image_size), np.float32)
    backend.encode_images(pixels, "rgb")
    assert backend._sessions["vision_encoder"] is session  # the call used the preloaded session
    backend.close()


def test_without_preload_sessions_open_on_first_use(fp32_export):
    backend = OrtBackend.from_dir(fp32_export, threads=1, verify=False, preload=False)
    assert backend._preload is None and "vision_encoder" not in backend._sessions
    pixels = np.zeros((1, 3, backend.config.image_size, backend.config.image_size), np.float32)
    backend.encode_images(pixels, "rgb")
    assert "vision_encoder" in backend._sessions
    backend.close()
