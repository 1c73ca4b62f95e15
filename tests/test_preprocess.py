"""rsvlm_edge.preprocess: per-sensor scaling, band adaptation, nodata handling, resizing and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rsvlm_edge.preprocess import (
    L1C_CIRRUS_INDEX,
    MS_BANDS,
    PreprocessError,
    guess_sensor,
    prepare_for_model,
    prepare_image,
    to_single_band,
)


def _same_size(array: np.ndarray, sensor: str, **kwargs) -> np.ndarray:
    """Prepare at the input's own (square) size: no resampling, so values can be checked exactly."""
    return prepare_image(array, sensor, array.shape[0], **kwargs)


# --------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("sensor,array", [
    ("rgb", np.zeros((30, 50, 3), np.uint8)),
    ("rgb", np.zeros((30, 50, 1), np.uint8)),
    ("sar", np.full((40, 20, 2), -12.0, np.float32)),
    ("sar", np.full((40, 20), -12.0, np.float32)),
    ("ir", np.zeros((25, 25, 1), np.uint16)),
    ("ir", np.zeros((25, 25, 3), np.uint8)),
    ("ms", np.zeros((20, 20, 12), np.uint16)),
    ("ms", np.zeros((20, 20, 13), np.uint16)),
])
def test_output_shape_dtype(sensor, array):
    out = prepare_image(array, sensor, 32)
    channels = {"rgb": 3, "sar": 2, "ir": 1, "ms": 12}[sensor]
    assert out.shape == (channels, 32, 32) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_deterministic_and_input_untouched():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 4000, (300, 200, 12), dtype=np.uint16)
    copy = array.copy()
    a, b = prepare_image(array, "ms", 64), prepare_image(array, "ms", 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(array, copy)


def test_resize_not_aspect_preserving_and_constant_stays_constant():
    out = prepare_image(np.full((10, 90, 3), 51, np.uint8), "rgb", 16)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out, 51 / 255 * 2 - 1, atol=1e-6)


# --------------------------------------------------------------------------------------------------- rgb


def test_rgb_scaling():
    np.testing.assert_allclose(_same_size(np.full((4, 4, 3), 255, np.uint8), "rgb"), 1.0)
    np.testing.assert_allclose(_same_size(np.zeros((4, 4, 3), np.uint8), "rgb"), -1.0)
    full = np.full((4, 4, 3), 65535, np.uint16)
    full[0, 0] = 0
    out = _same_size(full, "rgb")
    assert out[0, 0, 0] == -1.0 and out[0, 1, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(_same_size(np.full((4, 4, 3), 0.25, np.float32), "rgb"), -0.5)
    np.testing.assert_allclose(_same_size(np.full((4, 4, 3), 7.0, np.float32), "rgb"), 7 / 255 * 2 - 1, atol=1e-6)


def test_rgb_12bit_uses_percentile():
    ramp = np.linspace(0, 4000, 40 * 40 * 3).reshape(40, 40, 3).astype(np.uint16)
    out = _same_size(ramp, "rgb")
    assert out.max() == pytest.approx(1.0)  # the top 0.5 % saturate
    assert out.min() == pytest.approx(-1.0)
    assert 0.0 < np.mean(out > 0.99) < 0.02
    # 16-bit data proper (max >= 4096) is divided by 65535 instead
    out16 = _same_size(ramp * 16, "rgb")
    assert out16.max() == pytest.approx(64000 / 65535 * 2 - 1, abs=1e-4)


def test_rgb_grey_repeated():
    out = _same_size(np.full((4, 4, 1), 255, np.uint8), "rgb")
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize("bands,hint", [(5, ""), (12, "--sensor ms"), (2, "--sensor sar"), (13, "--sensor ms")])
def test_rgb_wrong_band_count_message(bands, hint):
    with pytest.raises(PreprocessError) as info:
        prepare_image(np.zeros((8, 8, bands), np.uint8), "rgb", 8)
    message = str(info.value)
    assert f"sensor 'rgb' expects 3 bands, the image has {bands}" in message
    assert hint in message


# --------------------------------------------------------------------------------------------------- sar


def test_sar_db_window():
    db = np.array([[-40.0, -30.0], [-10.0, 10.0]], np.float32)[:, :, None].repeat(2, axis=2)
    out = _same_size(db, "sar")
    np.testing.assert_allclose(out[0], [[-1.0, -1.0], [0.0, 1.0]], atol=1e-6)


def test_sar_linear_converted_to_db():
    linear = np.array([[0.1, 1.0], [0.001, 0.0]], np.float32)[:, :, None]
    out = _same_size(linear, "sar")
    assert out.shape == (2, 2, 2)
    np.testing.assert_array_equal(out[0], out[1])  # 1 band duplicated
    # 0.1 -> -10 dB -> 0; 1.0 -> 0 dB -> 0.5; 0.001 -> -30 dB -> -1; 0 -> 1e-6 -> -60 dB -> -1
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [-1.0, -1.0]], atol=1e-5)
    uint16 = np.array([[10, 1]], np.uint16).reshape(1, 2, 1).repeat(2, axis=0)
    np.testing.assert_allclose(_same_size(uint16, "sar")[0, 0], [1.0, 0.5], atol=1e-6)


