"""rsvlm_edge.imageio: native-dtype reading through Pillow (PNG/JPEG/GIF) and rasterio/GDAL (TIFF, JPEG 2000,
16-bit colour PNG), typed errors. The files are written by the same maintained libraries (GDAL's GTiff, PNG and
JPEG 2000 drivers, Pillow), so every layout the reader claims is exercised. Hostile files: test_bad_inputs_images.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from rsvlm_edge.imageio import ImageError, read_band_stack, read_image, read_image_with_meta


def write_gdal(path: Path, array: np.ndarray, driver: str = "GTiff", **options) -> Path:
    """``H x W x C`` (or ``H x W``) array -> file through GDAL; ``options`` are the driver's creation options."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver=driver, width=a.shape[1], height=a.shape[0], count=a.shape[2],
                           dtype=a.dtype, **options) as ds:
            ds.write(a.transpose(2, 0, 1))
    return path


def _test_array(dtype: str, bands: int, height: int = 37, width: int = 45, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal((height, width, bands)) * 1000).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, (height, width, bands), dtype=dt, endpoint=True)


# --------------------------------------------------------------------------------------------------- TIFF layouts

CASES = [
    # dtype, bands, creation options
    ("uint16", 12, {}),
    ("uint16", 12, {"endianness": "BIG", "blockysize": 5}),
    ("uint16", 5, {"interleave": "band", "compress": "deflate", "predictor": 2, "blockysize": 8}),
    ("uint16", 4, {"endianness": "BIG", "compress": "deflate", "predictor": 2, "tiled": True, "blockxsize": 16,
                   "blockysize": 16}),
    ("uint8", 6, {"interleave": "band", "compress": "packbits", "blockysize": 3}),
    ("uint8", 3, {"compress": "lzw", "predictor": 2, "tiled": True, "blockxsize": 32, "blockysize": 16}),
    ("int16", 2, {"compress": "zstd", "predictor": 2, "blockysize": 10}),
    ("int16", 3, {"endianness": "BIG", "interleave": "band", "tiled": True, "blockxsize": 16, "blockysize": 16}),
    ("float32", 2, {"blockysize": 7}),
    ("float32", 13, {"interleave": "band", "compress": "deflate", "tiled": True, "blockxsize": 16,
                     "blockysize": 32}),
    ("float32", 3, {"compress": "deflate", "predictor": 3, "blockysize": 6}),
    ("float32", 4, {"endianness": "BIG", "interleave": "band", "compress": "lzw", "predictor": 3, "tiled": True,
                    "blockxsize": 16, "blockysize": 16}),
    ("float64", 2, {"compress": "deflate", "predictor": 3, "tiled": True, "blockxsize": 48, "blockysize": 16}),
    ("float64", 1, {"compress": "lerc"}),
    ("int32", 3, {"interleave": "band", "compress": "deflate", "predictor": 2, "blockysize": 11}),
    ("uint32", 2, {"endianness": "BIG", "tiled": True, "blockxsize": 16, "blockysize": 16}),
    ("int8", 1, {"compress": "deflate", "blockysize": 4}),
    ("uint16", 3, {"bigtiff": "YES", "compress": "lzma"}),
]


@pytest.mark.parametrize("dtype,bands,options", CASES)
def test_tiff_layouts_roundtrip(tmp_path, dtype, bands, options):
    array = _test_array(dtype, bands)
    got, meta = read_image_with_meta(write_gdal(tmp_path / "x.tif", array, **options))
    assert got.dtype == array.dtype and got.dtype.isnative and got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)
    assert meta["format"] == "TIFF" and meta["reader"] == "rasterio" and meta["nodata"] is None
    assert (meta["bands"], meta["height"], meta["width"], meta["dtype"]) == (bands, 37, 45, dtype)
    assert meta["compression"] == options.get("compress")


