"""Sensor-native arrays -> model input. The single place that does this, for training and inference alike.

:func:`prepare_image` takes an ``H x W x C`` array as :func:`rsvlm_edge.imageio.read_image` returns it (native dtype)
and gives ``float32 (C, size, size)``. It is deterministic (no randomness, percentiles over a fixed subsample) and
numpy + Pillow only.

Order of operations: band adaptation (per sensor) -> float32 -> invalid pixels (NaN/inf or ``nodata``) replaced by the
channel's median of valid pixels -> per-sensor scaling and normalisation at native resolution -> invalid pixels set
to 0 -> bilinear resize of each channel to ``size x size`` with Pillow ('F' mode). The aspect ratio is *not* kept:
boxes are normalised to 0..100 of width and height, so a square resize keeps them valid.

Per sensor (``rsvlm_edge.config.DEFAULT_SENSORS``):

``rgb`` (3 bands; a 1-band image is repeated to 3)
    ``uint8`` / 255; ``uint16`` / 65535, except 12-bit data (max < 4096), which is divided by its 99.5th percentile
    (over all bands, so colours keep their balance); other integers by their 99.5th percentile; floats are taken as
    reflectance in [0, 1] unless they clearly are not (99.5th percentile > 1.5: then / 255 when the maximum is at
    most 255, else / 65535). Clipped to [0, 1], then SigLIP normalisation ``(x - 0.5) / 0.5`` -> [-1, 1].
``sar`` (2 bands, e.g. VV, VH; 1 band is duplicated; a grey image saved as RGB is reduced to one band)
    Backscatter in dB. Float data with negative values is taken as dB already. Non-negative float data and integer
    data other than ``uint8`` are linear intensity: ``10 * log10(max(x, 1e-6))``. ``uint8`` SAR is a display product
    (already log-stretched quicklooks, e.g. HRSID PNGs), so 0..255 maps linearly onto the dB window. Then clipped to
    [-30, +10] dB and mapped linearly to [-1, 1].
``ir`` (1 band; 3 or 4 channel IR PNGs are averaged over their first 3 channels)
    ``uint8`` / 255; everything else a robust 1-99 % percentile stretch (float data already in [0, 1] is kept).
    Clipped to [0, 1], then ``(x - 0.5) / 0.5``.
``ms`` (12 bands, Sentinel-2 order B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B11, B12 -- BigEarthNet / L2A order)
    A 13-band L1C stack (B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12) loses B10 (cirrus, index 10).
    Integer data is reflectance x 10000 (a processing-baseline >= 04.00 offset of -1000 must be removed before);
    float data whose 99th percentile is at most 2 is reflectance already. Reflectance is clipped to [0, 1.5] and
    normalised as ``(r - 0.3) / 0.3``: typical land reflectance (0..0.6) lands in [-1, 1], bright clouds and snow
    up to +4.

Models converted from SigLIP-based checkpoints (RSUniVLM) name another ``mode`` in their config's
``image_preprocess``, and get exactly what their reference computes (RSUniVLM's ``SigLipImageProcessor``):

``siglip-square``
    8-bit RGB -> Pillow ``resize((size, size), BICUBIC)`` on the uint8 image (antialiased, rounded back to uint8)
    -> ``x * (1/255)`` in float64, cast to float32 -> ``(x - 0.5) / 0.5``. The aspect ratio is not kept.
``siglip-pad``
    The same after LLaVA's ``expand2square``: the image centred on a square of grey (127, 127, 127).

These models were trained on 8-bit RGB only, so anything else is refused, not guessed at: 16-bit and float data
(pick a stretch and convert to 8 bits first, e.g. ``gdal_translate -ot Byte -scale``), 2 or more than 3 bands
(SAR, multispectral). A 1-band 8-bit image is grey and becomes RGB by repeating it, as Pillow's ``convert("RGB")``
in the reference's image loading does. ``nodata`` is not used: the reference has no notion of it.
"""

