"""Hostile and broken image files: decompression bombs, lying headers, slow-to-decode PNGs, truncated, empty and
mislabelled files. Each must give one ImageError naming the file (or decode correctly), quickly, with memory bounded
by the decode cap (``max_bytes``). The files are built here at run time and are small on disk; the bombs' memory is
measured in a child process (peak RSS after a warm-up read, so the libraries' own start-up is not counted).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from rsvlm_edge.imageio import DEFAULT_MAX_BYTES, GDAL_CACHE_MB, ImageError, read_image, read_image_with_meta
from rsvlm_edge.pipeline import read_tile
from rsvlm_edge.preprocess import PreprocessError

MIB = 1 << 20
#: RSS a refused or tiny decode may still cost (Python objects, a decoder's row buffers, allocator slack)
SMALL = 32 * MIB
#: margin over the expected peak of a large decode (GDAL's block cache, allocator rounding)
MARGIN = GDAL_CACHE_MB * MIB + 32 * MIB

# --------------------------------------------------------------------------------------------------- file builders


def deflate_zeros(nbytes: int) -> bytes:
    """``nbytes`` zero bytes through zlib at level 9 (about 1000:1), fed in pieces so nothing large is allocated."""
    comp, piece, out = zlib.compressobj(9), bytes(1 << 22), []
    for start in range(0, nbytes, len(piece)):
        out.append(comp.compress(piece[: min(len(piece), nbytes - start)]))
    return b"".join(out) + comp.flush()


def tiff_bytes(width: int, height: int, strips: list[bytes], *, bands: int = 1, bits: int = 8, sample_format: int = 1,
               compression: int = 1, rows_per_strip: int | None = None) -> bytes:
    """A little-endian classic TIFF around already-encoded strips, IFD last. One BitsPerSample / SampleFormat value
    stands for every band, so a header can claim any number of bands in a few bytes."""
    offsets = list(np.cumsum([8] + [len(s) for s in strips[:-1]]))
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [bits]), (259, 3, [compression]), (262, 3, [1]),
               (273, 4, offsets), (277, 3, [bands]), (278, 4, [rows_per_strip or height]),
               (279, 4, [len(s) for s in strips]), (284, 3, [1]), (339, 3, [sample_format])]
    data = b"".join(strips)
    extra_base = 8 + len(data)
    extra, fields = b"", []
    for tag, typ, values in entries:
        raw = struct.pack("<" + ("H" if typ == 3 else "I") * len(values), *(int(v) for v in values))
        if len(raw) > 4:
            raw, extra = struct.pack("<I", extra_base + len(extra)), extra + raw
        fields.append(struct.pack("<HHI", tag, typ, len(values)) + raw.ljust(4, b"\0"))
    ifd = struct.pack("<H", len(fields)) + b"".join(fields) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", extra_base + len(extra)) + data + extra + ifd


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, *, colour: int = 2, depth: int = 16, filter_type: int = 0,
              residuals: bytes | None = None, extra_idat: int = 0, ztxt: int = 0) -> bytes:
    """A PNG whose every scanline has ``filter_type`` and the same residual bytes (zeros by default), streamed
    through zlib row by row. ``extra_idat`` zero bytes follow the image inside IDAT; ``ztxt`` is the inflated size of
    a zTXt chunk placed before it."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    line = bytes([filter_type]) + (residuals if residuals is not None else bytes(width * channels * depth // 8))
    comp = zlib.compressobj(9)
    idat = [comp.compress(line) for _ in range(height)]
    piece = bytes(1 << 22)
    for start in range(0, extra_idat, len(piece)):
        idat.append(comp.compress(piece[: min(len(piece), extra_idat - start)]))
    idat.append(comp.flush())
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if ztxt:
        out += png_chunk(b"zTXt", b"Comment\0\0" + deflate_zeros(ztxt))
    return out + png_chunk(b"IDAT", b"".join(idat)) + png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------- measuring

_PROBE = """
import json, resource, sys, time
import numpy as np
from PIL import Image
from rsvlm_edge.imageio import ImageError, read_image

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

target, warm, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
Image.fromarray(np.zeros((8, 8), np.uint16)).save(warm + ".png")
Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(warm + ".tif", compression="tiff_deflate")
read_image(warm + ".png"), read_image(warm + ".tif")  # load Pillow's and GDAL's drivers before measuring
before, start = peak(), time.perf_counter()
try:
    array = read_image(target, **kwargs)
    result = {"shape": list(array.shape), "dtype": str(array.dtype), "nbytes": array.nbytes,
              "max": float(array.max())}
except ImageError as exc:
    result = {"error": str(exc)}
result.update(rss=peak() - before, seconds=time.perf_counter() - start)
print(json.dumps(result))
"""


def probe(path: Path, **kwargs) -> dict:
    """read_image(path) in a fresh interpreter: the array's shape / dtype or the error, plus the peak-RSS growth."""
    run = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(path.parent / "warm"), json.dumps(kwargs)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    return json.loads(run.stdout)


