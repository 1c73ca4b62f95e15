"""Reading images for the runtime: numpy + Pillow only (no torch, tifffile or rasterio).

Every reader returns an ``H x W x C`` array in the file's native dtype (``uint8``, ``uint16``, ``int16``,
``float32`` ...); nothing is rescaled here, :mod:`rsvlm_edge.preprocess` does that.

* PNG / JPEG / other Pillow formats: palette and CMYK/YCbCr images become RGB, alpha is dropped (RGBA -> RGB,
  LA -> L), 16-bit greyscale stays ``uint16``. Pillow reads 16-bit *colour* PNGs as 8-bit, so those (colour types
  2, 4 and 6 at bit depth 16) are decoded here instead and stay ``uint16``.
* TIFF / GeoTIFF: a small numpy reader handles what remote-sensing files use: little and big endian, classic and
  BigTIFF, strips and tiles, no compression, Deflate, LZW and PackBits, predictors 1 (none), 2 (horizontal) and 3
  (floating point), planar configurations 1 (interleaved) and 2 (band planes), 8/16/32/64-bit unsigned, signed and
  float samples and any number of bands. The GDAL_NODATA tag (42113) is returned as ``nodata``. What the numpy
  reader does not handle (JPEG-in-TIFF, 1-bit, YCbCr ...) is handed to Pillow; if Pillow fails too, the error says
  why the numpy reader refused.
* Errors are :class:`ImageError` (a ``ValueError``) with the path in the message: missing file, corrupt or
  truncated data, unsupported format or compression, zero-size or oversize images (``max_pixels``).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence, TypedDict

import numpy as np

#: Largest image (width x height) read by default; guards against decompression bombs and typos.
DEFAULT_MAX_PIXELS = 100_000_000

GDAL_NODATA_TAG = 42113

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageInfo(TypedDict, total=False):
    """Metadata returned next to the pixels by :func:`read_image_with_meta` (a plain dict at runtime)."""

    nodata: float | None  # GDAL_NODATA of TIFFs, else None
    format: str  # "TIFF", "PNG", "JPEG", ... (Pillow's name for other formats)
    reader: str  # "tiff" (numpy reader), "png16" (16-bit colour PNG decoder) or "pillow"
    width: int
    height: int
    bands: int
    dtype: str
    mode: str  # Pillow mode before conversion (Pillow reader only)
    compression: str  # TIFF only: none, deflate, lzw, packbits
    planar: int
    tiled: bool
    bigtiff: bool
    predictor: int


class ImageError(ValueError):
    """An image cannot be read: missing, corrupt, truncated, unsupported, empty or too large."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.reason = message
        super().__init__(f"{message}: {path}" if path is not None else message)


class _Unsupported(Exception):
    """Raised inside the numpy TIFF reader for valid files it does not decode (Pillow gets a try)."""


# --------------------------------------------------------------------------------------------------- public API


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``H x W x C`` array in the file's native dtype. See the module docstring for the conversions."""
    return read_image_with_meta(path, max_pixels=max_pixels)[0]


