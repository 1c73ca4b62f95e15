"""Deterministic synthetic multi-sensor remote-sensing scenes and instruction samples for every task.

A :class:`Scene` is sensor independent: a land-cover label map (:data:`LANDCOVER_CLASSES`) plus objects
(:data:`OBJECT_CLASSES`), each with a position, size, heading and instance mask. Four renderers turn the same scene
into sensor-native arrays (``rgb`` uint8 HxWx3, ``sar`` float32 dB HxWx2 VV/VH, ``ir`` uint8 HxWx1, ``ms`` uint16
HxWx12 Sentinel-2-like reflectance x 10000), and task emitters turn a scene (or a before/after change pair) into a
:class:`~rsvlm_edge.training.sample.Sample` whose answer is rendered with :mod:`rsvlm_edge.formats` and whose
``target`` holds the structured truth for the metrics.

Everything is drawn from a caller-supplied :class:`numpy.random.Generator`; renderers use the scene's own
``noise_seed``, so the same seed always gives identical arrays and texts.

Usage::

    gen = SyntheticGenerator(size=128, seed=0)
    sample = gen.sample()                      # task and sensor from the mixtures below
    sample = gen.sample("[VG]", sensor="sar")
    samples = generate(100, seed=1, tasks=["[CAP]", "[CLS]"])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rsvlm_edge.config import DEFAULT_SENSORS
from rsvlm_edge.formats import (
    format_box,
    format_detections,
    format_mask,
    format_obb,
    format_oriented_detections,
    mask_to_grid,
    parse_box,
    parse_obbs,
)
from rsvlm_edge.tasks import TAGS, normalize_tag
from rsvlm_edge.training.sample import Sample

# --------------------------------------------------------------------------------------------------- vocabulary

#: Land-cover classes of the label map (index = value in :attr:`Scene.landcover`).
LANDCOVER_CLASSES: tuple[str, ...] = ("water", "forest", "farmland", "residential", "industrial", "bare", "road")
#: Object classes (labels used in detection, grounding and segmentation answers).
OBJECT_CLASSES: tuple[str, ...] = ("building", "vehicle", "ship", "plane", "storage tank")
#: Scene classes of [CLS] answers (each scene is generated from the recipe of one of them).
SCENE_CLASSES: tuple[str, ...] = ("forest", "farmland", "residential", "industrial", "river", "lake", "airport",
                                  "harbor", "bare land", "parking lot")
SENSORS: tuple[str, ...] = tuple(DEFAULT_SENSORS)
SENSOR_BANDS: dict[str, int] = DEFAULT_SENSORS
#: Sentinel-2 band names of the 12 multispectral channels, in order.
MS_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
#: Label of the changed cells in a two-image [SEG] (change mask) answer.
CHANGE_LABEL = "change"

#: Share of each task when ``sample()`` gets no task.
TASK_MIXTURE: dict[str, float] = {"[CAP]": 0.12, "[VQA]": 0.16, "[CLS]": 0.10, "[VG]": 0.13, "[REF]": 0.10,
                                  "[SEG]": 0.13, "[CCD]": 0.06, "[DET]": 0.12, "[OBB]": 0.08}
#: Share of each sensor when ``sample()`` gets no sensor (every task is emitted for every sensor).
SENSOR_MIXTURE: dict[str, float] = {"rgb": 0.55, "sar": 0.17, "ir": 0.12, "ms": 0.16}
#: Share of [SEG] samples that are two-image change masks.
CHANGE_SEG_SHARE = 0.25

#: What each sensor shows. Vehicles are below the multispectral resolution (not rendered there); SAR and IR
#: questions and masks stick to land cover they separate (water, vegetation, built-up).
SENSOR_OBJECTS: dict[str, tuple[str, ...]] = {
    "rgb": OBJECT_CLASSES, "sar": OBJECT_CLASSES, "ir": OBJECT_CLASSES,
    "ms": ("building", "ship", "plane", "storage tank"),
}
SENSOR_LANDCOVER: dict[str, tuple[str, ...]] = {
    "rgb": LANDCOVER_CLASSES, "ms": LANDCOVER_CLASSES,
    "sar": ("water", "forest", "residential", "industrial"), "ir": ("water", "forest", "residential", "industrial"),
}
SENSOR_SCENES: dict[str, tuple[str, ...]] = {s: SCENE_CLASSES for s in SENSORS}
SENSOR_SCENES["ms"] = tuple(c for c in SCENE_CLASSES if c != "parking lot")
#: Objects the [DET] prompt "Detect all hot targets." asks for on infrared images.
HOT_TARGETS: tuple[str, ...] = ("vehicle", "ship")

LC = {name: i for i, name in enumerate(LANDCOVER_CLASSES)}
OBJ = {name: i for i, name in enumerate(OBJECT_CLASSES)}
_N_LC = len(LANDCOVER_CLASSES)
_SENSOR_INDEX = {s: i for i, s in enumerate(SENSORS)}

PLURALS = {"building": "buildings", "vehicle": "vehicles", "ship": "ships", "plane": "planes",
           "storage tank": "storage tanks"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LC_WORDS = {"water": "water", "forest": "forest", "farmland": "farmland", "residential": "residential area",
            "industrial": "industrial area", "bare": "bare land", "road": "roads"}
LC_SEG_WORDS = {"water": "the water", "forest": "the forest", "farmland": "the farmland",
                "residential": "the residential area", "industrial": "the industrial area", "bare": "the bare land",
                "road": "the roads"}
LC_AREA_WORDS = {"water": "water area", "forest": "forest area", "farmland": "farmland area",
                 "residential": "residential area", "industrial": "industrial area", "bare": "bare land area",
                 "road": "road area"}
LC_ARTICLE_WORDS = {"water": "water", "forest": "forest", "farmland": "farmland", "residential": "a residential area",
                    "industrial": "an industrial area", "bare": "bare land", "road": "a road"}
#: The land-cover class a scene class is named after (captions do not repeat it).
SCENE_LANDCOVER = {"forest": "forest", "farmland": "farmland", "residential": "residential", "industrial": "industrial",
                   "bare land": "bare"}
SCENE_PHRASES = {"forest": "a forest", "farmland": "farmland", "residential": "a residential area",
                 "industrial": "an industrial area", "river": "a river", "lake": "a lake", "airport": "an airport",
                 "harbor": "a harbor", "bare land": "bare land", "parking lot": "a parking lot"}

# --------------------------------------------------------------------------------------------------- scene model


@dataclass(eq=False)
class SceneObject:
    """One object. ``cx, cy, length, width`` in pixels; ``heading`` in degrees (0 = +x, 90 = +y, image y down)
    along ``length``. The footprint is ``patch``, a tight bool crop whose top-left pixel is (``x0``, ``y0``) in an
    image of ``image_size`` pixels; :attr:`mask` gives it as a full HxW bool array."""

    label: str
    cx: float
    cy: float
    length: float
    width: float
    heading: float
    patch: np.ndarray
    x0: int
    y0: int
    image_size: int
    size_rank: float = 0.5  # 0 = smallest of its class's size range, 1 = largest
    tone: float = 0.5  # material in [0, 1): picks roof / paint colour and temperature, the same in every image

    @property
    def slices(self) -> tuple[slice, slice]:
        h, w = self.patch.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

    @property
    def mask(self) -> np.ndarray:
        out = np.zeros((self.image_size, self.image_size), bool)
        out[self.slices] = self.patch
        return out

    @property
    def area(self) -> int:
        return int(self.patch.sum())

    @property
    def box_px(self) -> tuple[int, int, int, int]:
        """Tight pixel box of the footprint, half-open: (x1, y1, x2, y2)."""
        h, w = self.patch.shape
        return self.x0, self.y0, self.x0 + w, self.y0 + h

    def box(self, size: int | None = None) -> tuple[int, int, int, int]:
        """The box in 0..100 units exactly as the answer text carries it."""
        k = 100.0 / (size or self.image_size)
        return parse_box(format_box(tuple(v * k for v in self.box_px)))

    def obb(self, size: int | None = None) -> tuple[int, int, int, int, int]:
        """(cx, cy, w, h, angle) in 0..100 units, ``w`` along the heading, as the answer text carries it."""
        k = 100.0 / (size or self.image_size)
        return parse_obbs(format_obb((self.cx * k, self.cy * k, self.length * k, self.width * k, self.heading)))[0]


@dataclass(eq=False)
class Scene:
    """A sensor-independent scene: ``landcover`` uint8 HxW (indices into LANDCOVER_CLASSES) plus objects."""

    size: int
    scene_class: str
    landcover: np.ndarray
    objects: list[SceneObject]
    noise_seed: int
    parcels: np.ndarray  # float32 HxW in [0, 1]: crop (0) .. fallow soil (1), used on farmland pixels
    _fractions: np.ndarray | None = field(default=None, repr=False, compare=False)

    def fractions(self) -> dict[str, float]:
        if self._fractions is None:
            self._fractions = np.bincount(self.landcover.ravel(), minlength=_N_LC) / self.landcover.size
        return {name: float(self._fractions[i]) for i, name in enumerate(LANDCOVER_CLASSES)}

    def visible(self, sensor: str) -> list[SceneObject]:
        keep = SENSOR_OBJECTS[sensor]
        return [o for o in self.objects if o.label in keep]

    def semantic(self, sensor: str = "rgb") -> np.ndarray:
        """uint8 HxW: land cover ``i`` -> i + 1, object class ``j`` -> N_LC + 1 + j (objects on top)."""
        sem = self.landcover + np.uint8(1)
        for o in self.visible(sensor):
            sem[o.slices][o.patch] = _N_LC + 1 + OBJ[o.label]
        return sem

    @staticmethod
    def semantic_names() -> dict[int, str]:
        names = {i + 1: n for i, n in enumerate(LANDCOVER_CLASSES)}
        names.update({_N_LC + 1 + j: n for j, n in enumerate(OBJECT_CLASSES)})
        return names


@dataclass(eq=False)
class ChangePair:
    """Before/after scenes, the pixel change mask, caption references and what changed."""

    before: Scene
    after: Scene
    mask: np.ndarray  # bool HxW
    captions: list[str]
    kind: str  # "appear" | "disappear" | "landcover" | "none"
    count: int = 0  # buildings that appeared / disappeared


# --------------------------------------------------------------------------------------------------- noise helpers


@lru_cache(maxsize=64)
def _interp(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix (align corners)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2) if n_in > 1 else np.zeros(n_out, int)
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m


@lru_cache(maxsize=16)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth(rng: np.random.Generator, size: int, grid: int, k: int = 1) -> np.ndarray:
    """(k, size, size) float32 smooth noise in [0, 1] from a bilinearly upsampled ``grid`` x ``grid`` lattice."""
    m = _interp(size, grid)
    coarse = rng.random((k, grid, grid), dtype=np.float32)
    return m @ coarse @ m.T


def _scale(size: int) -> float:
    return size / 128.0


# --------------------------------------------------------------------------------------------------- land cover


def _blobs(rng: np.random.Generator, size: int, weights: dict[str, float], grid: int = 4) -> np.ndarray:
    """Voronoi-like land cover: argmax over classes of weight x smooth noise."""
    names = list(weights)
    w = np.array([weights[n] for n in names], np.float32)[:, None, None]
    field_ = _smooth(rng, size, grid, len(names)) * w
    out = np.full((size, size), LC[names[0]], np.uint8)
    best = field_[0]
    for k in range(1, len(names)):  # running argmax: much faster than argmax over the leading axis
        win = field_[k] > best
        out[win] = LC[names[k]]
        best = np.maximum(best, field_[k])
    return out


def _line_dist(size: int, px: float, py: float, angle: float) -> np.ndarray:
    """Distance of every pixel centre to the line through (px, py) with direction ``angle`` (degrees)."""
    yy, xx = _coords(size)
    t = math.radians(angle)
    return np.abs(-(xx - px) * math.sin(t) + (yy - py) * math.cos(t))


def _add_road(lc: np.ndarray, rng: np.random.Generator, angle: float | None = None, width: float | None = None,
              through: tuple[float, float] | None = None) -> float:
    size = lc.shape[0]
    s = _scale(size)
    angle = float(rng.choice([0.0, 90.0]) + rng.uniform(-20, 20)) if angle is None else angle
    width = max(2.0, rng.uniform(3.0, 4.5) * s) if width is None else width
    px, py = through if through is not None else rng.uniform(0.2, 0.8, 2) * size
    lc[_line_dist(size, px, py, angle) < width / 2] = LC["road"]
    return angle


def _add_river(lc: np.ndarray, rng: np.random.Generator) -> None:
    size = lc.shape[0]
    yy, xx = _coords(size)
    along, across = (yy, xx) if rng.random() < 0.5 else (xx, yy)
    width = rng.uniform(0.12, 0.22) * size
    centre = (rng.uniform(0.3, 0.7) * size + rng.uniform(-0.25, 0.25) * (along - size / 2)
              + rng.uniform(0.04, 0.1) * size * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * along / size
                                                       + rng.uniform(0, 2 * np.pi)))
    lc[np.abs(across - centre) < width / 2] = LC["water"]


def _add_lake(lc: np.ndarray, rng: np.random.Generator) -> None:
    size = lc.shape[0]
    yy, xx = _coords(size)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    rx, ry = rng.uniform(0.22, 0.34, 2) * size
    wobble = _smooth(rng, size, 5)[0] - 0.5
    lc[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + 0.9 * wobble < 1.0] = LC["water"]


def _add_coast(lc: np.ndarray, rng: np.random.Generator) -> None:
    """Water on one side (harbor): a half-plane with a gently wavy shoreline."""
    size = lc.shape[0]
    yy, xx = _coords(size)
    side = int(rng.integers(4))
    along, across = [(xx, yy), (xx, size - yy), (yy, xx), (yy, size - xx)][side]
    shore = rng.uniform(0.3, 0.5) * size + 0.04 * size * np.sin(2 * np.pi * along / size * rng.uniform(0.5, 2)
                                                                + rng.uniform(0, 2 * np.pi))
    lc[across < shore] = LC["water"]


def _parcels(rng: np.random.Generator, size: int) -> np.ndarray:
    """Rectangular fields: per-field crop/soil mix, float32 HxW in [0, 1]."""
    nx, ny = rng.integers(3, 7, 2)
    cx = np.sort(rng.uniform(0, size, nx - 1))
    cy = np.sort(rng.uniform(0, size, ny - 1))
    ix = np.searchsorted(cx, np.arange(size) + 0.5)
    iy = np.searchsorted(cy, np.arange(size) + 0.5)
    values = rng.random((ny, nx), dtype=np.float32) ** 1.5
    return values[iy[:, None], ix[None, :]]


# --------------------------------------------------------------------------------------------------- objects

# (length range, width range) in pixels at 128 px; plane width = wing span.
_DIMS = {
    "building": ((9.0, 20.0), (8.0, 15.0)),
    "vehicle": ((10.0, 13.0), (6.0, 7.0)),
    "ship": ((16.0, 30.0), (6.0, 9.0)),
    "plane": ((18.0, 28.0), (17.0, 27.0)),
    "storage tank": ((9.0, 18.0), (9.0, 18.0)),
}
_ALLOWED = {
    "building": ("residential", "industrial", "farmland", "bare"),
    "vehicle": ("road", "industrial", "residential"),
    "ship": ("water",),
    "plane": ("bare", "industrial", "road"),
    "storage tank": ("industrial", "bare"),
}


def _frame(cx: float, cy: float, heading: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = math.radians(heading)
    u = np.array([math.cos(t), math.sin(t)])
    v = np.array([-math.sin(t), math.cos(t)])
    return np.array([cx, cy]), u, v


def _shape_polygons(label: str, cx: float, cy: float, length: float, width: float, heading: float) -> list[np.ndarray]:
    """Polygons (k, 2) in pixel units whose union is the object's footprint."""
    c, u, v = _frame(cx, cy, heading)

    def poly(points: Sequence[tuple[float, float]]) -> np.ndarray:
        return np.array([c + a * u + b * v for a, b in points])

    half_l, half_w = length / 2, width / 2
    if label == "ship":
        bow = half_l - min(width, length * 0.3)
        return [poly([(-half_l, -half_w), (bow, -half_w), (half_l, 0.0), (bow, half_w), (-half_l, half_w)])]
    if label == "plane":
        body = max(1.5, length * 0.075)
        chord = length * 0.13
        tail = half_w * 0.38
        return [
            poly([(-half_l, -body), (half_l - body, -body), (half_l, 0.0), (half_l - body, body), (-half_l, body)]),
            poly([(chord, -body), (-chord * 0.6, -half_w), (-chord * 1.6, -half_w), (-chord, -body),
                  (-chord, body), (-chord * 1.6, half_w), (-chord * 0.6, half_w), (chord, body)]),
            poly([(-half_l * 0.72, -body), (-half_l * 0.95, -tail), (-half_l, -tail), (-half_l, tail),
                  (-half_l * 0.95, tail), (-half_l * 0.72, body)]),
        ]
    return [poly([(-half_l, -half_w), (half_l, -half_w), (half_l, half_w), (-half_l, half_w)])]


