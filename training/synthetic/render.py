"""Sensor renderers: one :class:`~rsvlm_edge.training.synthetic.scene.Scene` to sensor-native arrays (``rgb``
uint8 HxWx3, ``sar`` float32 dB HxWx2 VV/VH, ``ir`` uint8 HxWx1, ``ms`` uint16 HxWx12 Sentinel-2-like reflectance
x 10000).

Each renderer draws its noise from a generator seeded by the scene's ``noise_seed`` and the sensor, never from the
caller's: rendering a scene again, or for another sensor, gives the same arrays and leaves the caller's draws alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from rsvlm_edge.training.synthetic.geometry import _erode, _scale, _smooth
from rsvlm_edge.training.synthetic.scene import Scene, SceneObject, _union
from rsvlm_edge.training.synthetic.vocab import _N_LC, _SENSOR_INDEX, LC, OBJ, OBJECT_CLASSES, SENSORS

# Farmland pixels take one of _LEVELS crop/soil mixes (from Scene.parcels): the renderers look every pixel up in
# per-class tables indexed by _class_index(), land cover 0.._N_LC-1, then farmland levels, then object classes.
_LEVELS = 16
_FARM0 = _N_LC
_OBJ0 = _N_LC + _LEVELS


def _table(landcover: np.ndarray, fallow: np.ndarray, objects: np.ndarray | None = None) -> np.ndarray:
    """Rows per class index: land cover, farmland crop->fallow mixes, then objects (when given)."""
    crop = landcover[LC["farmland"]]
    mix = (np.arange(_LEVELS, dtype=np.float32) + 0.5)[:, None] / _LEVELS
    rows = [landcover, crop * (1 - mix) + fallow * mix]
    if objects is not None:
        rows.append(objects)
    return np.concatenate(rows).astype(np.float32)


def _class_index(scene: Scene, objects: Sequence[SceneObject] = ()) -> np.ndarray:
    """uint8 HxW index into the renderer tables (farmland split by parcel mix; ``objects`` painted on top)."""
    lc = scene.landcover
    level = (scene.parcels * (_LEVELS - 1e-3)).astype(np.uint8)
    idx = np.where(lc == LC["farmland"], level + np.uint8(_FARM0), lc)
    for o in objects:
        idx[o.slices][o.patch] = _OBJ0 + OBJ[o.label]
    return idx


_RGB = _table(np.array([[38, 66, 98], [42, 82, 44], [118, 140, 70], [150, 138, 126], [160, 160, 164], [178, 158, 122],
                        [92, 92, 96]]), np.array([160, 130, 92]))
_RGB_LF = _table(np.array([0.10, 0.25, 0.15, 0.15, 0.10, 0.15, 0.05])[:, None], np.array([0.15]))[:, 0]  # brightness
_RGB_HF = _table(np.array([3.0, 14.0, 6.0, 14.0, 9.0, 7.0, 4.0])[:, None], np.array([6.0]))[:, 0]  # pixel noise sigma
_OBJ_RGB = {
    "building": np.array([[170, 80, 60], [190, 190, 185], [120, 120, 125], [210, 200, 180], [90, 110, 130]], np.float32),
    "vehicle": np.array([[200, 30, 30], [230, 230, 235], [30, 30, 35], [40, 70, 170], [200, 200, 60]], np.float32),
    "ship": np.array([[225, 225, 220], [190, 195, 200], [160, 60, 50]], np.float32),
    "plane": np.array([[228, 228, 232], [205, 210, 215]], np.float32),
    "storage tank": np.array([[232, 232, 226], [200, 200, 196]], np.float32),
}
_TALL = ("building", "storage tank", "plane")


def _render_rng(scene: Scene, sensor: str) -> np.random.Generator:
    return np.random.default_rng([scene.noise_seed, _SENSOR_INDEX[sensor]])


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def render_optical(scene: Scene) -> np.ndarray:
    """uint8 HxWx3: class colours, field patterns, texture noise, rotated objects with shadows."""
    rng = _render_rng(scene, "rgb")
    size = scene.size
    idx = _class_index(scene)
    img = np.take(_RGB, idx, axis=0)
    lf = _smooth(rng, size, 9)[0] - np.float32(0.5)
    hf = rng.standard_normal((size, size), dtype=np.float32)
    img *= (1 + 2 * np.take(_RGB_LF, idx) * lf)[..., None]
    img += (hf * np.take(_RGB_HF, idx))[..., None]
    d = max(1, round(2 * _scale(size)))
    tall = _union(scene.objects, _TALL, size)
    every = _union(scene.objects, OBJECT_CLASSES, size)
    img[_shift(tall, d, d) & ~every] *= np.float32(0.5)
    for o in scene.objects:
        palette = _OBJ_RGB[o.label]
        pick = o.tone * len(palette)
        colour = palette[int(pick)] * np.float32(0.9 + 0.2 * (pick % 1.0))
        view = img[o.slices]
        view[o.patch] = colour + rng.standard_normal((o.area, 1), dtype=np.float32) * np.float32(4.0)
        if o.label == "storage tank":  # a darker rim makes the circle read as a tank roof
            view[o.patch & ~_erode(o.patch)] *= np.float32(0.8)
    img *= np.float32(rng.uniform(0.9, 1.1))
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


#: Mean backscatter (dB) per class index: land cover, farmland (crop -> bare), objects; columns VV, VH.
_SAR = _table(np.array([[-22.0, -29.0], [-9.0, -15.0], [-12.0, -18.0], [-5.0, -12.0], [-3.5, -11.0], [-16.0, -24.0],
                        [-19.0, -27.0]]), np.array([-15.0, -23.0]),
              np.array([[3.0, -5.0], [1.0, -7.0], [4.0, -4.0], [2.0, -6.0], [5.0, -3.0]]))  # OBJECT_CLASSES order
SAR_LOOKS = 4.0
_BANK = 1 << 20


@lru_cache(maxsize=1)
def _speckle_bank() -> np.ndarray:
    """2^20 draws of L-look speckle in dB: 10 log10(G / L), G ~ Gamma(L, 1). Multiplicative speckle is additive in dB;
    each image takes a window at a random offset of this fixed bank (one gamma draw per pixel costs ~10x more)."""
    g = np.random.default_rng(20_240_601).standard_gamma(SAR_LOOKS, size=_BANK, dtype=np.float32)
    bank = np.float32(10.0) * np.log10(g / np.float32(SAR_LOOKS))
    bank.setflags(write=False)
    return bank


def _speckle_db(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if n > _BANK // 2:
        g = rng.standard_gamma(SAR_LOOKS, size=shape, dtype=np.float32)
        return np.float32(10.0) * np.log10(g / np.float32(SAR_LOOKS))
    start = int(rng.integers(0, _BANK - n))
    return _speckle_bank()[start:start + n].reshape(shape)


def render_sar(scene: Scene) -> np.ndarray:
    """float32 HxWx2 backscatter in dB (VV, VH): water dark, vegetation mid, built-up and metal objects bright, VH below
    VV, with ``SAR_LOOKS``-look gamma speckle and radar shadows behind tall objects (range direction +x)."""
    rng = _render_rng(scene, "sar")
    size = scene.size
    db = np.take(_SAR, _class_index(scene, scene.objects), axis=0)
    db += ((_smooth(rng, size, 8)[0] - np.float32(0.5)) * np.float32(3.0))[..., None]
    d = max(1, round(2 * _scale(size)))
    db[_shift(_union(scene.objects, _TALL, size), 0, d) & ~_union(scene.objects, OBJECT_CLASSES, size)] = (-24.0, -30.0)
    db += _speckle_db(rng, db.shape)
    return np.clip(db, -40.0, 15.0, out=db)


_IR = _table(np.array([70.0, 95.0, 110.0, 150.0, 165.0, 140.0, 150.0])[:, None], np.array([130.0]),
             np.array([175.0, 240.0, 225.0, 195.0, 185.0])[:, None])[:, 0]


def render_infrared(scene: Scene) -> np.ndarray:
    """uint8 HxWx1 thermal image: water cool, vegetation mild, built-up warm, vehicles and ships hot blobs."""
    rng = _render_rng(scene, "ir")
    size = scene.size
    img = np.take(_IR, _class_index(scene, scene.objects))
    img += (_smooth(rng, size, 6)[0] - np.float32(0.5)) * np.float32(20.0) + np.float32(rng.uniform(-15, 15))
    for o in scene.objects:  # each object a little warmer or cooler
        img[o.slices][o.patch] += np.float32(16.0 * (o.tone - 0.5))
    blurred = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8)).filter(ImageFilter.BoxBlur(1))
    out = np.asarray(blurred, np.float32) + rng.standard_normal((size, size), dtype=np.float32) * np.float32(2.5)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)[..., None]


# Surface reflectance (0..1) per Sentinel-2 band B1..B12 (without B10), per class index.
_MS = _table(np.array([
    [0.060, 0.055, 0.045, 0.030, 0.022, 0.016, 0.013, 0.011, 0.009, 0.006, 0.004, 0.003],  # water
    [0.025, 0.030, 0.050, 0.028, 0.085, 0.230, 0.280, 0.300, 0.310, 0.300, 0.150, 0.070],  # forest
    [0.040, 0.050, 0.085, 0.060, 0.130, 0.260, 0.310, 0.340, 0.350, 0.320, 0.220, 0.120],  # farmland (crop)
    [0.100, 0.110, 0.120, 0.135, 0.150, 0.170, 0.180, 0.190, 0.200, 0.190, 0.220, 0.190],  # residential
    [0.130, 0.140, 0.160, 0.170, 0.180, 0.190, 0.200, 0.210, 0.210, 0.200, 0.240, 0.220],  # industrial
    [0.100, 0.120, 0.160, 0.210, 0.240, 0.260, 0.270, 0.280, 0.290, 0.280, 0.340, 0.290],  # bare
    [0.080, 0.090, 0.100, 0.110, 0.120, 0.120, 0.130, 0.130, 0.130, 0.120, 0.140, 0.130],  # road
]), np.array([0.08, 0.10, 0.13, 0.17, 0.20, 0.22, 0.23, 0.24, 0.25, 0.24, 0.30, 0.26]),  # fallow soil
    np.array([np.linspace(0.28, 0.32, 12), np.full(12, 0.15), np.full(12, 0.22), np.full(12, 0.40), np.full(12, 0.45)]))


def render_multispectral(scene: Scene) -> np.ndarray:
    """uint16 HxWx12 reflectance x 10000 (Sentinel-2 bands :data:`MS_BANDS`); vegetation bright in NIR (B8).
    Vehicles are below the resolution and not drawn."""
    rng = _render_rng(scene, "ms")
    size = scene.size
    refl = np.take(_MS, _class_index(scene, scene.visible("ms")), axis=0)
    gain = 1 + (_smooth(rng, size, 8)[0] - np.float32(0.5)) * np.float32(0.2)
    gain += rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.03)
    refl *= gain[..., None]
    noise = rng.standard_normal((size, size, 1, 3), dtype=np.float32) * np.float32(0.004)
    refl.reshape(size, size, 4, 3)[...] += noise  # band noise, shared by bands 3 apart (cheap, still per band)
    refl *= np.float32(10000.0)
    return np.clip(refl, 0, 65535, out=refl).astype(np.uint16)


RENDERERS = {"rgb": render_optical, "sar": render_sar, "ir": render_infrared, "ms": render_multispectral}


def render(scene: Scene, sensor: str) -> np.ndarray:
    try:
        return RENDERERS[sensor](scene)
    except KeyError:
        raise ValueError(f"unknown sensor {sensor!r}; choose from {', '.join(SENSORS)}") from None
