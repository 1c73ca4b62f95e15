"""The sensor guess says what it went by, tells grey IR and SAR pictures saved as RGB from colour photos, and
`infer -v` prints it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.imageio import read_image
from rsvlm_edge.preprocess import explain_sensor

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"


def test_each_guess_has_a_reason():
    assert explain_sensor(np.zeros((4, 4, 3), np.uint8)) == ("rgb", "3 bands")  # flat: nothing says grey
    assert explain_sensor(np.zeros((4, 4, 2), np.float32)) == ("sar", "2 bands")
    assert explain_sensor(np.full((4, 4, 1), -12.0, np.float32))[0] == "sar"
    assert explain_sensor(np.zeros((4, 4, 12), np.uint16)) == ("ms", "12 bands")
    assert explain_sensor(np.zeros((4, 4, 3), np.uint8), "siglip-pad")[0] == "rgb"


def test_grey_pictures_in_three_channels_are_ir_when_smooth_and_sar_when_speckled():
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.repeat((80 + x + y).astype(np.uint8)[:, :, None], 3, axis=2)
    sensor, reason = explain_sensor(smooth)
    assert sensor == "ir" and "grey" in reason
    speckle = np.random.default_rng(0).gamma(1.0, 40.0, (64, 64)).clip(0, 255).astype(np.uint8)
    assert explain_sensor(np.repeat(speckle[:, :, None], 3, axis=2))[0] == "sar"
    colour = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert explain_sensor(colour)[0] == "rgb"


def test_real_sar_and_infrared_pictures(data_root):
    sar = sorted((data_root / "hrsid" / "data").glob("P*[0-9].png"))
    assert sar and all(explain_sensor(read_image(p))[0] == "sar" for p in sar)
    ir = sorted((data_root / "sirst" / "images").rglob("*.png"))[:60]
    guesses = [explain_sensor(read_image(p))[0] for p in ir]
    assert "sar" not in guesses and guesses.count("ir") > len(guesses) // 2  # a few are false-colour pictures
    rgb = sorted((data_root / "aid").rglob("*.jpg"))[::300]
    assert rgb and all(explain_sensor(read_image(p))[0] == "rgb" for p in rgb)


@pytest.mark.parametrize("sensor, expect", [(None, "sensor: ir (guessed: 3 channels of one grey picture"),
                                            ("sar", "sensor: sar (stated)")])
def test_infer_verbose_prints_the_sensor_and_why(tmp_path, sensor, expect):
    from PIL import Image

    from rsvlm_edge.cli import main

    y, x = np.mgrid[0:64, 0:64]
    path = tmp_path / "ir.png"
    Image.fromarray(np.repeat((80 + x + y).astype(np.uint8)[:, :, None], 3, axis=2)).save(path)
    args = ["infer", str(DEMO), str(path), "--task", "cls", "--max-new-tokens", "2", "--threads", "1", "-v"]
    result = CliRunner().invoke(main, args + (["--sensor", sensor] if sensor else []))
    assert result.exit_code == 0, result.output
    assert expect in result.output