def test_sar_uint8_display_product_and_grey_rgb():
    grey = np.array([[0, 255], [51, 102]], np.uint8)
    out = _same_size(np.dstack([grey] * 3), "sar")  # grey saved as RGB is accepted
    np.testing.assert_allclose(out[0], grey / 255 * 2 - 1, atol=1e-6)
    with pytest.raises(PreprocessError, match="sensor 'sar' expects 2 bands"):
        prepare_image(np.random.default_rng(1).integers(0, 255, (4, 4, 3), dtype=np.uint8), "sar", 4)


# --------------------------------------------------------------------------------------------------- ir


def test_ir_uint8_and_three_channels():
    np.testing.assert_allclose(_same_size(np.full((4, 4, 1), 255, np.uint8), "ir"), 1.0)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 60, 90
    out = _same_size(rgb, "ir")
    assert out.shape == (1, 4, 4)
    np.testing.assert_allclose(out, 60 / 255 * 2 - 1, atol=1e-6)
    single = to_single_band(rgb)
    assert single.shape == (4, 4, 1) and single.dtype == np.uint8 and (single == 60).all()
    grey = np.dstack([np.arange(16, dtype=np.uint8).reshape(4, 4)] * 3)
    np.testing.assert_array_equal(to_single_band(grey)[:, :, 0], grey[:, :, 0])


def test_ir_uint16_percentile_stretch_ignores_nodata():
    rng = np.random.default_rng(2)
    array = rng.integers(20000, 30000, (50, 50, 1), dtype=np.uint16)
    array[:10] = 0  # nodata strip
    out = _same_size(array, "ir", nodata=0)
    assert (out[0, :10] == 0).all()
    valid = out[0, 10:]
    assert valid.min() == -1.0 and valid.max() == 1.0
    assert 0.005 < np.mean(valid == 1.0) < 0.02
    # without nodata the zeros drag the 1 % percentile down and compress the valid range
    plain = _same_size(array, "ir")
    assert plain[0, 10:].std() < valid.std()


# --------------------------------------------------------------------------------------------------- ms


def test_ms_scaling_and_band_order():
    assert len(MS_BANDS) == 12 and MS_BANDS[8] == "B8A"
    array = np.full((4, 4, 12), 3000, np.uint16)
    array[..., 0] = 10000
    array[..., 1] = 20000  # beyond 1.5 reflectance: clipped
    out = _same_size(array, "ms")
    np.testing.assert_allclose(out[2:], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0], (1.0 - 0.3) / 0.3, atol=1e-5)
    np.testing.assert_allclose(out[1], (1.5 - 0.3) / 0.3, atol=1e-5)
    np.testing.assert_allclose(_same_size(np.full((4, 4, 12), 0.3, np.float32), "ms"), 0.0, atol=1e-6)


