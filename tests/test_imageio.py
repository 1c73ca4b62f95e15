"""rsvlm_edge.imageio: native-dtype reading of PNG/JPEG (Pillow) and TIFF (own numpy reader), typed errors.

The TIFFs are written by a minimal writer below (so every layout the reader claims is exercised: byte orders, strips
and tiles, planar 1 and 2, Deflate and PackBits, predictors 2 and 3, BigTIFF, GDAL_NODATA) and by Pillow.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvlm_edge.imageio import (
    ImageError,
    _png_chunks,
    decode_png_pixels,
    read_band_stack,
    read_image,
    read_image_with_meta,
)

# --------------------------------------------------------------------------------------------------- TIFF writer


def _packbits(data: bytes) -> bytes:
    out, i, n = bytearray(), 0, len(data)
    while i < n:
        run = 1
        while i + run < n and run < 128 and data[i + run] == data[i]:
            run += 1
        if run >= 3:
            out += bytes([257 - run, data[i]])
            i += run
            continue
        j = i
        while j < n and j - i < 128 and not (j + 2 < n and data[j] == data[j + 1] == data[j + 2]):
            j += 1
        out += bytes([j - i - 1]) + data[i:j]
        i = j
    return bytes(out)


def _encode_chunk(block: np.ndarray, order: str, predictor: int, compression: int) -> bytes:
    rows, cols, spp = block.shape
    file_dtype = block.dtype.newbyteorder(order)
    if predictor == 2:
        diff = block.copy()
        diff[:, 1:] = block[:, 1:] - block[:, :-1]  # integer arithmetic wraps, as the predictor wants
        raw = diff.astype(file_dtype).tobytes()
    elif predictor == 3:
        n = block.dtype.itemsize
        planes = block.astype(f">f{n}").view(np.uint8).reshape(rows, cols * spp, n).transpose(0, 2, 1)
        planes = np.ascontiguousarray(planes).reshape(rows, n * cols, spp)
        diff = planes.copy()
        diff[:, 1:] = planes[:, 1:] - planes[:, :-1]
        raw = diff.tobytes()
    else:
        raw = block.astype(file_dtype).tobytes()
    if compression == 8:
        return zlib.compress(raw)
    if compression == 32773:
        return _packbits(raw)
    return raw


def write_tiff(path: Path, array: np.ndarray, *, order: str = "<", planar: int = 1, compression: int = 1,
               predictor: int = 1, tile: tuple[int, int] | None = None, rows_per_strip: int | None = None,
               nodata: str | None = None, bigtiff: bool = False, extra_samples: list[int] | None = None,
               photometric: int | None = None, width: int | None = None,
               extra_tags: dict[int, tuple[int, list[int]]] | None = None) -> Path:
    """A minimal TIFF writer: first IFD only, data first, IFD last."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    height, w, spp = a.shape
    fmt = {"u": 1, "i": 2, "f": 3}[a.dtype.kind]
    planes = [a] if planar == 1 else [a[:, :, c:c + 1] for c in range(spp)]
    chunks = []
    for plane in planes:
        if tile:
            th, tw = tile
            for ty in range(-(-height // th)):
                for tx in range(-(-w // tw)):
                    block = np.zeros((th, tw, plane.shape[2]), dtype=a.dtype)
                    part = plane[ty * th:(ty + 1) * th, tx * tw:(tx + 1) * tw]
                    block[: part.shape[0], : part.shape[1]] = part
                    chunks.append(_encode_chunk(block, order, predictor, compression))
        else:
            rps = rows_per_strip or height
            for r0 in range(0, height, rps):
                chunks.append(_encode_chunk(plane[r0:r0 + rps], order, predictor, compression))
    head = 16 if bigtiff else 8
    body = bytearray()
    offsets = []
    for chunk in chunks:
        offsets.append(head + len(body))
        body += chunk
        if len(body) % 2:
            body += b"\x00"
    counts = [len(c) for c in chunks]
    long_t = 16 if bigtiff else 4
    entries = {
        256: (3, [w if width is None else width]), 257: (3, [height]), 258: (3, [a.dtype.itemsize * 8] * spp),
        259: (3, [compression]), 262: (3, [photometric if photometric is not None else (2 if spp == 3 else 1)]),
        277: (3, [spp]), 284: (3, [planar]), 339: (3, [fmt] * spp),
    }
    if predictor != 1:
        entries[317] = (3, [predictor])
    if tile:
        entries.update({322: (3, [tile[1]]), 323: (3, [tile[0]]), 324: (long_t, offsets), 325: (long_t, counts)})
    else:
        entries.update({273: (long_t, offsets), 278: (3, [rows_per_strip or height]), 279: (long_t, counts)})
    if nodata is not None:
        entries[42113] = (2, nodata.encode() + b"\x00")
    if extra_samples is not None:
        entries[338] = (3, extra_samples)
    entries.update(extra_tags or {})
    codes = {3: "H", 4: "I", 16: "Q", 2: "s"}
    inline = 8 if bigtiff else 4
    values = bytearray()
    value_base = head + len(body)
    packed = []
    for tag in sorted(entries):
        typ, vals = entries[tag]
        count = len(vals)
        raw = vals if typ == 2 else struct.pack(order + codes[typ] * count, *vals)
        if len(raw) <= inline:
            field = raw.ljust(inline, b"\x00")
        else:
            field = struct.pack(order + ("Q" if bigtiff else "I"), value_base + len(values))
            values += raw
            if len(values) % 2:
                values += b"\x00"
        packed.append((tag, typ, count, field))
    ifd_offset = value_base + len(values)
    if bigtiff:
        header = (b"II" if order == "<" else b"MM") + struct.pack(order + "HHHQ", 43, 8, 0, ifd_offset)
        ifd = struct.pack(order + "Q", len(packed)) + b"".join(
            struct.pack(order + "HHQ", t, ty, c) + f for t, ty, c, f in packed) + struct.pack(order + "Q", 0)
    else:
        header = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, ifd_offset)
        ifd = struct.pack(order + "H", len(packed)) + b"".join(
            struct.pack(order + "HHI", t, ty, c) + f for t, ty, c, f in packed) + struct.pack(order + "I", 0)
    path.write_bytes(header + bytes(body) + bytes(values) + ifd)
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
    # dtype, bands, order, planar, compression, predictor, tile, rows_per_strip
    ("uint16", 12, "<", 1, 1, 1, None, None),
    ("uint16", 12, ">", 1, 1, 1, None, 5),
    ("uint16", 5, "<", 2, 8, 2, None, 8),
    ("uint16", 4, ">", 1, 8, 2, (16, 16), None),
    ("uint8", 6, "<", 2, 32773, 1, None, 3),
    ("uint8", 3, ">", 1, 32773, 2, (16, 32), None),
    ("int16", 2, "<", 1, 8, 2, None, 10),
    ("int16", 3, ">", 2, 1, 1, (16, 16), None),
    ("float32", 2, "<", 1, 1, 1, None, 7),
    ("float32", 13, ">", 2, 8, 1, (32, 16), None),
    ("float32", 3, "<", 1, 8, 3, None, 6),
    ("float32", 4, ">", 2, 8, 3, (16, 16), None),
    ("float64", 2, "<", 1, 8, 3, (16, 48), None),
    ("float64", 1, ">", 1, 32773, 1, None, None),
    ("int32", 3, "<", 2, 8, 2, None, 11),
    ("uint32", 2, ">", 1, 1, 1, (16, 16), None),
    ("int8", 1, "<", 1, 8, 2, None, 4),
    ("uint64", 2, "<", 1, 1, 1, None, None),
    ("float16", 2, "<", 1, 8, 3, None, 9),
]


@pytest.mark.parametrize("dtype,bands,order,planar,compression,predictor,tile,rps", CASES)
def test_tiff_layouts_roundtrip(tmp_path, dtype, bands, order, planar, compression, predictor, tile, rps):
    array = _test_array(dtype, bands)
    path = write_tiff(tmp_path / "x.tif", array, order=order, planar=planar, compression=compression,
                      predictor=predictor, tile=tile, rows_per_strip=rps)
    got, meta = read_image_with_meta(path)
    assert got.dtype == array.dtype and got.dtype.isnative
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert meta["format"] == "TIFF" and meta["reader"] == "tiff" and meta["nodata"] is None
    assert meta["planar"] == planar and meta["tiled"] == (tile is not None)
    assert (meta["bands"], meta["height"], meta["width"]) == (bands, 37, 45)


def test_tiff_bigtiff_and_nodata(tmp_path):
    array = _test_array("float32", 3)
    array[0, 0] = -9999.0
    path = write_tiff(tmp_path / "big.tif", array, bigtiff=True, compression=8, nodata="-9999", tile=(16, 16))
    got, meta = read_image_with_meta(path)
    np.testing.assert_array_equal(got, array)
    assert meta["bigtiff"] is True
    assert meta["nodata"] == -9999.0


@pytest.mark.parametrize("text,expected", [("0", 0.0), (" -3.4028234663852886e+38 ", -3.4028234663852886e+38),
                                           ("nan", "nan"), ("", None), ("garbage", None)])
def test_tiff_nodata_parsing(tmp_path, text, expected):
    path = write_tiff(tmp_path / "nd.tif", np.zeros((4, 4), np.uint16), nodata=text)
    nodata = read_image_with_meta(path)[1]["nodata"]
    if expected == "nan":
        assert nodata is not None and np.isnan(nodata)
    else:
        assert nodata == expected


def test_tiff_alpha_dropped_but_unspecified_extra_band_kept(tmp_path):
    rgba = _test_array("uint8", 4, seed=1)
    got = read_image(write_tiff(tmp_path / "rgba.tif", rgba, photometric=2, extra_samples=[2]))
    np.testing.assert_array_equal(got, rgba[:, :, :3])
    rgbn = _test_array("uint16", 4, seed=2)
    got = read_image(write_tiff(tmp_path / "rgbn.tif", rgbn, photometric=2, extra_samples=[0]))
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
    expected = np.asarray(Image.open(path))
    got = read_image(path)
    assert got.dtype == expected.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, expected.reshape(got.shape))


def test_lzw_large_table_resets(tmp_path):
    """Random data fills the LZW table (9 -> 12 bit codes, clear codes): still exact."""
    array = np.random.default_rng(4).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    path = tmp_path / "lzw.tif"
    Image.fromarray(array).save(path, compression="tiff_lzw")
    np.testing.assert_array_equal(read_image(path), array)


def test_real_bigearthnet_tiffs_match_pillow(data_root):
    paths = sorted((data_root / "bigearthnet").rglob("*.tif"))
    if not paths:
        pytest.skip("no BigEarthNet tifs in the data folder")
    for path in paths[::7]:
        got = read_image(path)
        np.testing.assert_array_equal(got[:, :, 0], np.asarray(Image.open(path)))


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
    # palette -> RGB
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    got = read_image(_save(tmp_path, pal, "p.png"))
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
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


# A minimal PNG writer for 16-bit colour images (Pillow cannot write them), with all five filter types and Adam7.

def _png_filter(rows: np.ndarray, bpp: int, kinds: list[int]) -> bytes:
    out = bytearray()
    prev = np.zeros(rows.shape[1], dtype=np.int64)
    for y, row in enumerate(rows.astype(np.int64)):
        kind = kinds[y % len(kinds)]
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(row)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            pa, pb, pc = np.abs(prev - upleft), np.abs(left - upleft), np.abs(left + prev - 2 * upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    return bytes(out)


def write_png16(path: Path, array: np.ndarray, interlace: bool = False, kinds=(0, 1, 2, 3, 4)) -> Path:
    h, w, c = array.shape
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    big = array.astype(">u2")
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
              (0, 1, 1, 2)) if interlace else ((0, 0, 1, 1),)
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = big[y0::dy, x0::dx]
        if sub.size:
            raw += _png_filter(sub.view(np.uint8).reshape(sub.shape[0], -1), 2 * c, list(kinds))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, int(interlace)))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("channels", [3, 4, 2])