def _rasterize(label: str, cx: float, cy: float, length: float, width: float, heading: float
               ) -> tuple[np.ndarray, int, int] | None:
    """Tight bool footprint crop and its top-left pixel (x0, y0); None when nothing is covered.

    Pixel (i, j) covers [j, j+1) x [i, i+1); PIL fills integer pixel centres, hence the half-pixel shift.
    """
    r = 0.5 * math.hypot(length, width) + 2
    ox, oy = math.floor(cx - r), math.floor(cy - r)
    n = math.ceil(2 * r) + 2
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    if label == "storage tank":
        rad = length / 2
        draw.ellipse([cx - rad - ox, cy - rad - oy, cx + rad - ox - 1, cy + rad - oy - 1], fill=1)
    else:
        for p in _shape_polygons(label, cx, cy, length, width, heading):
            draw.polygon([(float(x) - ox - 0.5, float(y) - oy - 0.5) for x, y in p], fill=1)
    crop = np.asarray(img) != 0
    rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
    if rows.size == 0:
        return None
    return crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], ox + int(cols[0]), oy + int(rows[0])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary dilation, ``steps`` times, same shape (pixels pushed past the border are lost)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outside the array counts as background)."""
    out = mask.copy()
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    out[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return out


def _padded(mask: np.ndarray, g: int) -> np.ndarray:
    out = np.zeros((mask.shape[0] + 2 * g, mask.shape[1] + 2 * g), bool)
    out[g:g + mask.shape[0], g:g + mask.shape[1]] = mask
    return out


def _paint(target: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    """target |= patch placed at (x0, y0), clipped to target."""
    h, w = patch.shape
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(target.shape[0], y0 + h), min(target.shape[1], x0 + w)
    if ya < yb and xa < xb:
        target[ya:yb, xa:xb] |= patch[ya - y0:yb - y0, xa - x0:xb - x0]


def _union(objects: Sequence[SceneObject], labels: Sequence[str], size: int) -> np.ndarray:
    out = np.zeros((size, size), bool)
    for o in objects:
        if o.label in labels:
            out[o.slices] |= o.patch
    return out


_DIRECTED = ("ship", "plane", "vehicle")


class _Placer:
    """Places non-overlapping objects (with a small gap) on allowed land cover."""

    def __init__(self, lc: np.ndarray, objects: Sequence[SceneObject] = ()):
        self.lc = lc
        self.size = lc.shape[0]
        self.occupied = np.zeros(lc.shape, bool)
        self.objects: list[SceneObject] = []
        self.gap = max(1, round(2 * _scale(self.size)))
        for o in objects:
            self._occupy(o)

    def _occupy(self, o: SceneObject) -> None:
        self.objects.append(o)
        g = self.gap
        _paint(self.occupied, _dilate(_padded(o.patch, g), g), o.x0 - g, o.y0 - g)

    def place(self, rng: np.random.Generator, label: str, n: int, heading: float | None = None,
              near: tuple[float, float, float] | None = None, tries: int = 25) -> list[SceneObject]:
        """Up to ``n`` objects; ``heading`` fixes the orientation (+-4 degrees); ``near`` = (x, y, radius)."""
        size, s = self.size, _scale(self.size)
        lut = np.zeros(_N_LC, bool)
        lut[[LC[c] for c in _ALLOWED[label]]] = True
        allowed = np.take(lut, self.lc)
        if near is not None:
            yy, xx = _coords(size)
            allowed &= (xx - near[0]) ** 2 + (yy - near[1]) ** 2 < near[2] ** 2
        candidates = np.flatnonzero(allowed)
        placed: list[SceneObject] = []
        if candidates.size == 0:
            return placed
        (l0, l1), (w0, w1) = _DIMS[label]
        need = 0.97 if label == "ship" else 0.85
        for _ in range(n):
            for _ in range(tries):
                cy, cx = divmod(int(candidates[rng.integers(candidates.size)]), size)
                cx, cy = cx + float(rng.random()), cy + float(rng.random())
                if self.occupied[int(cy), int(cx)]:
                    continue
                rank = float(rng.random())
                length = max(4.0, (l0 + rank * (l1 - l0)) * s)
                width = length if label == "storage tank" else max(4.0, float(rng.uniform(w0, w1)) * s)
                if label == "building" and width > length:
                    length, width = width, length
                if label == "storage tank":
                    head = 0.0
                elif heading is None:
                    head = float(rng.uniform(0, 360))
                else:
                    head = heading + float(rng.uniform(-4, 4)) + (180.0 if rng.random() < 0.5 else 0.0)
                head = head % 360.0 if label in _DIRECTED else (head + 90.0) % 180.0 - 90.0
                radius = 0.5 * math.hypot(length, width) + 1
                if not (radius <= cx <= size - radius and radius <= cy <= size - radius):
                    continue
                # cheap pre-check at the four corners before rasterising
                _, u, v = _frame(cx, cy, head)
                corners = [(int(cx + a * u[0] + b * v[0]), int(cy + a * u[1] + b * v[1]))
                           for a in (-0.4 * length, 0.4 * length) for b in (-0.4 * width, 0.4 * width)]
                if (sum(not allowed[y, x] for x, y in corners) > (0 if label == "ship" else 1)
                        or any(self.occupied[y, x] for x, y in corners)):
                    continue
                raster = _rasterize(label, cx, cy, length, width, head)
                if raster is None:
                    continue
                patch, x0, y0 = raster
                h, w = patch.shape
                area = int(patch.sum())
                window = (slice(y0, y0 + h), slice(x0, x0 + w))
                if (area < 8 or np.any(self.occupied[window] & patch)
                        or np.count_nonzero(allowed[window] & patch) < need * area):
                    continue
                obj = SceneObject(label, cx, cy, length, width, head, patch, x0, y0, size, rank, float(rng.random()))
                self._occupy(obj)
                placed.append(obj)
                break
        return placed


def _n(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def make_scene(rng: np.random.Generator, size: int = 128, scene_class: str | None = None) -> Scene:
    """A random scene of ``scene_class`` (random when None). At most 8 objects."""
    if scene_class is None:
        scene_class = SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    if scene_class not in SCENE_CLASSES:
        raise ValueError(f"unknown scene class {scene_class!r}; choose from {', '.join(SCENE_CLASSES)}")
    grid = int(rng.integers(3, 6))
    road_angle: float | None = None
    if scene_class == "forest":
        lc = _blobs(rng, size, {"forest": 1.0, "farmland": 0.5, "bare": 0.4}, grid)
        if rng.random() < 0.5:
            road_angle = _add_road(lc, rng)
    elif scene_class == "farmland":
        lc = _blobs(rng, size, {"farmland": 1.0, "forest": 0.5, "residential": 0.35}, grid)
        if rng.random() < 0.6:
            road_angle = _add_road(lc, rng)
    elif scene_class == "residential":
        lc = _blobs(rng, size, {"residential": 1.0, "forest": 0.45, "farmland": 0.4}, grid)
        road_angle = float(rng.uniform(-15, 15))
        spacing = rng.uniform(0.35, 0.55) * size
        for k in range(-2, 3):
            off = size / 2 + k * spacing + rng.uniform(-5, 5)
            if 0 < off < size:
                _add_road(lc, rng, road_angle, through=(size / 2, off))
        _add_road(lc, rng, road_angle + 90.0, through=(rng.uniform(0.3, 0.7) * size, size / 2))
    elif scene_class == "industrial":
        lc = _blobs(rng, size, {"industrial": 1.0, "bare": 0.5, "residential": 0.3}, grid)
        road_angle = _add_road(lc, rng)
        if rng.random() < 0.5:
            _add_road(lc, rng, road_angle + 90.0)
    elif scene_class == "river":
        lc = _blobs(rng, size, {"forest": 1.0, "farmland": 0.9, "residential": 0.5}, grid)
        _add_river(lc, rng)
    elif scene_class == "lake":
        lc = _blobs(rng, size, {"forest": 1.0, "farmland": 0.7, "bare": 0.4}, grid)
        _add_lake(lc, rng)
    elif scene_class == "airport":
        lc = _blobs(rng, size, {"bare": 1.0, "industrial": 0.55, "farmland": 0.4}, grid)
        road_angle = _add_road(lc, rng, width=rng.uniform(7.0, 9.0) * _scale(size))
    elif scene_class == "harbor":
        lc = _blobs(rng, size, {"industrial": 1.0, "residential": 0.5, "bare": 0.4}, grid)
        _add_coast(lc, rng)
    elif scene_class == "bare land":
        lc = _blobs(rng, size, {"bare": 1.0, "farmland": 0.4, "forest": 0.3}, grid)
        if rng.random() < 0.3:
            road_angle = _add_road(lc, rng)
    else:  # parking lot: paved area with rows of vehicles
        lc = _blobs(rng, size, {"industrial": 1.0, "residential": 0.4, "forest": 0.3}, grid)
        road_angle = _add_road(lc, rng)

    own = SCENE_LANDCOVER.get(scene_class)
    if own is not None and int(np.argmax(np.bincount(lc.ravel(), minlength=_N_LC))) != LC[own]:
        return make_scene(rng, size, scene_class)  # rare (< 1%): the scene must be dominated by its class
    placer = _Placer(lc)
    if scene_class in ("forest", "bare land"):
        placer.place(rng, "building", _n(rng, 0, 2))
        placer.place(rng, "vehicle", _n(rng, 0, 1), heading=road_angle)
    elif scene_class == "farmland":
        placer.place(rng, "building", _n(rng, 0, 3))
        placer.place(rng, "vehicle", _n(rng, 0, 2), heading=road_angle)
    elif scene_class == "residential":
        placer.place(rng, "building", _n(rng, 3, 6), heading=road_angle if rng.random() < 0.7 else None)
        placer.place(rng, "vehicle", _n(rng, 0, 2), heading=road_angle)
    elif scene_class == "industrial":
        placer.place(rng, "storage tank", _n(rng, 1, 4))
        placer.place(rng, "building", _n(rng, 1, 3), heading=road_angle)
        placer.place(rng, "vehicle", _n(rng, 0, 2), heading=road_angle)
    elif scene_class in ("river", "lake"):
        placer.place(rng, "ship", _n(rng, 0, 3 if scene_class == "river" else 2))
        placer.place(rng, "building", _n(rng, 0, 2))
    elif scene_class == "airport":
        placer.place(rng, "plane", _n(rng, 1, 4))
        placer.place(rng, "building", _n(rng, 0, 2))
        placer.place(rng, "vehicle", _n(rng, 0, 2))
    elif scene_class == "harbor":
        placer.place(rng, "ship", _n(rng, 2, 5))
        placer.place(rng, "storage tank", _n(rng, 0, 2))
        placer.place(rng, "building", _n(rng, 0, 1))
    else:
        heading = float(rng.choice([0.0, 90.0]) + rng.uniform(-10, 10))
        placer.place(rng, "vehicle", _n(rng, 4, 8), heading=heading)
    objects = placer.objects[:8]
    return Scene(size, scene_class, lc, objects, int(rng.integers(2**31 - 1)), _parcels(rng, size))


# --------------------------------------------------------------------------------------------------- change pairs

_LC_TRANSITIONS = (("forest", "farmland"), ("farmland", "residential"), ("bare", "industrial"), ("farmland", "bare"),
                   ("forest", "bare"), ("bare", "residential"))


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _things(label: str, n: int) -> str:
    if n == 1:
        return f"an {label}" if label[0] in "aeiou" else f"a {label}"
    return f"{_count_word(n)} {PLURALS.get(label, label + 's')}"


def make_change_pair(rng: np.random.Generator, size: int = 128) -> ChangePair:
    """Before/after scenes: buildings appear or disappear, a land-cover region changes, or nothing changes."""
    for _ in range(20):
        kind = str(rng.choice(["appear", "disappear", "landcover", "none"], p=[0.35, 0.25, 0.25, 0.15]))
        base_class = str(rng.choice(["residential", "farmland", "industrial", "bare land", "forest"]))
        before = make_scene(rng, size, base_class)
        after_seed = int(rng.integers(2**31 - 1))
        if kind == "none":
            after = replace(before, noise_seed=after_seed, objects=list(before.objects))
            refs = ["no change", "there is no change", "nothing has changed", "the scene is unchanged"]
            return ChangePair(before, after, np.zeros((size, size), bool), refs, "none")
        anchor = rng.uniform(0.2, 0.8, 2) * size
        if kind == "appear":
            k = _n(rng, 1, 4)
            placer = _Placer(before.landcover, before.objects)
            new = placer.place(rng, "building", k, near=(anchor[0], anchor[1], 0.22 * size))
            if not new or len(before.objects) + len(new) > 8:
                continue
            after = replace(before, noise_seed=after_seed, objects=before.objects + new)
            mask = _union(new, ("building",), size)
            n = len(new)
            pos = _position_phrase(*_centroid(mask), size)
            what = _things("building", n)
            first = "a new building" if n == 1 else f"{_count_word(n)} new buildings"
            refs = [f"{first} appeared {pos}", f"{what} {'was' if n == 1 else 'were'} built {pos}",
                    f"{what} {'has' if n == 1 else 'have'} been constructed {pos}",
                    f"{'a new building appears' if n == 1 else 'new buildings appear'} {pos}"]
            return ChangePair(before, after, mask, refs, kind, n)
        if kind == "disappear":
            buildings = [o for o in before.objects if o.label == "building"]
            if not buildings:
                continue
            buildings.sort(key=lambda o: (o.cx - anchor[0]) ** 2 + (o.cy - anchor[1]) ** 2)
            gone = [o for o in buildings[:_n(rng, 1, 3)]
                    if (o.cx - buildings[0].cx) ** 2 + (o.cy - buildings[0].cy) ** 2 < (0.3 * size) ** 2]
            lc_after = before.landcover.copy()
            mask = _union(gone, ("building",), size)
            lc_after[mask] = LC["bare"]
            after = replace(before, noise_seed=after_seed, landcover=lc_after,
                            objects=[o for o in before.objects if not any(o is g for g in gone)], _fractions=None)
            n = len(gone)
            pos = _position_phrase(*_centroid(mask), size)
            what = _things("building", n)
            refs = [f"{what} {'was' if n == 1 else 'were'} demolished {pos}",
                    f"{what} disappeared {pos}",
                    f"{what} {'has' if n == 1 else 'have'} been removed {pos}",
                    f"{'a building is' if n == 1 else 'buildings are'} gone {pos}"]
            return ChangePair(before, after, mask, refs, kind, n)
        # land-cover change in a blob around the anchor; objects there are dropped from both images
        fr = before.fractions()
        options = [t for t in _LC_TRANSITIONS if fr[t[0]] >= 0.05]
        if not options:
            continue
        src, dst = options[int(rng.integers(len(options)))]
        where = np.flatnonzero(before.landcover == LC[src])
        anchor = np.array(divmod(int(where[rng.integers(where.size)]), size)[::-1], float) + 0.5
        anchor = np.clip(anchor, 0.15 * size, 0.85 * size)
        yy, xx = _coords(size)
        r = rng.uniform(0.18, 0.3) * size
        wobble = _smooth(rng, size, 4)[0] - 0.5
        region = ((xx - anchor[0]) ** 2 + (yy - anchor[1]) ** 2) / r**2 + 0.8 * wobble < 1.0
        mask = region & (before.landcover == LC[src])
        if mask.mean() < 0.03:
            continue
        near_region = _dilate(region, 2)
        kept = [o for o in before.objects if not np.any(near_region[o.slices] & o.patch)]
        lc_after = before.landcover.copy()
        lc_after[mask] = LC[dst]
        before = replace(before, objects=kept, _fractions=None)
        after = replace(before, noise_seed=after_seed, landcover=lc_after, objects=list(kept), _fractions=None)
        pos = _position_phrase(*_centroid(mask), size)
        a, b = LC_WORDS[src], LC_ARTICLE_WORDS[dst]
        refs = [f"the {a} {pos} was turned into {b}", f"some {a} {pos} became {b}", f"{b} replaced the {a} {pos}",
                f"the {a} {pos} changed to {b}"]
        return ChangePair(before, after, mask, refs, "landcover")
    before = make_scene(rng, size, "forest")
    after = replace(before, noise_seed=int(rng.integers(2**31 - 1)))
    return ChangePair(before, after, np.zeros((size, size), bool), ["no change", "there is no change",
                                                                    "nothing has changed", "the scene is unchanged"], "none")


# --------------------------------------------------------------------------------------------------- renderers

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


# --------------------------------------------------------------------------------------------------- language helpers

_ROWS = ("top", "center", "bottom")
_COLS = ("left", "center", "right")


def _cell(v: float) -> int:
    return min(2, max(0, int(v * 3)))


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def _region_phrase(row: int | None, col: int | None) -> str:
    r = _ROWS[row] if row is not None else "center"
    c = _COLS[col] if col is not None else "center"
    if r == "center" and c == "center":
        return "in the center"
    if r == "center":
        return f"on the {c}"
    if c == "center":
        return f"at the {r}"
    return f"in the {r} {c}"


def _position_phrase(x: float, y: float, size: int) -> str:
    return _region_phrase(_cell(y / size), _cell(x / size))


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _plural(label: str) -> str:
    return PLURALS.get(label, label + "s")


def _object_groups(objects: Sequence[SceneObject], size: int) -> list[str]:
    """["two ships in the top left", "a storage tank on the right", ...] in OBJECT_CLASSES order."""
    out = []
    for label in OBJECT_CLASSES:
        group = [o for o in objects if o.label == label]
        if not group:
            continue
        xs, ys = np.array([o.cx for o in group]), np.array([o.cy for o in group])
        spread = np.max(np.hypot(xs - xs.mean(), ys - ys.mean()))
        where = "" if spread > size / 3 else " " + _position_phrase(xs.mean(), ys.mean(), size)
        out.append(_things(label, len(group)) + where)
    return out


# --------------------------------------------------------------------------------------------------- task emitters


def _sample(images: list[np.ndarray], sensor: str, tag: str, text: str, answer: str, target: dict) -> Sample:
    return Sample(images=images, sensor=sensor, prompt=f"{tag} {text}", answer=answer, source="synthetic", target=target)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def emit_cap(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    """Template captions from land-cover fractions and object groups with position words; every template is a
    reference (target ``captions``), the answer is one of them."""
    fr = scene.fractions()
    shown = [n for n in SENSOR_LANDCOVER[sensor] if n != "road"]
    lcs = sorted((n for n in shown if fr[n] >= 0.1), key=lambda n: -fr[n])[:2] or [max(shown, key=lambda n: fr[n])]
    own = SCENE_LANDCOVER.get(scene.scene_class)
    words = [LC_WORDS[n] for n in lcs]
    extra = [LC_WORDS[n] for n in lcs if n != own]
    objects = scene.visible(sensor)
    objs = _join(_object_groups(objects, scene.size))
    be = "are" if len(objects) > 1 else "is"
    road = " crossed by a road" if "road" in SENSOR_LANDCOVER[sensor] and fr["road"] >= 0.02 else ""
    place = SCENE_PHRASES[scene.scene_class]
    with_lc = f" with {_join(extra)}" if extra else ""
    if own is None:  # river, lake, airport ...: the land cover says something the scene name does not
        cover = f", mostly covered by {words[0]}" + (f" with some {words[1]}" if len(words) > 1 else "")
    else:
        cover = f" with some {_join(extra)}" if extra else ""
    refs = [
        f"An aerial image of {place}{with_lc}." + (f" There {be} {objs}." if objs else ""),
        f"{_cap(place)}{road}{cover}" + (f", with {objs}." if objs else "."),
        f"This image shows {place}{road}." + (f" It contains {objs}." if objs else ""),
        f"{_cap(objs)} {be} visible in this image of {place}." if objs else f"A view of {place}{with_lc}.",
        f"A remote sensing image of {place}" + (f" with {objs}." if objs else f"{cover}."),
    ]
    answer = _pick(rng, refs)
    prompt = _pick(rng, ("Describe the image.", "Write a short caption for this image.",
                         "Describe this remote sensing image.", "What does this image show?"))
    return _sample([render(scene, sensor)], sensor, "[CAP]", prompt, answer, {"captions": refs})


def emit_cls(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    prompt = _pick(rng, ("Classify the scene.", "What type of scene is this?", "What is the scene category of this image?",
                         "Classify this remote sensing image."))
    name = scene.scene_class
    return _sample([render(scene, sensor)], sensor, "[CLS]", prompt, name, {"class_name": name})


def _vqa_question(scene: Scene, sensor: str, rng: np.random.Generator) -> tuple[str, str, str, list[str]] | None:
    """(question type, question, answer, classes asked about) or None when this draw would be ambiguous."""
    objects = scene.visible(sensor)
    labels = SENSOR_OBJECTS[sensor]
    counts = {lab: sum(o.label == lab for o in objects) for lab in labels}
    fr = scene.fractions()
    lcs = [n for n in SENSOR_LANDCOVER[sensor] if n != "road"]
    qtype = str(rng.choice(["presence", "count", "comparison", "area", "land_cover"], p=[0.25, 0.3, 0.15, 0.15, 0.15]))
    if qtype == "presence":
        present = [lab for lab in labels if counts[lab]]
        absent = [lab for lab in labels if not counts[lab]]
        lab = _pick(rng, present) if present and (not absent or rng.random() < 0.5) else _pick(rng, absent)
        q = _pick(rng, (f"Is there {_things(lab, 1)} in the image?", f"Are there any {_plural(lab)}?",
                        f"Is there {_things(lab, 1)}?"))
        return qtype, q, "yes" if counts[lab] else "no", [lab]
    if qtype == "count":
        present = [lab for lab in labels if counts[lab]]
        lab = _pick(rng, present) if present and rng.random() < 0.85 else _pick(rng, labels)
        q = _pick(rng, (f"How many {_plural(lab)} are there?", f"How many {_plural(lab)} are in the image?",
                        f"What is the number of {_plural(lab)}?"))
        return qtype, q, str(counts[lab]), [lab]
    if qtype == "comparison":
        pairs = [(x, y) for x in labels for y in labels if x != y]
        differ = [p for p in pairs if counts[p[0]] != counts[p[1]]]
        a, b = _pick(rng, differ if differ and rng.random() < 0.8 else pairs)
        q = _pick(rng, (f"Are there more {_plural(a)} than {_plural(b)}?", f"Is the number of {_plural(a)} larger than "
                        f"the number of {_plural(b)}?"))
        return qtype, q, "yes" if counts[a] > counts[b] else "no", [a, b]
    if qtype == "area":
        a, b = (str(x) for x in rng.choice(lcs, 2, replace=False))
        if abs(fr[a] - fr[b]) < 0.05:  # too close to call by eye
            return None
        wa, wb = LC_AREA_WORDS[a], LC_AREA_WORDS[b]
        q = _pick(rng, (f"Is the {wa} larger than the {wb}?", f"Does the {wa} cover more of the image than the {wb}?"))
        return qtype, q, "yes" if fr[a] > fr[b] else "no", [a, b]
    present, absent = [n for n in lcs if fr[n] >= 0.01], [n for n in lcs if fr[n] == 0]
    name = _pick(rng, present) if present and (not absent or rng.random() < 0.5) else _pick(rng, absent or lcs)
    if 0 < fr[name] < 0.01:  # a few pixels: neither a clear yes nor a clear no
        return None
    q = _pick(rng, (f"Is there any {LC_WORDS[name]} in the image?", f"Is there {LC_ARTICLE_WORDS[name]}?"))
    return qtype, q, "yes" if fr[name] >= 0.01 else "no", [name]


def emit_vqa(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    for _ in range(10):
        qa = _vqa_question(scene, sensor, rng)
        if qa is not None:
            qtype, question, answer, subjects = qa
            return _sample([render(scene, sensor)], sensor, "[VQA]", question, answer,
                           {"question_type": qtype, "answer": answer, "subjects": subjects})
    return None


def _referring_expressions(obj: SceneObject, scene: Scene, sensor: str) -> list[str]:
    """Expressions that identify ``obj`` uniquely among the visible objects."""
    size = scene.size
    same = [o for o in scene.visible(sensor) if o.label == obj.label and o is not obj]
    label = obj.label
    exprs: list[str] = []
    if not same:
        exprs.append(f"the {label}")
    margin = 0.04
    x, y = obj.cx / size, obj.cy / size
    row, col = _cell(y), _cell(x)

    def clear(v: float, cell: int) -> bool:  # inside its third with a margin
        return cell / 3 + margin <= v <= (cell + 1) / 3 - margin

    def outside(v: float, cell: int) -> bool:  # clearly not in that third
        return v < cell / 3 - margin or v > (cell + 1) / 3 + margin

    if clear(x, col) and clear(y, row) and all(outside(o.cx / size, col) or outside(o.cy / size, row) for o in same):
        exprs.append(f"the {label} {_region_phrase(row, col)}")
    if row != 1 and clear(y, row) and all(outside(o.cy / size, row) for o in same):
        exprs.append(f"the {label} near the {_ROWS[row]}")
    if col != 1 and clear(x, col) and all(outside(o.cx / size, col) for o in same):
        exprs.append(f"the {label} on the {_COLS[col]}")
    if same:
        areas = [o.area for o in same]
        if obj.area >= 1.4 * max(areas):
            exprs.append(f"the largest {label}")
        if obj.area * 1.4 <= min(areas):
            exprs.append(f"the smallest {label}")
        gap = 0.08 * size
        if obj.cx + gap <= min(o.cx for o in same):
            exprs.append(f"the leftmost {label}")
        if obj.cx - gap >= max(o.cx for o in same):
            exprs.append(f"the rightmost {label}")
        if obj.cy + gap <= min(o.cy for o in same):
            exprs.append(f"the topmost {label}")
        if obj.cy - gap >= max(o.cy for o in same):
            exprs.append(f"the bottommost {label}")
    return exprs


def emit_vg(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    objects = scene.visible(sensor)
    order = rng.permutation(len(objects))
    for i in order:
        obj = objects[int(i)]
        exprs = _referring_expressions(obj, scene, sensor)
        if not exprs:
            continue
        expr = _pick(rng, exprs)
        prompt = _pick(rng, (expr, f"Locate {expr}.", f"Where is {expr}?", f"Find {expr}."))
        box = obj.box(scene.size)
        return _sample([render(scene, sensor)], sensor, "[VG]", prompt, format_box(box),
                       {"boxes": [box], "label": obj.label, "expression": expr})
    return None


def _heading_word(heading: float) -> str | None:
    """right / down / left / up when within 25 degrees of that direction."""
    k = round(heading / 90.0) % 4
    if abs((heading - 90.0 * round(heading / 90.0) + 180) % 360 - 180) > 25:
        return None
    return ("right", "down", "left", "up")[k]


def describe_object(obj: SceneObject) -> str:
    """Short [REF] description: ``a large ship heading right``, ``a storage tank``."""
    size_word = "small " if obj.size_rank < 0.3 else "large " if obj.size_rank > 0.7 else ""
    text = f"a {size_word}{obj.label}" if size_word else _things(obj.label, 1)
    if obj.label in ("ship", "plane"):
        way = _heading_word(obj.heading)
        if way:
            text += f" heading {way}"
    return text


def emit_ref(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    objects = scene.visible(sensor)
    if not objects:
        return None
    obj = _pick(rng, objects)
    box = obj.box(scene.size)
    return _sample([render(scene, sensor)], sensor, "[REF]", f"What is in the region {format_box(box)}?",
                   describe_object(obj), {"label": obj.label, "box": box})


def _detection_query(scene: Scene, sensor: str, rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """(what to say after "Detect all", labels asked for)."""
    labels = SENSOR_OBJECTS[sensor]
    present = [lab for lab in labels if any(o.label == lab for o in scene.visible(sensor))]
    r = rng.random()
    if sensor == "ir" and r < 0.35:
        return "hot targets", HOT_TARGETS
    if sensor == "sar" and r < 0.4:
        return "ships", ("ship",)
    if r < 0.45:
        return "objects", labels
    lab = _pick(rng, present) if present and rng.random() < 0.85 else _pick(rng, labels)
    return _plural(lab), (lab,)


def _sorted_objects(objects: Sequence[SceneObject], labels: Sequence[str]) -> list[SceneObject]:
    chosen = [o for o in objects if o.label in labels]
    return sorted(chosen, key=lambda o: (OBJECT_CLASSES.index(o.label), round(o.cy), round(o.cx)))


def emit_det(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    what, labels = _detection_query(scene, sensor, rng)
    dets = [(o.label, o.box(scene.size)) for o in _sorted_objects(scene.visible(sensor), labels)]
    return _sample([render(scene, sensor)], sensor, "[DET]", f"Detect all {what}.", format_detections(dets),
                   {"detections": dets, "labels": list(labels)})


def emit_obb(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    what, labels = _detection_query(scene, sensor, rng)
    obbs = [(o.label, o.obb(scene.size)) for o in _sorted_objects(scene.visible(sensor), labels)]
    return _sample([render(scene, sensor)], sensor, "[OBB]", f"Detect all {what} with oriented boxes.",
                   format_oriented_detections(obbs), {"obbs": obbs, "labels": list(labels)})


def _has_label(grid: list[list[str]], label: str) -> bool:
    return any(label in row for row in grid)


def emit_seg(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    sem = scene.semantic(sensor)
    fr = scene.fractions()
    if sensor in ("rgb", "ms") and rng.random() < 0.2:
        grid = mask_to_grid(sem, Scene.semantic_names())
        labels = sorted({c for row in grid for c in row}, key=lambda c: (LANDCOVER_CLASSES + OBJECT_CLASSES).index(c))
        prompt = _pick(rng, ("Segment the image.", "Segment all land cover and objects."))
        return _sample([render(scene, sensor)], sensor, "[SEG]", prompt, format_mask(grid), {"mask": grid, "labels": labels})
    pixels = np.bincount(sem.ravel(), minlength=_N_LC + 1 + len(OBJECT_CLASSES))
    cell = (scene.size / 24) ** 2  # classes smaller than ~1.5 grid cells rarely win a cell: skip them up front
    options = [(n, LC_SEG_WORDS[n], LC[n] + 1) for n in SENSOR_LANDCOVER[sensor] if fr[n] >= 0.03]
    options += [(lab, f"the {_plural(lab)}", _N_LC + 1 + OBJ[lab]) for lab in SENSOR_OBJECTS[sensor]]
    options = [opt for opt in options if pixels[opt[2]] >= 1.5 * cell]
    for i in rng.permutation(len(options)):
        label, words, value = options[int(i)]
        grid = mask_to_grid(sem == value, {1: label})
        if _has_label(grid, label):
            return _sample([render(scene, sensor)], sensor, "[SEG]", f"Segment {words}.", format_mask(grid),
                           {"mask": grid, "label": label})
    return None


def emit_change_seg(pair: ChangePair, sensor: str, rng: np.random.Generator) -> Sample:
    grid = mask_to_grid(pair.mask, {1: CHANGE_LABEL})
    if pair.kind in ("appear", "disappear"):
        prompt = _pick(rng, ("Segment the changed buildings.", "Segment the building changes.", "Segment the changes."))
    else:
        prompt = _pick(rng, ("Segment the changes.", "Segment the changed areas."))
    images = [render(pair.before, sensor), render(pair.after, sensor)]
    return _sample(images, sensor, "[SEG]", prompt, format_mask(grid),
                   {"mask": grid, "change": True, "label": CHANGE_LABEL, "change_pixels": pair.mask.copy()})


def emit_ccd(pair: ChangePair, sensor: str, rng: np.random.Generator) -> Sample:
    prompt = _pick(rng, ("Describe the changes between the two images.", "What changed between the two images?",
                         "Describe the changes."))
    images = [render(pair.before, sensor), render(pair.after, sensor)]
    return _sample(images, sensor, "[CCD]", prompt, _pick(rng, pair.captions),
                   {"captions": list(pair.captions), "change_kind": pair.kind})


SCENE_EMITTERS = {"[CAP]": emit_cap, "[CLS]": emit_cls, "[VQA]": emit_vqa, "[VG]": emit_vg, "[REF]": emit_ref,
                  "[DET]": emit_det, "[OBB]": emit_obb, "[SEG]": emit_seg}
#: Scene classes drawn for tasks that need objects (per sensor, at most the ones whose objects it shows).
_OBJECT_SCENES = {
    "rgb": ("residential", "industrial", "airport", "harbor", "parking lot", "river", "farmland"),
    "sar": ("harbor", "river", "airport", "industrial", "residential", "parking lot"),
    "ir": ("parking lot", "harbor", "river", "industrial", "airport", "residential"),
    "ms": ("industrial", "harbor", "airport", "residential", "river"),
}
_OBJECT_TASKS = ("[VG]", "[REF]", "[DET]", "[OBB]")


# --------------------------------------------------------------------------------------------------- public API


def _mixture(weights: dict[str, float], keep: Sequence[str]) -> tuple[list[str], np.ndarray]:
    names = [k for k in weights if k in keep]
    if not names:
        raise ValueError(f"nothing to draw from {list(keep)}")
    p = np.array([weights[k] for k in names], float)
    return names, p / p.sum()


class SyntheticGenerator:
    """A reproducible stream of synthetic samples: same (size, seed) -> identical arrays and texts.

    ``tasks`` restricts the task mixture (tags like ``"[CAP]"`` or names like ``"cap"``), ``sensors`` the sensors;
    ``task_weights`` replaces :data:`TASK_MIXTURE`'s shares (tags missing from it keep theirs).
    """

    def __init__(self, size: int = 128, seed: int = 0, tasks: Sequence[str] | None = None,
                 sensors: Sequence[str] | None = None, task_weights: dict[str, float] | None = None):
        if size < 32:
            raise ValueError(f"synthetic scenes need size >= 32, got {size}")
        self.size = int(size)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        weights = dict(TASK_MIXTURE)
        for tag, weight in (task_weights or {}).items():
            if normalize_tag(tag) not in weights or not weight >= 0:
                raise ValueError(f"task weight {tag!r}: {weight!r} (tags: {', '.join(TASK_MIXTURE)}; weights >= 0)")
            weights[normalize_tag(tag)] = float(weight)
        self._tasks = _mixture(weights, [normalize_tag(t) for t in tasks] if tasks else TAGS)
        for s in sensors or ():
            self._check_sensor(s)
        self._sensors = _mixture(SENSOR_MIXTURE, sensors or SENSORS)

    @staticmethod
    def _check_sensor(sensor: str) -> None:
        if sensor not in SENSORS:
            raise ValueError(f"unknown sensor {sensor!r}; choose from {', '.join(SENSORS)}")

    def sample(self, task: str | None = None, sensor: str | None = None) -> Sample:
        rng = self.rng
        tag = normalize_tag(task) if task else self._tasks[0][int(rng.choice(len(self._tasks[0]), p=self._tasks[1]))]
        if sensor is None:
            sensor = self._sensors[0][int(rng.choice(len(self._sensors[0]), p=self._sensors[1]))]
        self._check_sensor(sensor)
        if tag == "[CCD]":
            return emit_ccd(make_change_pair(rng, self.size), sensor, rng)
        if tag == "[SEG]" and rng.random() < CHANGE_SEG_SHARE:
            return emit_change_seg(make_change_pair(rng, self.size), sensor, rng)
        emitter = SCENE_EMITTERS[tag]
        classes = _OBJECT_SCENES[sensor] if tag in _OBJECT_TASKS else SENSOR_SCENES[sensor]
        for _ in range(50):
            scene = make_scene(rng, self.size, classes[int(rng.integers(len(classes)))])
            out = emitter(scene, sensor, rng)
            if out is not None:
                return out
        raise RuntimeError(f"could not emit {tag} for {sensor} in 50 scenes")  # pragma: no cover - never seen

    def samples(self, n: int, task: str | None = None, sensor: str | None = None) -> Iterator[Sample]:
        for _ in range(n):
            yield self.sample(task, sensor)


def generate(n: int, seed: int = 0, size: int = 128, tasks: Sequence[str] | None = None,
             sensors: Sequence[str] | None = None) -> list[Sample]:
    """``n`` samples from a fresh :class:`SyntheticGenerator` (the task/sensor mixtures, optionally restricted)."""
    return list(SyntheticGenerator(size, seed, tasks=tasks, sensors=sensors).samples(n))


__all__ = [
    "CHANGE_LABEL", "CHANGE_SEG_SHARE", "HOT_TARGETS", "LANDCOVER_CLASSES", "MS_BANDS", "OBJECT_CLASSES", "SCENE_CLASSES",
    "SENSORS", "SENSOR_BANDS", "SENSOR_LANDCOVER", "SENSOR_MIXTURE", "SENSOR_OBJECTS", "TASK_MIXTURE", "ChangePair", "Scene",
    "SceneObject", "SyntheticGenerator", "describe_object", "emit_cap", "emit_ccd", "emit_change_seg", "emit_cls",
    "emit_det", "emit_obb", "emit_ref", "emit_seg", "emit_vg", "emit_vqa", "generate", "make_change_pair", "make_scene",
    "render", "render_infrared", "render_multispectral", "render_optical", "render_sar",
]