from __future__ import annotations

import os

import numpy as np

from rsvlm_edge.config import DEFAULT_SENSORS
from rsvlm_edge.imageio import resize_band

#: SigLIP-style normalisation of [0, 1] data (rgb, ir).
MEAN, STD = 0.5, 0.5
#: SAR dB window mapped to [-1, 1].
SAR_DB_MIN, SAR_DB_MAX = -30.0, 10.0
#: Multispectral: reflectance = DN / MS_SCALE_DN, clipped to [0, MS_REFLECTANCE_MAX], then (r - MS_OFFSET) / MS_SPREAD.
MS_SCALE_DN, MS_REFLECTANCE_MAX, MS_OFFSET, MS_SPREAD = 10000.0, 1.5, 0.3, 0.3
#: Sentinel-2 band names of the 12-band ``ms`` input and of a 13-band L1C stack.
MS_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
MS_BANDS_L1C = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
L1C_CIRRUS_INDEX = 10

#: ``image_preprocess`` modes of SigLIP-based converted models (RSUniVLM); "rsvlm" is everything above.
SIGLIP_MODES = ("siglip-square", "siglip-pad")
#: expand2square's fill: LLaVA passes ``int(mean * 255)`` for SigLIP's mean 0.5.
SIGLIP_PAD_GREY = (127, 127, 127)

#: Percentiles are computed on at most this many values (a fixed stride subsample: deterministic and fast).
_PERCENTILE_SAMPLE = 1 << 18


class PreprocessError(ValueError):
    """An array cannot be turned into model input (wrong band count for the sensor, no valid pixels, ...)."""


# --------------------------------------------------------------------------------------------------- public API


def guess_sensor(array: np.ndarray, mode: str = "rsvlm") -> str:
    """The sensor :func:`explain_sensor` guesses (its reason dropped)."""
    return explain_sensor(array, mode)[0]


#: A 3-channel picture whose channels differ by less than this (mean, as a fraction of the 8-bit range) is grey:
#: infrared and SAR quicklooks saved as RGB; colour aerial photos are several times above it.
GREY_CHROMA = 0.006
#: A grey picture whose mean pixel-to-pixel difference is above this fraction of its mean brightness has SAR's
#: speckle; thermal infrared is smooth (well below it).
SAR_SPECKLE = 0.11


def explain_sensor(array: np.ndarray, mode: str = "rsvlm") -> tuple[str, str]:
    """``(sensor, reason)``: 3 bands -> rgb, unless the picture is grey (then sar when speckled, else ir); 2 -> sar;
    1 -> ir (sar when float with negative values, i.e. dB); >= 4 -> ms. Models with a SigLIP ``mode`` read RGB
    only: always rgb (:func:`prepare_image` then says what is wrong with other data)."""
    if mode in SIGLIP_MODES:
        return "rgb", f"this model reads RGB only (image_preprocess {mode})"
    a = np.asarray(array)
    bands = 1 if a.ndim == 2 else a.shape[-1]
    if bands in (3, 4):
        grey = _grey_picture(a)
        if grey is not None:
            speckled = _speckle(grey) > SAR_SPECKLE
            kind = "sar" if speckled else "ir"
            texture = "speckled (SAR-like)" if speckled else "smooth (infrared-like)"
            return kind, f"{bands} channels of one grey picture, {texture}"
        return ("rgb", "3 bands") if bands == 3 else ("ms", "4 bands")
    if bands == 2:
        return "sar", "2 bands"
    if bands == 1:
        if a.dtype.kind == "f":
            finite = a[np.isfinite(a)]
            if finite.size and float(finite.min()) < 0:
                return "sar", "1 float band with negative values (dB)"
        return "ir", "1 band"
    return "ms", f"{bands} bands"