def test_ms_13_bands_drop_cirrus():
    array = np.full((4, 4, 13), 3000, np.uint16)
    array[..., L1C_CIRRUS_INDEX] = 9999
    out = _same_size(array, "ms")
    assert out.shape == (12, 4, 4)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


@pytest.mark.parametrize("bands", [4, 5, 11, 14])
def test_ms_wrong_band_count(bands):
    with pytest.raises(PreprocessError, match=f"sensor 'ms' expects 12 .* the image has {bands}"):
        prepare_image(np.zeros((4, 4, bands), np.uint16), "ms", 4)


# --------------------------------------------------------------------------------------------------- invalid pixels


def test_nan_and_nodata_set_to_zero():
    db = np.full((6, 6, 2), -20.0, np.float32)
    db[0, 0] = np.nan
    db[1, 1, 0] = -9999.0
    db[2, 2, 1] = np.inf
    out = _same_size(db, "sar", nodata=-9999.0)
    assert np.isfinite(out).all()
    assert out[0, 0, 0] == 0 and out[1, 0, 0] == 0 and out[0, 1, 1] == 0 and out[1, 2, 2] == 0
    assert out[1, 1, 1] == pytest.approx(-0.5)  # only band 0 was nodata at (1, 1)
    # the median fill keeps the resize from smearing nodata values into valid pixels
    small = prepare_image(db, "sar", 3, nodata=-9999.0)
    assert small.min() >= -0.5 - 1e-6


def test_all_invalid_is_an_error():
    with pytest.raises(PreprocessError, match="no valid pixels"):
        prepare_image(np.full((4, 4, 2), np.nan, np.float32), "sar", 4)
    with pytest.raises(PreprocessError, match="no valid pixels"):
        prepare_image(np.zeros((4, 4, 3), np.uint8), "rgb", 4, nodata=0)


def test_nan_nodata_value_and_integer_nodata_on_float():
    array = np.full((4, 4, 1), 0.5, np.float32)
    array[0, 0] = np.nan
    out = _same_size(array, "ir", nodata=float("nan"))
    assert out[0, 0, 0] == 0 and np.isfinite(out).all()


# --------------------------------------------------------------------------------------------------- misc


def test_guess_sensor():
    assert guess_sensor(np.zeros((4, 4, 3), np.uint8)) == "rgb"
    assert guess_sensor(np.zeros((4, 4, 2), np.float32)) == "sar"
    assert guess_sensor(np.zeros((4, 4, 1), np.uint8)) == "ir"
    assert guess_sensor(np.zeros((4, 4), np.uint16)) == "ir"
    assert guess_sensor(np.full((4, 4, 1), -12.0, np.float32)) == "sar"
    assert guess_sensor(np.full((4, 4, 1), 0.2, np.float32)) == "ir"
    assert guess_sensor(np.zeros((4, 4, 12), np.uint16)) == "ms"
    assert guess_sensor(np.zeros((4, 4, 4), np.uint16)) == "ms"


def test_prepare_for_model_returns_sensor():
    pixels, sensor = prepare_for_model(np.zeros((8, 8, 2), np.float32) - 10, None, 16)
    assert sensor == "sar" and pixels.shape == (2, 16, 16)
    pixels, sensor = prepare_for_model(np.zeros((8, 8, 3), np.uint8), "rgb", 16)
    assert sensor == "rgb"


def test_bad_arguments():
    with pytest.raises(PreprocessError, match="unknown sensor"):
        prepare_image(np.zeros((4, 4, 3), np.uint8), "lidar", 4)
    with pytest.raises(PreprocessError, match="size"):
        prepare_image(np.zeros((4, 4, 3), np.uint8), "rgb", 0)
    with pytest.raises(PreprocessError, match="HxWxC"):
        prepare_image(np.zeros((4,), np.uint8), "rgb", 4)
    with pytest.raises(PreprocessError, match="empty"):
        prepare_image(np.zeros((0, 4, 3), np.uint8), "rgb", 4)
    assert issubclass(PreprocessError, ValueError)


