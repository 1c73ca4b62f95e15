"""Reading images for the runtime with maintained decoders: Pillow and rasterio (GDAL). No torch.

Every reader returns an ``H x W x C`` array in the file's native dtype (``uint8``, ``uint16``, ``int16``,
``float32`` ...); nothing is rescaled here, :mod:`rsvlm_edge.preprocess` does that.

The decoder is chosen from the file's first bytes, never from its name (PNG bytes named ``.tif`` read as a PNG):

* TIFF / GeoTIFF / BigTIFF and JPEG 2000 go to rasterio (GDAL): every compression GDAL knows (Deflate, LZW,
  PackBits, JPEG, ZSTD, LERC, WebP ...), predictors, strips and tiles, interleaved or band planes, any number of
  bands. ``nodata``, ``crs`` and ``transform`` come from the file. Palette images become RGB, alpha bands are dropped,
  1-bit images become 0/255.
* 16-bit colour PNGs (RGB, RGBA, grey + alpha) also go to GDAL's PNG driver: Pillow reduces them to 8 bits.
* PNG, JPEG, GIF, BMP and WebP go to Pillow: palette and CMYK/YCbCr images become RGB, alpha is dropped
  (RGBA -> RGB, LA -> L), 16-bit greyscale stays ``uint16``. Pillow's other formats are not opened (some of them
  run external programs); neither is anything else.
* Memory is bounded before any pixel is decoded: the header gives the size, and a file whose decode would need more
  than ``max_bytes`` (see :data:`DEFAULT_MAX_BYTES`) is refused. Pillow's own decompression-bomb limit
  (``PIL.Image.MAX_IMAGE_PIXELS``) still applies to the formats Pillow reads.
* Errors are :class:`ImageError` (a ``ValueError``) with the path in the message: missing file, corrupt or
  truncated data, unsupported format, zero-size or oversize images.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence, TypedDict

import numpy as np

#: Default cap on the memory one decode may need, in bytes: the returned array plus the decoder's working copy
#: (Pillow's image, or GDAL's largest block). 1 GiB holds the largest ordinary tile with room to spare: four
#: Sentinel-2 10 m bands of a full 10980 x 10980 granule as ``uint16`` are 919 MiB, a 10000 x 10000 16-bit RGB PNG
#: is 572 MiB. Preprocessing adds float32 copies of roughly twice the array, so a decode at the cap stays within
#: a few GiB of peak memory, which an 8 GB Jetson holds. Anything larger is a whole scene, which is read window by
#: window rather than whole, or a decompression bomb: a few hundred KB of Deflate can claim gigabytes.
DEFAULT_MAX_BYTES = 1 << 30

#: GDAL's block cache while reading, in MB. GDAL's default (5% of RAM) would keep a second copy of a large image's
#: blocks alive next to the returned array; a small cache keeps the peak near the array's size (and is faster).
GDAL_CACHE_MB = 64

#: Formats Pillow may open. The rest of Pillow's plugins are not needed here (EPS, for one, runs Ghostscript).
PILLOW_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")

# first bytes -> format (the JPEG 2000 entries: the JP2 box container and a bare codestream)
_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
          (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"),
          (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"))
_GDAL_DRIVERS = {"GTiff": "TIFF", "JP2OpenJPEG": "JPEG2000", "PNG": "PNG"}


class ImageInfo(TypedDict, total=False):
    """Metadata returned next to the pixels by :func:`read_image_with_meta` (a plain dict at runtime)."""

    nodata: float | None  # the file's nodata value (GeoTIFF / JPEG 2000), else None
    format: str  # "TIFF", "JPEG2000", "PNG", "JPEG", "GIF", ...
    reader: str  # "rasterio" or "pillow"
    width: int
    height: int
    bands: int
    dtype: str
    mode: str  # Pillow mode before conversion (Pillow reader only)
    compression: str | None  # GDAL reader: deflate, lzw, packbits, jpeg, ... (None when uncompressed)
    interleave: str | None  # GDAL reader: "pixel" or "band"
    crs: str | None  # GDAL reader: the coordinate reference system (e.g. "EPSG:32633"), None if absent
    transform: tuple[float, ...] | None  # GDAL reader: affine (a, b, c, d, e, f) pixel -> CRS, None if absent


class ImageError(ValueError):
    """An image cannot be read: missing, corrupt, truncated, unsupported, empty or too large."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.reason = message
        super().__init__(f"{message}: {path}" if path is not None else message)


# --------------------------------------------------------------------------------------------------- public API