def test_geotiff_nodata_crs_transform(tmp_path):
    array = _test_array("float32", 3)
    array[0, 0] = -9999.0
    transform = Affine(10.0, 0.0, 404400.0, 0.0, -10.0, 5342400.0)
    path = write_gdal(tmp_path / "geo.tif", array, compress="deflate", nodata=-9999.0, crs="EPSG:32633",
                      transform=transform, tiled=True, blockxsize=16, blockysize=16)
    got, meta = read_image_with_meta(path)
    np.testing.assert_array_equal(got, array)
    assert meta["nodata"] == -9999.0
    assert meta["crs"] == "EPSG:32633"
    assert meta["transform"] == tuple(transform)[:6]


@pytest.mark.parametrize("nodata", [0, 65535])
def test_integer_nodata(tmp_path, nodata):
    path = write_gdal(tmp_path / "nd.tif", np.zeros((4, 4), np.uint16), nodata=nodata)
    assert read_image_with_meta(path)[1]["nodata"] == nodata


def test_nan_nodata_and_no_georeference(tmp_path):
    path = write_gdal(tmp_path / "nan.tif", np.full((4, 4), np.nan, np.float32), nodata=float("nan"))
    meta = read_image_with_meta(path)[1]
    assert meta["nodata"] is not None and np.isnan(meta["nodata"])
    assert meta["crs"] is None and meta["transform"] is None


def test_tiff_alpha_dropped_but_undefined_extra_band_kept(tmp_path):
    rgba = _test_array("uint8", 4, seed=1)
    got = read_image(write_gdal(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES"))
    np.testing.assert_array_equal(got, rgba[:, :, :3])
    rgbn = _test_array("uint16", 4, seed=2)
    got = read_image(write_gdal(tmp_path / "rgbn.tif", rgbn, photometric="RGB"))
    np.testing.assert_array_equal(got, rgbn)


@pytest.mark.parametrize("compression", [None, "tiff_deflate", "tiff_adobe_deflate", "packbits", "tiff_lzw"])
@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "F"])
def test_pillow_written_tiffs(tmp_path, mode, compression):
    if mode in ("I;16", "F") and compression == "packbits":
        pytest.skip("Pillow writes PackBits for 8-bit modes only")
    rng = np.random.default_rng(3)
    if mode == "RGB":
        ramp = np.linspace(0, 255, 150 * 97 * 3).reshape(97, 150, 3)
        array = (ramp + rng.integers(0, 40, ramp.shape)).clip(0, 255).astype(np.uint8)
    elif mode == "L":
        array = rng.integers(0, 255, (97, 150), dtype=np.uint8)
    elif mode == "I;16":
        array = rng.integers(0, 65535, (97, 150), dtype=np.uint16)
    else:
        array = rng.standard_normal((97, 150)).astype(np.float32)
    path = tmp_path / "pil.tif"
    kwargs = {"compression": compression} if compression else {}
    Image.fromarray(array).save(path, **kwargs)
    got = read_image(path)
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array.reshape(got.shape))


def test_palette_one_bit_and_jpeg_tiffs(tmp_path):
    rgb = _test_array("uint8", 3, seed=4)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), np.asarray(pal.convert("RGB")))
    bits = rgb[:, :, 0] > 128
    Image.fromarray(bits).save(tmp_path / "b.tif")
    got = read_image(tmp_path / "b.tif")
    assert got.dtype == np.uint8 and got.shape == (37, 45, 1)
    np.testing.assert_array_equal(got[:, :, 0], bits.astype(np.uint8) * 255)  # as Pillow gives 1-bit PNGs
    Image.fromarray(rgb).save(tmp_path / "j.tif", compression="jpeg", quality=95)
    got, meta = read_image_with_meta(tmp_path / "j.tif")
    assert got.shape == (37, 45, 3) and got.dtype == np.uint8 and meta["compression"] == "jpeg"
    assert np.abs(got.astype(int) - rgb).mean() < 20  # lossy, but the same picture