_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.float32])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), sensor=st.sampled_from(["rgb", "sar", "ir", "ms"]), dtype=_DTYPES,
       size=st.integers(1, 12))
def test_fuzz_outputs_finite_and_bounded(data, sensor, dtype, size):
    bands = {"rgb": 3, "sar": 2, "ir": 1, "ms": 12}[sensor]
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    elements = st.floats(-1e6, 1e6, width=32) if dtype == np.float32 else None
    array = data.draw(hnp.arrays(dtype, (h, w, bands), elements=elements))
    out = prepare_image(array, sensor, size)
    assert out.shape == (bands, size, size) and out.dtype == np.float32
    assert np.isfinite(out).all()
    high = 4.0 if sensor == "ms" else 1.0
    assert out.min() >= -1.0 - 1e-5 and out.max() <= high + 1e-5


def test_real_tiles_prepare(data_root):
    from rsvlm_edge.imageio import read_band_stack, read_image

    s2 = sorted((data_root / "bigearthnet").glob("*S2*/*"))
    if not s2:
        pytest.skip("no BigEarthNet S2 patch in the data folder")
    folder = s2[0]
    stack = read_band_stack([next(folder.glob(f"*_{band}.tif")) for band in MS_BANDS])
    out = prepare_image(stack, "ms", 32)
    assert out.shape == (12, 32, 32) and -1.0 <= out.min() and out.max() <= 4.0
    s1 = sorted((data_root / "bigearthnet").glob("*S1*/*"))[0]
    vv = read_image(next(s1.glob("*_VV.tif")))
    assert guess_sensor(vv) == "sar"
    assert prepare_image(vv, "sar", 32).shape == (2, 32, 32)


# --------------------------------------------------------------------------------------------------- SigLIP modes
# Converted RSUniVLM models: uint8 RGB -> Pillow bicubic in uint8 -> /255 -> (x - 0.5) / 0.5, as the reference's
# SigLipImageProcessor (siglip_encoder.py) computes it with transformers' image transforms.