def read_image(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """``H x W x C`` array in the file's native dtype. See the module docstring for the conversions."""
    return read_image_with_meta(path, max_bytes=max_bytes)[0]


def read_image_with_meta(path: str | os.PathLike, *,
                         max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, ImageInfo]:
    """``(array, meta)``; ``meta`` always has ``nodata`` (float or None), ``format``, ``reader``, ``width``,
    ``height``, ``bands`` and ``dtype``; see :class:`ImageInfo` for the rest."""
    path = Path(path)
    head = _head(path)
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    try:
        if kind == "TIFF":
            array, meta = _read_gdal(path, "GTiff", max_bytes)
        elif kind == "JPEG2000":
            array, meta = _read_gdal(path, "JP2OpenJPEG", max_bytes)
        elif kind == "PNG" and _png_needs_gdal(path, head):
            array, meta = _read_gdal(path, "PNG", max_bytes)
        else:
            array, meta = _read_pillow(path, kind, max_bytes)
    except MemoryError:
        raise ImageError(path, "not enough memory to decode the image (lower the load or max_bytes)") from None
    if array.ndim == 2:
        array = array[:, :, None]
    array = np.ascontiguousarray(array)
    info: ImageInfo = {"nodata": meta.pop("nodata", None), **meta}  # type: ignore[typeddict-item]
    info["height"], info["width"], info["bands"] = (int(v) for v in array.shape)
    info["dtype"] = str(array.dtype)
    return array, info


def read_band_stack(paths: Sequence[str | os.PathLike], *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Stack single-band files (BigEarthNet keeps each Sentinel-2 band in its own .tif) into ``H x W x N``.

    Bands are resampled to the size of the largest one with Pillow's bilinear filter (on float32) and cast back to
    the common dtype (integers rounded and clipped to the dtype's range). Multi-band files contribute all their
    bands, in order. ``max_bytes`` applies to each file.
    """
    paths = list(paths)
    if not paths:
        raise ImageError(None, "read_band_stack needs at least one file")
    arrays = [read_image(p, max_bytes=max_bytes) for p in paths]
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


# --------------------------------------------------------------------------------------------------- checks


def _head(path: Path) -> bytes:
    """The first 32 bytes (enough to tell the formats apart), after the checks that need no decoder."""
    if not path.exists():
        raise ImageError(path, "image file not found")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise ImageError(path, f"cannot open image file ({exc.strerror or exc})") from None
    if not head:
        raise ImageError(path, "empty file (0 bytes), not an image")
    return head


def _png_needs_gdal(path: Path, head: bytes) -> bool:
    """True for PNGs with 16-bit RGB, RGBA or grey + alpha samples, which Pillow would reduce to 8 bits (IHDR:
    width, height, bit depth, colour type). Zero-size PNGs are refused here: Pillow would call them unrecognised."""
    if len(head) < 26 or head[12:16] != b"IHDR":
        return False
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0:
        raise ImageError(path, f"zero-size image ({width}x{height})")
    return depth == 16 and colour in (2, 4, 6)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _check_budget(path: Path, width: int, height: int, bands: int, dtype: Any, max_bytes: int,
                  working: int) -> None:
    """Refuse zero-size images, and images whose decode needs more than ``max_bytes``: the output array
    (``width x height x bands x itemsize``) plus ``working``, the decoder's own copy."""
    if width <= 0 or height <= 0 or bands <= 0:
        raise ImageError(path, f"zero-size image ({width}x{height}, {bands} bands)")
    dtype = np.dtype(dtype)
    decoded = width * height * bands * dtype.itemsize
    if decoded + working > max_bytes:
        raise ImageError(path, f"image too large: {width}x{height} x {bands} bands of {dtype} = {_mib(decoded)} "
                               f"decoded (+{_mib(working)} decoder buffer), more than max_bytes = {_mib(max_bytes)}")


# --------------------------------------------------------------------------------------------------- rasterio (GDAL)


def _read_gdal(path: Path, driver: str, max_bytes: int) -> tuple[np.ndarray, dict[str, Any]]:
    import rasterio
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path, driver=driver) as ds:
                return _read_dataset(path, ds, max_bytes)
        except (RasterioError, CPLE_BaseError) as exc:
            raise ImageError(path, f"cannot decode image ({_gdal_message(exc)})") from None


def _gdal_message(exc: BaseException) -> str:
    """GDAL's own words: rasterio wraps them ("Read failed. See previous exception for details.")."""
    while exc.__cause__ is not None or (exc.__context__ is not None and "previous exception" in str(exc)):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_dataset(path: Path, ds: Any, max_bytes: int) -> tuple[np.ndarray, dict[str, Any]]:
    from rasterio.enums import ColorInterp

    if len(set(ds.dtypes)) > 1:
        raise ImageError(path, f"unsupported image: bands of different types ({', '.join(sorted(set(ds.dtypes)))})")
    dtype = np.dtype(ds.dtypes[0]) if ds.count else np.dtype(np.uint8)
    interp = list(ds.colorinterp)
    one_bit = ds.count == 1 and ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "1"
    palette = ds.count == 1 and interp[0] == ColorInterp.palette and not one_bit  # GDAL gives 1-bit a 2-entry table
    keep = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha] or list(range(1, ds.count + 1))
    pixel_interleaved = ds.interleaving is not None and ds.interleaving.value == "PIXEL"
    block_h, block_w = ds.block_shapes[0] if ds.count else (0, 0)
    block = block_h * block_w * dtype.itemsize * (ds.count if pixel_interleaved else 1)
    out_bands = 3 if palette else len(keep)
    _check_budget(path, ds.width, ds.height, out_bands, dtype, max_bytes,
                  working=block + (ds.width * ds.height if palette else 0))

    out = np.empty((ds.height, ds.width, len(keep)), dtype=dtype)
    ds.read(keep, out=out.transpose(2, 0, 1))  # GDAL writes straight into the pixel-interleaved array
    if palette:
        out = _expand_palette(ds.colormap(1), out[:, :, 0])
    elif one_bit:  # 0/1 -> 0/255 as Pillow gives 1-bit images; GDAL's 2-entry table says which value is white
        colours = ds.colormap(1) if interp[0] == ColorInterp.palette else {1: (255,)}
        white = 1 if colours.get(1, (255,))[0] else 0
        out[:] = np.where(out == white, 255, 0)

    transform = tuple(ds.transform)[:6] if not ds.transform.is_identity else None
    meta = {"format": _GDAL_DRIVERS.get(ds.driver, ds.driver), "reader": "rasterio", "nodata": ds.nodata,
            "compression": ds.compression.value.lower() if ds.compression is not None else None,
            "interleave": ds.interleaving.value.lower() if ds.interleaving is not None else None,
            "crs": ds.crs.to_string() if ds.crs else None, "transform": transform}
    return out, meta


def _expand_palette(colormap: dict[int, tuple[int, ...]], index: np.ndarray) -> np.ndarray:
    lut = np.zeros((max(int(index.max(initial=0)), max(colormap, default=0)) + 1, 3), dtype=np.uint8)
    for value, rgba in colormap.items():
        lut[value] = rgba[:3]
    return lut[index]


# --------------------------------------------------------------------------------------------------- Pillow


def _read_pillow(path: Path, kind: str | None, max_bytes: int) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, ImageMode, UnidentifiedImageError

    decode_errors = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, zlib.error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.init()  # registers the WebP plugin (and JPEG's MPO variant) that formats= names
        try:
            image = Image.open(path, formats=PILLOW_FORMATS)
        except UnidentifiedImageError:
            if kind is not None:  # the signature is right, the header is not
                raise ImageError(path, f"corrupt {kind} file (its header cannot be parsed)") from None
            raise ImageError(path, "unsupported or unrecognised image format (PNG, JPEG, GIF, BMP, WebP, TIFF and "
                                   "JPEG 2000 are read)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(path, f"image too large for Pillow ({exc})") from None
        except decode_errors as exc:
            raise _pillow_error(path, exc, "corrupt image file") from None
        with image:
            width, height = image.size
            mode = ImageMode.getmode(image.mode)
            out_bands, out_dtype = _pillow_output(image.mode)
            # Pillow keeps multi-band 8-bit images at 4 bytes per pixel
            per_pixel = 4 if len(mode.bands) > 1 else np.dtype(mode.typestr).itemsize
            _check_budget(path, width, height, out_bands, out_dtype, max_bytes, working=width * height * per_pixel)
            try:
                image.load()
                array = _pillow_to_array(image)
            except Image.DecompressionBombError as exc:
                raise ImageError(path, f"image too large for Pillow ({exc})") from None
            except decode_errors as exc:
                truncated = "truncated" in str(exc) or isinstance(exc, EOFError)
                raise _pillow_error(path, exc, "truncated image data" if truncated else "corrupt image data") from None
            meta = {"format": image.format or "unknown", "reader": "pillow", "mode": image.mode}
    return array, meta


def _pillow_error(path: Path, exc: BaseException, what: str) -> ImageError:
    text = str(exc) or type(exc).__name__
    if "MAX_TEXT" in text:  # a zTXt/iTXt chunk that inflates past PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY
        return ImageError(path, f"PNG text chunk too large to read safely ({text})")
    return ImageError(path, f"{what} ({text})")


def _pillow_output(mode: str) -> tuple[int, Any]:
    """Bands and dtype :func:`_pillow_to_array` returns for a Pillow mode."""
    if mode in ("1", "L", "LA", "La"):
        return 1, np.uint8
    if mode == "F":
        return 1, np.float32
    if mode.startswith("I"):
        return 1, np.uint16 if mode.startswith("I;16") else np.int32
    return 3, np.uint8


def pillow_to_array(image: Any) -> np.ndarray:
    """An in-memory Pillow image as the readers return a decoded file: HxW or HxWxC, mode conversions as above
    (alpha dropped, palette and CMYK to RGB, ``I;16`` as ``uint16``, ``F`` as ``float32``)."""
    return _pillow_to_array(image)


def _pillow_to_array(image: Any) -> np.ndarray:
    """Pillow image -> HxW(xC) array with the mode conversions of the module docstring."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("L", "F", "RGB") or mode.startswith("I"):
        array = np.asarray(image)
        if mode == "I" and image.format == "PNG":  # some Pillow versions open 16-bit greyscale PNGs as 32-bit 'I'
            array = array.astype(np.uint16)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
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