def read_image_with_meta(path: str | os.PathLike, *,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """``(array, meta)``; ``meta`` has ``nodata`` (float or None), ``format`` ("TIFF", "PNG", "JPEG", ...),
    ``reader`` ("tiff", "png16" or "pillow"), ``width``, ``height``, ``bands`` and ``dtype``."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "image file not found")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ImageError(path, f"cannot open image file ({exc.strerror or exc})") from None
    if not head:
        raise ImageError(path, "empty file (0 bytes), not an image")

    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        array, meta = _read_tiff(path, max_pixels)
    elif head[:8] == _PNG_MAGIC and _png_needs_own_decoder(path):
        array, meta = _read_png16(path, max_pixels)
    else:
        array, meta = _read_pillow(path, max_pixels)

    if array.ndim == 2:
        array = array[:, :, None]
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    array = np.ascontiguousarray(array)
    info: ImageInfo = {"nodata": meta.get("nodata"), **meta}  # type: ignore[typeddict-item]
    info["height"], info["width"], info["bands"] = (int(v) for v in array.shape)
    info["dtype"] = str(array.dtype)
    return array, info


def read_band_stack(paths: Sequence[str | os.PathLike], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Stack single-band files (BigEarthNet keeps each Sentinel-2 band in its own .tif) into ``H x W x N``.

    Bands are resampled to the size of the largest one with Pillow's bilinear filter (on float32) and cast back to
    the common dtype (integers rounded and clipped to the dtype's range). Multi-band files contribute all their
    bands, in order.
    """
    paths = list(paths)
    if not paths:
        raise ImageError(None, "read_band_stack needs at least one file")
    arrays = [read_image(p, max_pixels=max_pixels) for p in paths]
    height, width = max((a.shape[:2] for a in arrays), key=lambda hw: (hw[0] * hw[1], hw))
    dtype = np.result_type(*arrays)
    bands = []
    for array in arrays:
        for c in range(array.shape[2]):
            band = array[:, :, c]
            if band.shape != (height, width):
                band = _cast_back(resize_band(band, width, height), dtype)
            bands.append(band.astype(dtype, copy=False))
    return np.stack(bands, axis=-1)


def resize_band(band: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of one 2-D band with Pillow in float32 ('F' mode). Returns float32 ``(height, width)``."""
    from PIL import Image

    data = np.ascontiguousarray(band, dtype=np.float32)
    if data.shape == (height, width):
        return data.copy()
    image = Image.fromarray(data)
    return np.asarray(image.resize((int(width), int(height)), Image.Resampling.BILINEAR), dtype=np.float32)


def _cast_back(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    return values.astype(dtype)


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(path, f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(path, f"image too large: {width}x{height} = {width * height:,} pixels exceeds "
                               f"max_pixels={max_pixels:,}")


# --------------------------------------------------------------------------------------------------- Pillow


def _read_pillow(path: Path, max_pixels: int, what: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(path, f"unsupported or unrecognised image format{what}") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(path, f"image too large for Pillow ({exc})") from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
            raise ImageError(path, f"corrupt image file ({exc})") from None
        with image:
            width, height = image.size
            _check_size(path, width, height, max_pixels)
            try:
                image.load()
                array = _pillow_to_array(image)
            except Image.DecompressionBombError as exc:
                raise ImageError(path, f"image too large for Pillow ({exc})") from None
            except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, zlib.error) as exc:
                text = str(exc)
                kind = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "corrupt or unsupported"
                raise ImageError(path, f"{kind} image data ({text or type(exc).__name__}){what}") from None
            meta: dict[str, Any] = {"format": image.format or "unknown", "reader": "pillow", "mode": image.mode}
            tags = getattr(image, "tag_v2", None)
            if tags is not None and GDAL_NODATA_TAG in tags:
                meta["nodata"] = _parse_nodata(tags[GDAL_NODATA_TAG])
    return array, meta


def _pillow_to_array(image) -> np.ndarray:
    """Pillow image -> HxW(xC) array with the mode conversions of the module docstring."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("L", "F", "RGB") or mode.startswith("I"):
        array = np.asarray(image)
        if mode == "I" and image.format == "PNG":  # some Pillow versions open 16-bit greyscale PNGs as 32-bit 'I'
            array = array.astype(np.uint16)
        return array
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(image.convert("RGBA") if mode == "RGBa" else image)[:, :, :3]
    if mode in ("LA", "La"):
        return np.asarray(image)[:, :, 0]
    if mode == "P":
        return np.asarray(image.convert("RGB"))
    if mode == "PA":
        return np.asarray(image.convert("RGBA"))[:, :, :3]
    return np.asarray(image.convert("RGB"))  # CMYK, YCbCr, LAB, HSV ...


# --------------------------------------------------------------------------------------------------- PNG (16-bit)


def _png_chunks(path: Path) -> tuple[dict[str, Any], bytes]:
    """IHDR fields and the concatenated IDAT payload; CRCs are checked."""
    data = path.read_bytes()
    pos, header, idat = 8, None, []
    while True:
        if pos + 8 > len(data):
            raise ImageError(path, "truncated PNG (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if pos + 12 + length > len(data):
            raise ImageError(path, f"truncated PNG (chunk {ctype!r} cut short)")
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise ImageError(path, f"corrupt PNG (bad CRC in chunk {ctype!r})")
        if ctype == b"IHDR":
            if length != 13:
                raise ImageError(path, "corrupt PNG (bad IHDR)")
            w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", body)
            header = dict(width=w, height=h, depth=depth, color=color, compression=comp, filter=filt,
                          interlace=interlace)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ImageError(path, "corrupt PNG (no IHDR chunk)")
    return header, b"".join(idat)


def _png_needs_own_decoder(path: Path) -> bool:
    """16-bit colour PNGs (colour types 2, 4, 6) that Pillow would reduce to 8 bits."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError:
        return False
    if len(head) < 33 or head[12:16] != b"IHDR":
        return False
    depth, color = head[24], head[25]
    return depth == 16 and color in (2, 4, 6)


_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _read_png16(path: Path, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    header, idat = _png_chunks(path)
    width, height, depth, color = header["width"], header["height"], header["depth"], header["color"]
    _check_size(path, width, height, max_pixels)
    if color not in _PNG_CHANNELS or depth not in (8, 16) or header["compression"] or header["filter"]:
        raise ImageError(path, f"unsupported PNG (colour type {color}, bit depth {depth})")
    channels = _PNG_CHANNELS[color]
    try:
        raw = zlib.decompress(idat)
    except zlib.error as exc:
        raise ImageError(path, f"corrupt PNG image data ({exc})") from None
    decoded = decode_png_pixels(raw, width, height, channels, depth, bool(header["interlace"]), path)
    if color in (4, 6):  # drop alpha: LA -> L, RGBA -> RGB
        decoded = decoded[:, :, :-1]
    return decoded, {"format": "PNG", "reader": "png16"}


def decode_png_pixels(raw: bytes, width: int, height: int, channels: int, depth: int, interlaced: bool,
                      path: Path | None = None) -> np.ndarray:
    """Unfilter (and de-interlace) decompressed PNG scanlines of 8- or 16-bit samples -> HxWxC native array."""
    nbytes = depth // 8
    bpp = channels * nbytes
    dtype = np.dtype(">u2") if depth == 16 else np.dtype(np.uint8)
    out = np.zeros((height, width, channels), dtype=dtype)
    buf = np.frombuffer(raw, dtype=np.uint8)
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    pos = 0
    for x0, y0, dx, dy in passes:
        pw, ph = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pw <= 0 or ph <= 0:
            continue
        stride = pw * bpp
        size = ph * (stride + 1)
        if pos + size > buf.size:
            raise ImageError(path, "truncated PNG image data")
        rows = buf[pos:pos + size].reshape(ph, stride + 1)
        pos += size
        pixels = _png_unfilter(rows, bpp, path)
        out[y0::dy, x0::dx] = pixels.view(dtype).reshape(ph, pw, channels)
    return out.astype(dtype.newbyteorder("="))


def _png_unfilter(rows: np.ndarray, bpp: int, path: Path | None) -> np.ndarray:
    height, stride = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: running sum per byte lane (uint8 arithmetic wraps like the spec's mod 256)
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):  # Average / Paeth depend on the decoded left neighbour: plain Python
            cur = np.frombuffer(_unfilter_sequential(kind, line.tobytes(), prev.tobytes(), bpp), dtype=np.uint8)
        else:
            raise ImageError(path, f"corrupt PNG (unknown filter type {kind})")
        out[y] = cur
        prev = out[y]
    return out


def _unfilter_sequential(kind: int, line: bytes, prev: bytes, bpp: int) -> bytearray:
    cur = bytearray(line)
    n = len(cur)
    if kind == 3:
        for i in range(n):
            left = cur[i - bpp] if i >= bpp else 0
            cur[i] = (cur[i] + ((left + prev[i]) >> 1)) & 0xFF
        return cur
    for i in range(n):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[i] = (cur[i] + pred) & 0xFF
    return cur


# --------------------------------------------------------------------------------------------------- TIFF

# type -> (numpy code, size in bytes); rationals are two 32-bit integers
_TIFF_TYPES = {1: ("u1", 1), 2: ("S1", 1), 3: ("u2", 2), 4: ("u4", 4), 5: ("u4", 8), 6: ("i1", 1), 7: ("u1", 1),
               8: ("i2", 2), 9: ("i4", 4), 10: ("i4", 8), 11: ("f4", 4), 12: ("f8", 8), 13: ("u4", 4),
               16: ("u8", 8), 17: ("i8", 8), 18: ("u8", 8)}

_COMPRESSION_NAMES = {1: "none", 5: "lzw", 6: "old-jpeg", 7: "jpeg", 8: "deflate", 32946: "deflate",
                      32773: "packbits", 34887: "lerc", 34925: "lzma", 50000: "zstd", 50001: "webp", 34712: "jpeg2000"}

_NEEDED_TAGS = (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 338, 339,
                GDAL_NODATA_TAG)


class _TiffFile:
    def __init__(self, path: Path, f, size: int):
        self.path, self.f, self.size = path, f, size
        magic = self.read(0, 4)
        self.order = "<" if magic[:2] == b"II" else ">"
        self.bigtiff = magic[2:4] in (b"+\x00", b"\x00+")
        if self.bigtiff:
            head = self.read(4, 12)
            bytesize, _, first = struct.unpack(self.order + "HHQ", head)
            if bytesize != 8:
                raise ImageError(path, "corrupt BigTIFF header")
        else:
            (first,) = struct.unpack(self.order + "I", self.read(4, 4))
        self.first_ifd = first

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(self.path, f"truncated or corrupt TIFF: data at offset {offset} (+{length} bytes) lies "
                                        f"beyond the end of the {self.size}-byte file")
        self.f.seek(offset)
        data = self.f.read(length)
        if len(data) != length:
            raise ImageError(self.path, "truncated TIFF file")
        return data

    def ifd(self) -> dict[int, Any]:
        """Tags of the first IFD (the full-resolution image; later IFDs are pages / overviews)."""
        o = self.order
        if self.bigtiff:
            (count,) = struct.unpack(o + "Q", self.read(self.first_ifd, 8))
            entry_size, entry_fmt, start, inline = 20, o + "HHQ8s", self.first_ifd + 8, 8
        else:
            (count,) = struct.unpack(o + "H", self.read(self.first_ifd, 2))
            entry_size, entry_fmt, start, inline = 12, o + "HHI4s", self.first_ifd + 2, 4
        if count == 0 or count > 10_000:
            raise ImageError(self.path, f"corrupt TIFF (IFD with {count} entries)")
        block = self.read(start, count * entry_size)
        tags: dict[int, Any] = {}
        for i in range(count):
            tag, typ, n, field = struct.unpack(entry_fmt, block[i * entry_size:(i + 1) * entry_size])
            if tag not in _NEEDED_TAGS or typ not in _TIFF_TYPES:
                continue
            code, size = _TIFF_TYPES[typ]
            total = size * n
            if total <= inline:
                raw = field[:total]
            else:
                (offset,) = struct.unpack(o + ("Q" if self.bigtiff else "I"), field)
                raw = self.read(offset, total)
            if typ == 2:
                tags[tag] = raw.split(b"\x00", 1)[0].decode("latin-1")
            elif typ in (5, 10):
                pairs = np.frombuffer(raw, dtype=o + code).reshape(-1, 2).astype(np.float64)
                tags[tag] = [float(a / b) if b else math.nan for a, b in pairs]
            else:
                tags[tag] = np.frombuffer(raw, dtype=o + code).tolist()
        return tags


def _parse_nodata(value: Any) -> float | None:
    text = value if isinstance(value, str) else (value.decode("latin-1") if isinstance(value, bytes) else str(value))
    text = text.strip().strip("\x00").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _read_tiff(path: Path, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 16:
            raise ImageError(path, "truncated TIFF file (no header)")
        tiff = _TiffFile(path, f, size)
        tags = tiff.ifd()
        try:
            array, meta = _decode_tiff(tiff, tags, max_pixels)
        except _Unsupported as exc:
            reason = str(exc)
        else:
            meta["nodata"] = _parse_nodata(tags[GDAL_NODATA_TAG]) if GDAL_NODATA_TAG in tags else None
            return array, meta
    # Valid TIFF the numpy reader does not decode: Pillow may (JPEG-in-TIFF, 1-bit, YCbCr ...).
    try:
        array, meta = _read_pillow(path, max_pixels, what=f"; the numpy TIFF reader does not support it either "
                                                           f"({reason})")
    except ImageError as exc:
        if "too large" in exc.reason or "zero-size" in exc.reason:
            raise
        raise ImageError(path, f"unsupported TIFF: {reason}") from None
    if meta.get("nodata") is None and GDAL_NODATA_TAG in tags:
        meta["nodata"] = _parse_nodata(tags[GDAL_NODATA_TAG])
    return array, meta


def _first(tags: dict[int, Any], tag: int, default: Any = None) -> Any:
    value = tags.get(tag)
    if value is None:
        return default
    if isinstance(value, list):
        return value[0] if value else default
    return value


def _decode_tiff(tiff: _TiffFile, tags: dict[int, Any], max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    path = tiff.path
    if 256 not in tags or 257 not in tags:
        raise ImageError(path, "corrupt TIFF (no ImageWidth/ImageLength tag)")
    width, height = int(_first(tags, 256)), int(_first(tags, 257))
    _check_size(path, width, height, max_pixels)
    spp = int(_first(tags, 277, 1))
    if spp < 1:
        raise ImageError(path, f"corrupt TIFF (SamplesPerPixel = {spp})")
    bits = list(tags.get(258, [1]))
    formats = list(tags.get(339, [1]))
    bits = bits * spp if len(bits) == 1 else bits
    formats = formats * spp if len(formats) == 1 else formats
    if len(set(bits)) != 1 or len(set(formats)) != 1:
        raise _Unsupported(f"bands with different bit depths or sample formats ({bits}, {formats})")
    nbits, sample_format = int(bits[0]), int(formats[0])
    compression = int(_first(tags, 259, 1))
    photometric = _first(tags, 262)
    planar = int(_first(tags, 284, 1))
    predictor = int(_first(tags, 317, 1))

    if sample_format in (1, 4) and nbits in (8, 16, 32, 64):
        kind = "u"
    elif sample_format == 2 and nbits in (8, 16, 32, 64):
        kind = "i"
    elif sample_format == 3 and nbits in (16, 32, 64):
        kind = "f"
    else:
        raise _Unsupported(f"{nbits}-bit samples with SampleFormat {sample_format}")
    if photometric == 6:
        raise _Unsupported("YCbCr photometric interpretation")
    nbytes = nbits // 8
    file_dtype = np.dtype(f"{tiff.order}{kind}{nbytes}")
    if compression not in (1, 5, 8, 32946, 32773):
        name = _COMPRESSION_NAMES.get(compression, f"code {compression}")
        raise _Unsupported(f"compression {name}")
    if predictor not in (1, 2, 3):
        raise ImageError(path, f"unsupported TIFF predictor {predictor}")
    if predictor == 2 and kind == "f":
        raise ImageError(path, "unsupported TIFF: horizontal predictor (2) on floating-point samples")
    if predictor == 3 and kind != "f":
        raise ImageError(path, "unsupported TIFF: floating-point predictor (3) on integer samples")
    if planar not in (1, 2):
        raise ImageError(path, f"corrupt TIFF (PlanarConfiguration = {planar})")
    chunk_spp = spp if planar == 1 else 1
    planes = 1 if planar == 1 else spp

    if 322 in tags or 324 in tags:
        tile_w, tile_h = int(_first(tags, 322, 0)), int(_first(tags, 323, 0))
        offsets, counts = list(tags.get(324, [])), list(tags.get(325, []))
        if tile_w <= 0 or tile_h <= 0:
            raise ImageError(path, "corrupt TIFF (bad tile size)")
        across, down = -(-width // tile_w), -(-height // tile_h)
        per_plane = across * down
        layout = [(p, (i // across) * tile_h, (i % across) * tile_w, tile_h, tile_w)
                  for p in range(planes) for i in range(per_plane)]
        tiled = True
    else:
        rows_per_strip = int(_first(tags, 278, height))
        rows_per_strip = height if rows_per_strip <= 0 or rows_per_strip > height else rows_per_strip
        offsets, counts = list(tags.get(273, [])), list(tags.get(279, []))
        per_plane = -(-height // rows_per_strip)
        layout = [(p, i * rows_per_strip, 0, min(rows_per_strip, height - i * rows_per_strip), width)
                  for p in range(planes) for i in range(per_plane)]
        if not counts and compression == 1:  # some writers omit StripByteCounts for raw data
            counts = [rows * width * chunk_spp * nbytes for _, _, _, rows, _ in layout]
        tiled = False
    if len(offsets) < len(layout) or len(counts) < len(layout):
        raise ImageError(path, f"corrupt TIFF: {len(layout)} {'tiles' if tiled else 'strips'} expected, "
                               f"offsets for {len(offsets)} and byte counts for {len(counts)}")

    native = file_dtype.newbyteorder("=")
    out = np.empty((height, width, spp), dtype=native)
    for (plane, r0, c0, rows, cols), offset, count in zip(layout, offsets, counts):
        raw = tiff.read(int(offset), int(count))
        data = _decompress(raw, compression, path)
        # tiles are always full size; the last strip holds only the rows that are left
        chunk = _chunk_array(data, rows, cols, chunk_spp, file_dtype, predictor, path)
        r1, c1 = min(r0 + rows, height), min(c0 + cols, width)
        block = chunk[: r1 - r0, : c1 - c0]
        if planar == 1:
            out[r0:r1, c0:c1, :] = block
        else:
            out[r0:r1, c0:c1, plane] = block[:, :, 0]

    out = _apply_photometric(out, photometric, tags, spp)
    meta = {"format": "TIFF", "reader": "tiff", "compression": _COMPRESSION_NAMES.get(compression, str(compression)),
            "planar": planar, "tiled": tiled, "bigtiff": tiff.bigtiff, "predictor": predictor}
    return out, meta


def _chunk_array(data: bytes, rows: int, cols: int, spp: int, dtype: np.dtype, predictor: int,
                 path: Path) -> np.ndarray:
    needed = rows * cols * spp * dtype.itemsize
    if len(data) < needed:
        raise ImageError(path, f"truncated or corrupt TIFF data: a chunk holds {len(data)} bytes, {needed} expected")
    if predictor == 3:
        # Floating-point predictor: each row is byte planes (most significant first), differenced byte-wise with a
        # stride of one pixel's samples. Undo the differencing, then regroup the bytes into big-endian values.
        nbytes = dtype.itemsize
        buf = np.frombuffer(data, dtype=np.uint8, count=needed).reshape(rows, cols * nbytes, spp)
        buf = np.cumsum(buf, axis=1, dtype=np.uint8).reshape(rows, nbytes, cols * spp)
        values = np.ascontiguousarray(buf.transpose(0, 2, 1)).view(f">f{nbytes}")
        return values.reshape(rows, cols, spp).astype(dtype.newbyteorder("="))
    array = np.frombuffer(data, dtype=dtype, count=rows * cols * spp).reshape(rows, cols, spp)
    array = array.astype(dtype.newbyteorder("="))
    if predictor == 2:
        np.cumsum(array, axis=1, dtype=array.dtype, out=array)  # integer arithmetic wraps, as the predictor expects
    return array


def _decompress(raw: bytes, compression: int, path: Path) -> bytes:
    if compression == 1:
        return raw
    if compression in (8, 32946):
        try:
            d = zlib.decompressobj()
            return d.decompress(raw) + d.flush()
        except zlib.error as exc:
            raise ImageError(path, f"corrupt Deflate data in TIFF ({exc})") from None
    if compression == 32773:
        return _packbits_decode(raw)
    if compression == 5:
        return _lzw_decode(raw, path)
    raise _Unsupported(f"compression code {compression}")  # pragma: no cover - filtered earlier


def _packbits_decode(data: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        header = data[i]
        i += 1
        if header < 128:  # literal run of header + 1 bytes
            out += data[i:i + header + 1]
            i += header + 1
        elif header > 128:  # repeat the next byte 257 - header times
            if i < n:
                out += data[i:i + 1] * (257 - header)
            i += 1
        # 128 is a no-op
    return bytes(out)


def _lzw_decode(data: bytes, path: Path) -> bytes:
    """TIFF LZW (MSB-first codes, 9 to 12 bits, code width grows one code early as libtiff does)."""
    if data[:2] == b"\x00\x01":
        raise ImageError(path, "unsupported TIFF: old-style (pre-6.0) LZW compression")
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b"", b""]
    width, pos, total = 9, 0, len(data) * 8
    padded = data + b"\x00\x00\x00\x00"
    prev: bytes | None = None
    while pos + width <= total:
        byte = pos >> 3
        window = int.from_bytes(padded[byte:byte + 4], "big")
        code = (window >> (32 - width - (pos & 7))) & ((1 << width) - 1)
        pos += width
        if code == 256:  # clear
            del table[258:]
            width, prev = 9, None
            continue
        if code == 257:  # end of information
            break
        if prev is None:
            if code >= 256:
                raise ImageError(path, "corrupt LZW data in TIFF")
            entry = table[code]
        elif code < len(table):
            entry = table[code]
            if len(table) < 4096:
                table.append(prev + entry[:1])
        elif code == len(table):
            entry = prev + prev[:1]
            table.append(entry)
        else:
            raise ImageError(path, f"corrupt LZW data in TIFF (code {code} beyond table size {len(table)})")
        out += entry
        prev = entry
        if len(table) >= (1 << width) - 1 and width < 12:
            width += 1
    return bytes(out)


def _apply_photometric(out: np.ndarray, photometric: int | None, tags: dict[int, Any], spp: int) -> np.ndarray:
    if photometric == 3 and spp == 1 and 320 in tags and out.dtype.kind == "u":  # palette -> RGB (8-bit)
        cmap = np.asarray(tags[320], dtype=np.uint16)
        n = cmap.size // 3
        lut = (cmap.reshape(3, n).T >> 8).astype(np.uint8)
        index = np.clip(out[:, :, 0], 0, n - 1)
        return lut[index]
    if photometric == 0 and spp == 1 and out.dtype.kind == "u":  # WhiteIsZero -> BlackIsZero
        return np.iinfo(out.dtype).max - out
    extra = [int(v) for v in tags.get(338, [])]
    if extra and extra[-1] in (1, 2) and photometric in (0, 1, 2) and spp in (2, 4):  # drop alpha: LA -> L, RGBA -> RGB
        return out[:, :, :-1]
    return out