def test_jpeg2000(tmp_path):
    array = _test_array("uint16", 3, seed=5)
    got, meta = read_image_with_meta(write_gdal(tmp_path / "x.jp2", array, driver="JP2OpenJPEG", quality=100,
                                                reversible="YES"))
    assert meta["format"] == "JPEG2000" and meta["reader"] == "rasterio"
    np.testing.assert_array_equal(got, array)


def test_real_bigearthnet_tiffs(data_root):
    paths = sorted((data_root / "bigearthnet").rglob("*.tif"))
    if not paths:
        pytest.skip("no BigEarthNet tifs in the data folder")
    for path in paths[::7]:
        got, meta = read_image_with_meta(path)
        np.testing.assert_array_equal(got[:, :, 0], np.asarray(Image.open(path)))
        assert meta["crs"] is not None and meta["transform"] is not None


# --------------------------------------------------------------------------------------------------- PNG / JPEG


def _save(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_pillow_modes_convert_consistently(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 255, (20, 30), dtype=np.uint8)])
    grey = rgb[:, :, 0]
    # RGBA -> RGB (alpha dropped, colours untouched)
    got = read_image(_save(tmp_path, Image.fromarray(rgba), "rgba.png"))
    np.testing.assert_array_equal(got, rgb)
    # LA -> L
    got = read_image(_save(tmp_path, Image.merge("LA", [Image.fromarray(grey)] * 2), "la.png"))
    assert got.shape == (20, 30, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, :, 0], grey)
    # L -> HxWx1
    got = read_image(_save(tmp_path, Image.fromarray(grey), "l.png"))
    np.testing.assert_array_equal(got[:, :, 0], grey)
    # palette -> RGB (PNG and GIF)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    for name in ("p.png", "p.gif"):
        got, meta = read_image_with_meta(_save(tmp_path, pal, name))
        assert got.shape == (20, 30, 3) and got.dtype == np.uint8 and meta["reader"] == "pillow"
        np.testing.assert_array_equal(got, np.asarray(pal.convert("RGB")))
    # 1-bit -> uint8 0/255
    got = read_image(_save(tmp_path, Image.fromarray(grey > 128), "bits.png"))
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 255}
    # 16-bit greyscale PNG stays uint16
    g16 = rng.integers(0, 65535, (20, 30), dtype=np.uint16)
    got, meta = read_image_with_meta(_save(tmp_path, Image.fromarray(g16), "g16.png"))
    assert got.dtype == np.uint16 and meta["format"] == "PNG"
    np.testing.assert_array_equal(got[:, :, 0], g16)
    # JPEG RGB and CMYK -> RGB uint8
    got, meta = read_image_with_meta(_save(tmp_path, Image.fromarray(rgb), "x.jpg", quality=95))
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8 and meta["format"] == "JPEG"
    got = read_image(_save(tmp_path, Image.fromarray(rgb).convert("CMYK"), "cmyk.jpg"))
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_png16_colour_stays_uint16(tmp_path, channels):
    """Pillow reduces 16-bit colour PNGs to 8 bits; they are read through GDAL's PNG driver instead."""
    array = np.random.default_rng(6).integers(0, 65535, (19, 23, channels), dtype=np.uint16)
    got, meta = read_image_with_meta(write_gdal(tmp_path / "c16.png", array, driver="PNG"))
    assert got.dtype == np.uint16 and meta["format"] == "PNG" and meta["reader"] == "rasterio"
    np.testing.assert_array_equal(got, array[:, :, : channels - 1] if channels in (2, 4) else array)
    # Pillow's 8-bit view of the same file is the high byte of each sample: two decoders agree
    high = np.asarray(Image.open(tmp_path / "c16.png"))
    np.testing.assert_array_equal(got[:, :, 0] >> 8, high[:, :, 0] if high.ndim == 3 else high)


# --------------------------------------------------------------------------------------------------- band stacks