def _rsunivlm_reference(array: np.ndarray, size: int, pad: bool) -> np.ndarray:
    """RSUniVLM's SigLipImageProcessor.preprocess (and process_images' 'pad' branch), built from transformers'
    own resize / rescale / normalize as siglip_encoder.py chains them."""
    pytest.importorskip("transformers")
    from PIL import Image
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    image = Image.fromarray(array).convert("RGB")
    if pad:  # llava/mm_utils.py expand2square with tuple(int(x * 255) for x in image_mean)
        w, h = image.size
        if w > h:
            canvas = Image.new(image.mode, (w, w), (127, 127, 127))
            canvas.paste(image, (0, (w - h) // 2))
            image = canvas
        elif h > w:
            canvas = Image.new(image.mode, (h, h), (127, 127, 127))
            canvas.paste(image, ((h - w) // 2, 0))
            image = canvas
    first = ChannelDimension.FIRST
    x = resize(np.array(image), size=(size, size), resample=PILImageResampling.BICUBIC, data_format=first)
    x = rescale(x, scale=1 / 255, data_format=first)
    return normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), data_format=first)


@pytest.mark.parametrize("mode", ["siglip-square", "siglip-pad"])
@pytest.mark.parametrize("shape", [(384, 384, 3), (300, 517, 3), (517, 301, 3), (64, 40, 3), (999, 1001, 3), (50, 70)])
def test_siglip_modes_equal_rsunivlm_reference(mode, shape):
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = prepare_image(array, "rgb", 384, mode=mode)
    ref = _rsunivlm_reference(array, 384, pad=mode == "siglip-pad")
    assert ours.shape == ref.shape == (3, 384, 384) and ours.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_siglip_square_without_resize_is_the_formula():
    array = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = prepare_image(array, "rgb", 24, mode="siglip-square")
    expected = ((array.astype(np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_siglip_square_rounds_to_uint8_before_scaling():
    """Bicubic overshoot at a sharp edge is clipped to 0..255 by the uint8 resize, so values stay in [-1, 1] and
    every output is k/255 mapped to [-1, 1] for an integer k."""
    array = np.zeros((40, 40, 3), np.uint8)
    array[:, 20:] = 255
    out = prepare_image(array, "rgb", 17, mode="siglip-square")
    k = (out.astype(np.float64) * 0.5 + 0.5) * 255
    np.testing.assert_allclose(k, np.rint(k), atol=1e-4)
    assert out.min() == -1.0 and out.max() == 1.0


def test_siglip_pad_centres_on_grey_with_llava_offsets():
    array = np.full((51, 100, 3), 200, np.uint8)  # wider than high: pasted at y = (100 - 51) // 2 = 24
    out = prepare_image(array, "rgb", 100, mode="siglip-pad")
    grey = (np.float32(127 / 255) - np.float32(0.5)) / np.float32(0.5)
    white = (np.float32(200 / 255) - np.float32(0.5)) / np.float32(0.5)
    rows = out[0, :, 50]
    assert (rows[:24] == grey).all() and (rows[24:75] == white).all() and (rows[75:] == grey).all()
    tall = prepare_image(np.full((100, 51, 3), 200, np.uint8), "rgb", 100, mode="siglip-pad")
    np.testing.assert_array_equal(tall, out.transpose(0, 2, 1))


def test_siglip_grey_image_becomes_rgb():
    grey = np.random.default_rng(1).integers(0, 256, (30, 45), dtype=np.uint8)
    out = prepare_image(grey, "rgb", 32, mode="siglip-square")
    rgb = prepare_image(np.repeat(grey[:, :, None], 3, axis=2), "rgb", 32, mode="siglip-square")
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("array,words", [
    (np.zeros((8, 8, 3), np.uint16), "uint16"),
    (np.zeros((8, 8, 3), np.float32), "float32"),
    (np.zeros((8, 8, 2), np.uint8), "2 bands"),
    (np.zeros((8, 8, 12), np.uint8), "12 bands"),
    (np.zeros((0, 8, 3), np.uint8), "non-empty"),
])
def test_siglip_refuses_what_the_model_was_not_trained_on(array, words):
    with pytest.raises(PreprocessError, match=words) as info:
        prepare_image(array, "rgb", 16, mode="siglip-square", source="tile.tif")
    assert "tile.tif" in str(info.value) or words == "non-empty"


def test_siglip_modes_read_rgb_only():
    with pytest.raises(PreprocessError, match="8-bit RGB"):
        prepare_image(np.zeros((8, 8, 2), np.uint8), "sar", 16, mode="siglip-square")
    assert guess_sensor(np.zeros((8, 8), np.uint16), "siglip-pad") == "rgb"
    with pytest.raises(PreprocessError, match="unknown image_preprocess"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), "rgb", 16, mode="bilinear")


def test_read_tile_dispatches_on_image_preprocess(tmp_path):
    from PIL import Image

    from rsvlm_edge.pipeline import read_tile

    array = np.random.default_rng(2).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "t.png")
    tile = read_tile([tmp_path / "t.png"], None, 40, {"rgb": 3}, "siglip-pad")
    assert tile.sensor == "rgb" and tile.sizes == [(47, 33)]
    np.testing.assert_array_equal(tile.pixels[0], prepare_image(array, "rgb", 40, mode="siglip-pad"))
    Image.fromarray(array[:, :, 0].astype(np.uint16) * 200).save(tmp_path / "deep.png")
    with pytest.raises(PreprocessError, match="deep.png.*uint16"):
        read_tile([tmp_path / "deep.png"], None, 40, {"rgb": 3}, "siglip-square")