def test_png16_colour_stays_uint16(tmp_path, channels, interlace):
    array = np.random.default_rng(6).integers(0, 65535, (19, 23, channels), dtype=np.uint16)
    got, meta = read_image_with_meta(write_png16(tmp_path / "c16.png", array, interlace=interlace))
    assert got.dtype == np.uint16 and meta["reader"] == "png16"
    np.testing.assert_array_equal(got, array[:, :, : channels - 1] if channels in (2, 4) else array)


def test_png_unfilter_matches_pillow_on_8bit(tmp_path):
    """Cross-check the scanline decoder on Pillow-encoded (adaptively filtered) 8-bit RGB PNGs."""
    y, x = np.mgrid[0:61, 0:77]
    array = np.stack([(x * 3) % 256, (y * 5 + x) % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    array[::7] = np.random.default_rng(7).integers(0, 255, array[::7].shape, dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(array), "p8.png", optimize=True)
    header, idat = _png_chunks(path)
    got = decode_png_pixels(zlib.decompress(idat), header["width"], header["height"], 3, 8, False)
    np.testing.assert_array_equal(got, array)


# --------------------------------------------------------------------------------------------------- band stacks


def test_read_band_stack_resizes_to_largest(tmp_path):
    rng = np.random.default_rng(8)
    b10 = rng.integers(0, 10000, (12, 12), dtype=np.uint16)
    b20 = np.full((6, 6), 1234, dtype=np.uint16)
    b60 = rng.integers(0, 10000, (2, 2), dtype=np.uint16)
    paths = [write_tiff(tmp_path / f"b{i}.tif", b) for i, b in enumerate([b20, b10, b60])]
    stack = read_band_stack(paths)
    assert stack.shape == (12, 12, 3) and stack.dtype == np.uint16
    np.testing.assert_array_equal(stack[:, :, 1], b10)
    assert (stack[:, :, 0] == 1234).all()  # a constant band stays constant through bilinear resampling
    assert stack[:, :, 2].min() >= b60.min() and stack[:, :, 2].max() <= b60.max()
    with pytest.raises(ImageError):
        read_band_stack([])


def test_read_band_stack_mixed_dtypes(tmp_path):
    a = write_tiff(tmp_path / "a.tif", np.ones((4, 4), np.uint16))
    b = write_tiff(tmp_path / "b.tif", np.full((2, 2), 0.5, np.float32))
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


def test_truncated_png_and_jpeg(tmp_path):
    array = np.random.default_rng(9).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("t.png", "t.jpg"):
        path = _save(tmp_path, Image.fromarray(array), name)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        _assert_error(path, "truncated" if name.endswith("png") else "")
    path = write_png16(tmp_path / "t16.png", array.astype(np.uint16))
    path.write_bytes(path.read_bytes()[:-30])
    _assert_error(path, "")


def test_truncated_and_corrupt_tiffs(tmp_path):
    array = _test_array("uint16", 3)
    path = write_tiff(tmp_path / "trunc.tif", array, rows_per_strip=4)
    data = path.read_bytes()
    # cut inside the strip data but keep the IFD (at the end): offsets now point past EOF
    (tmp_path / "cut.tif").write_bytes(data[:8] + data[-400:])
    _assert_error(tmp_path / "cut.tif", "")
    (tmp_path / "head.tif").write_bytes(data[:12])
    _assert_error(tmp_path / "head.tif", "truncated")
    (tmp_path / "noifd.tif").write_bytes(data[:len(data) // 3])
    _assert_error(tmp_path / "noifd.tif", "")
    bad = write_tiff(tmp_path / "deflate.tif", array, compression=8)
    raw = bytearray(bad.read_bytes())
    raw[8:40] = b"\xff" * 32  # smash the zlib stream of the first strip
    bad.write_bytes(bytes(raw))
    _assert_error(bad, "deflate")


def test_zero_size_and_oversize(tmp_path):
    _assert_error(write_tiff(tmp_path / "zero.tif", np.zeros((3, 4), np.uint8), width=0), "zero-size")
    _assert_error(write_tiff(tmp_path / "big.tif", np.zeros((30, 40), np.uint8)), "too large", max_pixels=1000)
    png = _save(tmp_path, Image.fromarray(np.zeros((30, 40), np.uint8)), "big.png")
    _assert_error(png, "too large", max_pixels=1000)
    assert read_image(png, max_pixels=1200).shape == (30, 40, 1)


def test_unsupported_tiff_features(tmp_path):
    array = _test_array("uint16", 2)
    _assert_error(write_tiff(tmp_path / "lerc.tif", array, extra_tags={259: (3, [34887])}), "lerc")
    _assert_error(write_tiff(tmp_path / "p3.tif", array, extra_tags={317: (3, [3])}), "floating-point predictor")
    _assert_error(write_tiff(tmp_path / "p7.tif", array, extra_tags={317: (3, [7])}), "predictor")
    _assert_error(write_tiff(tmp_path / "c.tif", array, extra_tags={339: (3, [6, 6])}), "unsupported")


def test_mutated_files_raise_only_image_error(tmp_path):
    """Random byte flips and truncations of valid files: either the image reads or an ImageError comes out."""
    import random

    bases = [
        write_tiff(tmp_path / "a.tif", _test_array("uint16", 3, 20, 20), compression=8, predictor=2, rows_per_strip=5),
        write_tiff(tmp_path / "b.tif", _test_array("float32", 2, 20, 20), compression=32773, tile=(16, 16), order=">"),
        write_tiff(tmp_path / "c.tif", _test_array("float32", 2, 20, 20), compression=8, predictor=3, planar=2),
        write_png16(tmp_path / "d.png", _test_array("uint16", 3, 20, 20)),
    ]
    Image.fromarray(_test_array("uint8", 3, 20, 20)).save(tmp_path / "e.tif", compression="tiff_lzw")
    bases.append(tmp_path / "e.tif")
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
            read_image(path, max_pixels=10**6)
        except ImageError:
            pass