def test_read_band_stack_resizes_to_largest(tmp_path):
    rng = np.random.default_rng(8)
    b10 = rng.integers(0, 10000, (12, 12), dtype=np.uint16)
    b20 = np.full((6, 6), 1234, dtype=np.uint16)
    b60 = rng.integers(0, 10000, (2, 2), dtype=np.uint16)
    paths = [write_gdal(tmp_path / f"b{i}.tif", b) for i, b in enumerate([b20, b10, b60])]
    stack = read_band_stack(paths)
    assert stack.shape == (12, 12, 3) and stack.dtype == np.uint16
    np.testing.assert_array_equal(stack[:, :, 1], b10)
    assert (stack[:, :, 0] == 1234).all()  # a constant band stays constant through bilinear resampling
    assert stack[:, :, 2].min() >= b60.min() and stack[:, :, 2].max() <= b60.max()
    with pytest.raises(ImageError):
        read_band_stack([])


def test_read_band_stack_mixed_dtypes(tmp_path):
    a = write_gdal(tmp_path / "a.tif", np.ones((4, 4), np.uint16))
    b = write_gdal(tmp_path / "b.tif", np.full((2, 2), 0.5, np.float32))
    stack = read_band_stack([a, b])
    assert stack.dtype == np.float32 and stack.shape == (4, 4, 2)
    np.testing.assert_allclose(stack[:, :, 1], 0.5)


# --------------------------------------------------------------------------------------------------- errors


def _assert_error(path: Path, fragment: str, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        read_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert fragment in message.lower(), message
    return info.value


def test_missing_and_empty_and_garbage(tmp_path):
    _assert_error(tmp_path / "nope.tif", "not found")
    _assert_error(tmp_path, "not a regular file")
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_error(tmp_path / "empty.png", "empty")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    _assert_error(tmp_path / "junk.png", "unrecognised")
    assert isinstance(ImageError("x", "y"), ValueError)


def test_oversize_refused_by_max_bytes(tmp_path):
    tif = write_gdal(tmp_path / "big.tif", np.zeros((30, 40, 2), np.uint16))
    error = _assert_error(tif, "too large", max_bytes=4000)
    assert "40x30 x 2 bands of uint16" in str(error) and "max_bytes" in str(error)
    png = _save(tmp_path, Image.fromarray(np.zeros((30, 40), np.uint8)), "big.png")
    _assert_error(png, "too large", max_bytes=2000)
    assert read_image(png, max_bytes=2400).shape == (30, 40, 1)  # 1200-byte array + Pillow's 1200-byte image


def test_mutated_files_raise_only_image_error(tmp_path):
    """Random byte flips and truncations of valid files: either the image reads or an ImageError comes out."""
    import random

    bases = [
        write_gdal(tmp_path / "a.tif", _test_array("uint16", 3, 20, 20), compress="deflate", predictor=2,
                   blockysize=5),
        write_gdal(tmp_path / "b.tif", _test_array("float32", 2, 20, 20), compress="packbits", tiled=True,
                   blockxsize=16, blockysize=16, endianness="BIG"),
        write_gdal(tmp_path / "c.tif", _test_array("float32", 2, 20, 20), compress="lzw", predictor=3,
                   interleave="band"),
        write_gdal(tmp_path / "d.png", _test_array("uint16", 3, 20, 20), driver="PNG"),
        _save(tmp_path, Image.fromarray(_test_array("uint8", 3, 20, 20)), "e.jpg"),
        _save(tmp_path, Image.fromarray(_test_array("uint16", 1, 20, 20)[:, :, 0]), "f.png"),
    ]
    rng = random.Random(0)
    for i in range(300):
        base = bases[i % len(bases)]
        data = bytearray(base.read_bytes())
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        path = tmp_path / f"m{base.suffix}"
        path.write_bytes(bytes(data))
        try:
            read_image(path, max_bytes=10**6)
        except ImageError:
            pass