def _grey_picture(a: np.ndarray) -> np.ndarray | None:
    """The grey channel of a 3/4-channel image whose colour channels (nearly) agree and that is not flat, else None."""
    sample = a.reshape(-1, a.shape[-1])[:, :3]
    if sample.shape[0] > _PERCENTILE_SAMPLE:
        sample = sample[:: -(-sample.shape[0] // _PERCENTILE_SAMPLE)]
    x = sample.astype(np.float32)
    top = 255.0 if a.dtype == np.uint8 else float(np.nanmax(np.abs(x))) or 1.0
    chroma = float(np.nanmean(np.abs(x[:, 0] - x[:, 1]) + np.abs(x[:, 1] - x[:, 2]))) / 2 / top
    if chroma > GREY_CHROMA or float(np.nanstd(x[:, 0])) == 0.0:
        return None
    return np.asarray(a[..., 0], dtype=np.float32)


def _speckle(grey: np.ndarray) -> float:
    """Mean absolute difference of horizontal neighbours over the mean brightness."""
    g = grey.reshape(grey.shape[0], -1) if grey.ndim >= 2 else grey[None, :]
    if g.shape[1] < 2:
        return 0.0
    mean = float(np.nanmean(np.abs(g)))
    return float(np.nanmean(np.abs(np.diff(g, axis=1)))) / mean if mean > 0 else 0.0


def prepare_for_model(array: np.ndarray, sensor: str | None, size: int, *, nodata: float | None = None,
                      source: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """:func:`prepare_image` with the sensor guessed when ``sensor`` is None. Returns ``(pixels, sensor)``."""
    chosen = sensor or guess_sensor(array)
    return prepare_image(array, chosen, size, nodata=nodata, source=source), chosen


def prepare_image(array: np.ndarray, sensor: str, size: int, *, nodata: float | None = None,
                  source: str | os.PathLike | None = None, mode: str = "rsvlm") -> np.ndarray:
    """Sensor-native ``H x W x C`` (or ``H x W``) array -> float32 ``(C, size, size)``; see the module docstring.

    ``mode`` is the model config's ``image_preprocess``. ``source`` (the file the array came from) is named in the
    errors that depend on the pixels."""
    if mode in SIGLIP_MODES:
        if sensor != "rgb":
            raise PreprocessError(f"this model reads 8-bit RGB images only (image_preprocess {mode}), not sensor "
                                  f"{sensor!r}")
        return prepare_siglip(array, size, pad=mode == "siglip-pad", source=source)
    if mode != "rsvlm":
        raise PreprocessError(f"unknown image_preprocess {mode!r}; choose one of rsvlm, {', '.join(SIGLIP_MODES)}")
    if sensor not in DEFAULT_SENSORS:
        raise PreprocessError(f"unknown sensor {sensor!r}; choose one of {', '.join(DEFAULT_SENSORS)}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise PreprocessError(f"size must be a positive integer, got {size!r}")
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise PreprocessError(f"expected an HxWxC image array, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0 or a.shape[2] == 0:
        raise PreprocessError(f"empty image array of shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise PreprocessError(f"unsupported image dtype {a.dtype}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255

    a = _adapt_bands(a, sensor)
    x, invalid = _fill_invalid(a, nodata, source)
    kind = a.dtype
    if sensor == "rgb":
        x = _normalise_rgb(x, kind)
    elif sensor == "sar":
        x = _normalise_sar(x, kind)
    elif sensor == "ir":
        x = _normalise_ir(x, kind)
    else:
        x = _normalise_ms(x, kind)
    if invalid is not None:
        x[invalid] = 0.0
    out = np.empty((x.shape[2], size, size), dtype=np.float32)
    for c in range(x.shape[2]):
        out[c] = resize_band(x[:, :, c], size, size)
    return out


def prepare_siglip(array: np.ndarray, size: int, *, pad: bool = False,
                   source: str | os.PathLike | None = None) -> np.ndarray:
    """8-bit RGB ``H x W x 3`` (or grey ``H x W``) -> float32 ``(3, size, size)`` as RSUniVLM's
    SigLipImageProcessor computes it (``siglip-square``; ``pad``: ``siglip-pad``). See the module docstring."""
    from PIL import Image

    where = f" ({source})" if source is not None else ""
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise PreprocessError(f"size must be a positive integer, got {size!r}")
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or 0 in a.shape:
        raise PreprocessError(f"expected a non-empty HxWx3 image array{where}, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise PreprocessError(f"this model was trained on 8-bit RGB images; the image{where} is {a.dtype}: convert "
                              f"it to 8 bits with the stretch you want first (e.g. gdal_translate -ot Byte -scale)")
    bands = a.shape[2]
    if bands == 1:
        a = np.repeat(a, 3, axis=2)  # grey -> RGB, as Pillow's convert("RGB")
    elif bands != 3:
        raise PreprocessError(f"this model reads 8-bit RGB images; the image{where} has {bands} bands (SAR, "
                              f"infrared and multispectral data are not something it was trained on)")
    image = Image.fromarray(np.ascontiguousarray(a), "RGB")
    if pad:
        image = expand2square(image, SIGLIP_PAD_GREY)
    image = image.resize((int(size), int(size)), Image.Resampling.BICUBIC, reducing_gap=None)
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescale: float64 product
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def expand2square(image, fill: tuple[int, int, int]):
    """LLaVA's ``expand2square``: ``image`` centred (offset rounded down) on a square canvas of colour ``fill``."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# --------------------------------------------------------------------------------------------------- bands


def to_single_band(array: np.ndarray) -> np.ndarray:
    """``H x W x 1`` in the input dtype: the mean of the first 3 channels (rounded for integers); a grey image stored
    as RGB(A) gives its first channel exactly. This is how ``ir`` treats 3-channel IR pictures."""
    a = np.asarray(array)
    if a.ndim == 2:
        return a[:, :, None]
    if a.shape[2] == 1:
        return a
    if _is_grey(a):
        return a[:, :, :1].copy()
    mean = a[:, :, :3].astype(np.float32).mean(axis=2, keepdims=True)
    if a.dtype.kind in "ui":
        return np.rint(mean).astype(a.dtype)
    return mean.astype(a.dtype)


def _band_hint(bands: int) -> str:
    if bands in (12, 13):
        return "; pass --sensor ms"
    if bands == 2:
        return "; pass --sensor sar"
    if bands == 3:
        return "; pass --sensor rgb"
    if bands == 1:
        return "; pass --sensor ir (or sar for dB data)"
    return ""


def _is_grey(a: np.ndarray) -> bool:
    """A grey image stored as RGB(A): the first three channels are identical."""
    return a.shape[2] in (3, 4) and bool(np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 0], a[:, :, 2]))


def _adapt_bands(a: np.ndarray, sensor: str) -> np.ndarray:
    bands = a.shape[2]
    if sensor == "rgb":
        if bands == 3:
            return a
        if bands == 1:
            return np.repeat(a, 3, axis=2)
        raise PreprocessError(f"sensor 'rgb' expects 3 bands, the image has {bands}{_band_hint(bands)}")
    if sensor == "sar":
        if bands == 2:
            return a
        if bands == 1 or _is_grey(a):
            return np.repeat(a[:, :, :1], 2, axis=2)
        raise PreprocessError(f"sensor 'sar' expects 2 bands (VV, VH) or 1, the image has {bands}{_band_hint(bands)}")
    if sensor == "ir":
        if bands == 1:
            return a
        if bands in (3, 4):
            return to_single_band(a)
        raise PreprocessError(f"sensor 'ir' expects 1 band (or a 3-channel IR picture), the image has "
                              f"{bands}{_band_hint(bands)}")
    # ms
    if bands == 12:
        return a
    if bands == 13:
        return np.delete(a, L1C_CIRRUS_INDEX, axis=2)
    stack = "; band files of one scene are stacked by `rsvlm-edge scene FILES|DIR --bands s2-l2a`" if bands < 4 else ""
    raise PreprocessError(f"sensor 'ms' expects 12 Sentinel-2 bands ({', '.join(MS_BANDS)}) or 13 (L1C, B10 is "
                          f"dropped), the image has {bands}{_band_hint(bands)}{stack}")


# --------------------------------------------------------------------------------------------------- invalid pixels


def _fill_invalid(a: np.ndarray, nodata: float | None,
                  source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 copy with NaN/inf and nodata pixels replaced by the channel median of valid pixels (+ the mask)."""
    x = a.astype(np.float32)
    invalid = None
    if a.dtype.kind == "f":
        invalid = ~np.isfinite(x)
    if nodata is not None and not np.isnan(float(nodata)):
        value = float(nodata)
        if a.dtype.kind in "ui":
            hit = a == int(value) if value.is_integer() else np.zeros(a.shape, dtype=bool)
        else:
            hit = a == np.asarray(value, dtype=a.dtype)  # compare in the array's precision (float32 nodata tags)
        invalid = hit if invalid is None else invalid | hit
    if invalid is None or not invalid.any():
        return x, None
    if invalid.all():
        where = f": {source}" if source is not None else ""
        raise PreprocessError(f"the image has no valid pixels (all NaN, infinite or nodata){where}")
    for c in range(x.shape[2]):
        bad = invalid[:, :, c]
        if bad.any():
            good = x[:, :, c][~bad]
            x[:, :, c][bad] = _median(good) if good.size else 0.0
    return x, invalid


def _subsample(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1)
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // _PERCENTILE_SAMPLE)]
    return flat


def _median(values: np.ndarray) -> float:
    return float(np.median(_subsample(values)))


def _percentile(values: np.ndarray, q: float | list[float]):
    return np.percentile(_subsample(values), q)


# --------------------------------------------------------------------------------------------------- per sensor


def _siglip(x: np.ndarray) -> np.ndarray:
    np.clip(x, 0.0, 1.0, out=x)
    x -= MEAN
    x /= STD
    return x


def _normalise_rgb(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        x /= 255.0
    elif dtype.kind in "ui":
        top = float(x.max())
        if top < 4096 or dtype not in (np.uint16, np.int16):  # 12-bit data (or wider integers): robust scale
            scale = float(_percentile(x, 99.5)) or top or 1.0
        else:
            scale = 65535.0 if dtype == np.uint16 else 32767.0
        np.maximum(x, 0.0, out=x)
        x /= scale
    else:
        if float(_percentile(x, 99.5)) > 1.5:  # integer-scaled data stored as float
            x /= 255.0 if float(x.max()) <= 255.0 else 65535.0
    return _siglip(x)


def _normalise_sar(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:  # display-scaled quicklook: 0..255 spans the dB window
        x *= (SAR_DB_MAX - SAR_DB_MIN) / 255.0
        x += SAR_DB_MIN
    elif dtype.kind in "ui" or float(x.min()) >= 0.0:  # linear intensity -> dB
        np.maximum(x, 1e-6, out=x)
        np.log10(x, out=x)
        x *= 10.0
    np.clip(x, SAR_DB_MIN, SAR_DB_MAX, out=x)
    x -= SAR_DB_MIN
    x *= 2.0 / (SAR_DB_MAX - SAR_DB_MIN)
    x -= 1.0
    return x


def _normalise_ir(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        x /= 255.0
    elif dtype.kind == "f" and float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
        pass
    else:
        lo, hi = (float(v) for v in _percentile(x, [1.0, 99.0]))
        x -= lo
        if hi > lo:
            x /= hi - lo
    return _siglip(x)


def _normalise_ms(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui" or float(_percentile(x, 99.0)) > 2.0:
        x /= MS_SCALE_DN
    np.clip(x, 0.0, MS_REFLECTANCE_MAX, out=x)
    x -= MS_OFFSET
    x /= MS_SPREAD
    return x