def _assert_refused(result: dict, path: Path, *fragments: str) -> None:
    assert "error" in result, result
    assert str(path) in result["error"], result
    for fragment in fragments:
        assert fragment in result["error"], result


# --------------------------------------------------------------------------------------------------- bombs


@pytest.fixture(scope="module")
def deflate_bomb(tmp_path_factory) -> Path:
    """~470 KB TIFF: one Deflate strip that inflates to 12000 x 10000 uint32 = 458 MiB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tif"
    path.write_bytes(tiff_bytes(12000, 10000, [deflate_zeros(12000 * 10000 * 4)], bits=32, compression=8))
    assert path.stat().st_size < 600_000
    return path


def test_deflate_bomb_is_refused_before_decoding(deflate_bomb):
    result = probe(deflate_bomb, max_bytes=256 * MIB)
    _assert_refused(result, deflate_bomb, "12000x10000 x 1 bands of uint32", "max_bytes")
    assert result["rss"] < SMALL, result


def test_deflate_bomb_within_the_cap_stays_bounded(deflate_bomb):
    """Under the default cap the 458 MiB image is read; the peak is the array plus GDAL's copy of the one strip,
    which is what the cap counts, so it stays under the cap."""
    result = probe(deflate_bomb)
    assert result["shape"] == [10000, 12000, 1] and result["dtype"] == "uint32" and result["max"] == 0, result
    assert result["rss"] < DEFAULT_MAX_BYTES + MARGIN, result
    assert result["rss"] < 2 * result["nbytes"] + MARGIN, result


def test_many_strip_bomb_costs_about_its_array(tmp_path):
    strips = [deflate_zeros(12000 * 16 * 4)] * (10000 // 16)
    path = tmp_path / "strips.tif"
    path.write_bytes(tiff_bytes(12000, 10000, strips, bits=32, compression=8, rows_per_strip=16))
    result = probe(path)
    assert result["shape"] == [10000, 12000, 1], result
    assert result["rss"] < result["nbytes"] + MARGIN, result


def test_tiff_header_claiming_800_gb(tmp_path):
    """A 160-byte header: 10000 x 10000 pixels x 1000 float64 bands. Refused from the header, no MemoryError."""
    path = tmp_path / "claims.tif"
    path.write_bytes(tiff_bytes(10000, 10000, [bytes(8)], bands=1000, bits=64, sample_format=3, rows_per_strip=1))
    assert path.stat().st_size < 250
    with pytest.raises(ImageError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert "10000x10000 x 1000 bands of float64" in str(info.value) and "max_bytes" in str(info.value)


@pytest.mark.parametrize("colour", [0, 2], ids=["grey16-pillow", "rgb16-gdal"])
def test_png_text_chunk_bomb(tmp_path, colour):
    """1x1 16-bit PNG with a ~97 KB zTXt chunk that inflates to 100 MB: Pillow's text limits refuse it (grey),
    libpng's chunk limit skips it (colour); either way memory stays flat."""
    path = tmp_path / "ztxt.png"
    path.write_bytes(png_bytes(1, 1, colour=colour, ztxt=100_000_000))
    assert path.stat().st_size < 120_000
    result = probe(path)
    if "error" in result:
        _assert_refused(result, path, "text chunk")
    else:
        assert result["shape"][:2] == [1, 1] and result["dtype"] == "uint16", result
    assert result["rss"] < SMALL, result


@pytest.mark.parametrize("colour", [0, 2], ids=["grey16-pillow", "rgb16-gdal"])
def test_png_with_150_mb_after_the_pixels(tmp_path, colour):
    """1x1 16-bit PNG whose IDAT stream goes on for 150 MB after the one pixel: the decoders stop at the image."""
    path = tmp_path / "idat.png"
    path.write_bytes(png_bytes(1, 1, colour=colour, extra_idat=150_000_000))
    result = probe(path)
    assert result["shape"][:2] == [1, 1] and result["dtype"] == "uint16", result
    assert result["rss"] < SMALL, result


def test_paeth_filtered_16bit_png_decodes_fast(tmp_path):
    """3000 x 3000 16-bit RGB, every row Paeth-filtered with non-zero residuals: libpng undoes the filter."""
    residuals = bytes((i * 7) % 256 for i in range(3000 * 6))
    path = tmp_path / "paeth.png"
    path.write_bytes(png_bytes(3000, 3000, filter_type=4, residuals=residuals))
    start = time.perf_counter()
    got, meta = read_image_with_meta(path)
    seconds = time.perf_counter() - start
    assert got.shape == (3000, 3000, 3) and got.dtype == np.uint16 and meta["reader"] == "rasterio"
    assert seconds < 5, f"{seconds:.1f} s"
    assert got.max() > 0
    # Pillow (zlib + its own unfiltering) reads the same file as 8 bits: the high byte of every sample
    np.testing.assert_array_equal(got >> 8, np.asarray(Image.open(path)))


def test_10000_square_16bit_rgb_png(tmp_path):
    """572 MiB decoded from a ~580 KB file: read within the default cap at about the array's size, refused from the
    header under a smaller cap."""
    path = tmp_path / "big16.png"
    path.write_bytes(png_bytes(10000, 10000))
    refused = probe(path, max_bytes=512 * MIB)
    _assert_refused(refused, path, "10000x10000 x 3 bands of uint16")
    assert refused["rss"] < SMALL, refused
    result = probe(path)
    assert result["shape"] == [10000, 10000, 3] and result["dtype"] == "uint16", result
    assert result["rss"] < result["nbytes"] + MARGIN, result


def test_pillow_decompression_bomb_limit_is_an_image_error(tmp_path):
    """A 30000 x 30000 8-bit PNG header: Pillow's own limit (MAX_IMAGE_PIXELS) refuses it, as an ImageError."""
    path = tmp_path / "pillow_bomb.png"
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(bytes(30001))) + png_chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="too large") as info:
        read_image(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------- broken files


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        read_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message.lower()


def _gdal_file(path: Path, array: np.ndarray, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", width=array.shape[1], height=array.shape[0], count=array.shape[2],
                           dtype=array.dtype, **options) as ds:
            ds.write(array.transpose(2, 0, 1))
    return path


def test_truncated_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    files = [
        _gdal_file(tmp_path / "t.tif", rgb.astype(np.uint16) * 200, driver="GTiff", compress="deflate", blockysize=8),
        _gdal_file(tmp_path / "t16.png", rgb.astype(np.uint16) * 200, driver="PNG"),
        _gdal_file(tmp_path / "t.jp2", rgb, driver="JP2OpenJPEG"),
    ]
    for name in ("t.png", "t.jpg"):
        Image.fromarray(rgb).save(tmp_path / name)
        files.append(tmp_path / name)
    for path in files:
        data = path.read_bytes()
        for cut in (len(data) // 2, 12):
            path.write_bytes(data[:cut])
            _error(path)


def test_zero_size_images(tmp_path):
    tif = tmp_path / "zero.tif"
    tif.write_bytes(tiff_bytes(0, 3, [b""]))
    _error(tif)
    for colour, depth in ((0, 8), (2, 16)):
        png = tmp_path / f"zero{colour}.png"
        png.write_bytes(png_bytes(0, 5, colour=colour, depth=depth))
        assert "zero-size" in _error(png)
    (tmp_path / "empty.tif").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.tif")


def test_content_decides_not_the_extension(tmp_path):
    array = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "real.png")
    (tmp_path / "png_named.tif").write_bytes((tmp_path / "real.png").read_bytes())
    got, meta = read_image_with_meta(tmp_path / "png_named.tif")
    np.testing.assert_array_equal(got, array)
    assert meta["format"] == "PNG"
    Image.fromarray(array).save(tmp_path / "real.tif")
    (tmp_path / "tif_named.jpg").write_bytes((tmp_path / "real.tif").read_bytes())
    got, meta = read_image_with_meta(tmp_path / "tif_named.jpg")
    np.testing.assert_array_equal(got, array)
    assert meta["format"] == "TIFF"


def test_unknown_formats(tmp_path):
    cases = {
        "text.png": b"just some text, not an image\n",
        "random.tif": np.random.default_rng(2).integers(0, 255, 4096, dtype=np.uint8).tobytes(),
        "doc.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # Pillow's EPS plugin would run Ghostscript
        "doc.png": b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert "unrecognised" in _error(tmp_path / name)
    (tmp_path / "sig.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert "corrupt png" in _error(tmp_path / "sig.png")


def test_directory_and_missing(tmp_path):
    assert "not a regular file" in _error(tmp_path)
    assert "not found" in _error(tmp_path / "missing.tif")


# --------------------------------------------------------------------------------------------------- nodata / NaN


def test_all_nan_tiff_names_the_file(tmp_path):
    path = _gdal_file(tmp_path / "nan.tif", np.full((8, 8, 1), np.nan, np.float32), driver="GTiff")
    array = read_image(path)
    assert np.isnan(array).all()
    with pytest.raises(PreprocessError, match="no valid pixels") as info:
        read_tile([path], "ir", 32, {"ir": 1})
    assert str(path) in str(info.value)


def test_all_nodata_and_partial_nodata(tmp_path):
    full = _gdal_file(tmp_path / "full.tif", np.full((8, 8, 2), -9999, np.int16), driver="GTiff", nodata=-9999)
    with pytest.raises(PreprocessError, match="no valid pixels") as info:
        read_tile([full], "sar", 32, {"sar": 2})
    assert str(full) in str(info.value)
    part = np.arange(128, dtype=np.int16).reshape(8, 8, 2)
    part[:4] = -9999
    path = _gdal_file(tmp_path / "part.tif", part, driver="GTiff", nodata=-9999)
    assert read_image_with_meta(path)[1]["nodata"] == -9999
    tile = read_tile([path], "sar", 32, {"sar": 2})
    assert tile.pixels[0].shape == (2, 32, 32) and np.isfinite(tile.pixels[0]).all()
