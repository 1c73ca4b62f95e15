"""The sensor-independent scene model and the recipes that generate it.

A :class:`Scene` is a land-cover label map plus :class:`SceneObject` s. :data:`SCENE_RECIPES` says, per scene
class, how a scene is made: the land-cover mix, the terrain painted over it (roads, water) and the objects placed
on it. :func:`make_scene` only follows a recipe, so adding a scene class is adding a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from rsvlm_edge.formats import format_box, format_obb, parse_box, parse_obbs
from rsvlm_edge.training.synthetic.geometry import (
    _ALLOWED,
    _DIMS,
    _add_coast,
    _add_lake,
    _add_river,
    _add_road,
    _blobs,
    _coords,
    _dilate,
    _frame,
    _padded,
    _paint,
    _parcels,
    _rasterize,
    _scale,
)
from rsvlm_edge.training.synthetic.vocab import (
    _N_LC,
    LANDCOVER_CLASSES,
    LC,
    OBJ,
    OBJECT_CLASSES,
    SCENE_CLASSES,
    SCENE_LANDCOVER,
    SENSOR_OBJECTS,
)

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


def _union(objects: Sequence[SceneObject], labels: Sequence[str], size: int) -> np.ndarray:
    out = np.zeros((size, size), bool)
    for o in objects:
        if o.label in labels:
            out[o.slices] |= o.patch
    return out


# --------------------------------------------------------------------------------------------------- object placement

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


# --------------------------------------------------------------------------------------------------- scene recipes

#: Paints terrain over the land-cover blobs and returns the heading that aligned objects follow (None: no preferred
#: heading). It draws from ``rng`` after the blobs and before any object, so a recipe's draws keep their order.
Terrain = Callable[[np.ndarray, np.random.Generator], float | None]


class ObjectSpec(NamedTuple):
    """``lo``..``hi`` objects of ``label`` (inclusive). ``aligned`` is the chance they follow the terrain's heading:
    0 = free headings, 1 = always aligned, in between one draw per group (after the count)."""

    label: str
    lo: int
    hi: int
    aligned: float = 0.0


@dataclass(frozen=True)
class SceneRecipe:
    """How one scene class is generated: land-cover blob weights (the first class dominates), terrain, objects (placed
    in this order; earlier groups take the space first)."""

    landcover: Mapping[str, float]
    terrain: Terrain
    objects: tuple[ObjectSpec, ...]


def _no_terrain(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    return None


def _road_with_chance(p: float) -> Terrain:
    """A road with probability ``p``; its direction is the heading."""
    def terrain(lc: np.ndarray, rng: np.random.Generator) -> float | None:
        return _add_road(lc, rng) if rng.random() < p else None
    return terrain


def _one_road(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    return _add_road(lc, rng)


def _street_grid(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    """Parallel streets (up to five) and one cross street; the street direction is the heading."""
    size = lc.shape[0]
    angle = float(rng.uniform(-15, 15))
    spacing = rng.uniform(0.35, 0.55) * size
    for k in range(-2, 3):
        off = size / 2 + k * spacing + rng.uniform(-5, 5)
        if 0 < off < size:
            _add_road(lc, rng, angle, through=(size / 2, off))
    _add_road(lc, rng, angle + 90.0, through=(rng.uniform(0.3, 0.7) * size, size / 2))
    return angle


def _road_and_cross_road(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    """A road, and half the time a second one at right angles."""
    angle = _add_road(lc, rng)
    if rng.random() < 0.5:
        _add_road(lc, rng, angle + 90.0)
    return angle


def _river(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    _add_river(lc, rng)
    return None


def _lake(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    _add_lake(lc, rng)
    return None


def _runway(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    """A runway: a road about twice as wide as a street."""
    return _add_road(lc, rng, width=rng.uniform(7.0, 9.0) * _scale(lc.shape[0]))


def _coast(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    _add_coast(lc, rng)
    return None


def _parking_rows(lc: np.ndarray, rng: np.random.Generator) -> float | None:
    """A road beside the lot; the heading is the parking rows' (axis aligned, +-10 degrees), not the road's."""
    _add_road(lc, rng)
    return float(rng.choice([0.0, 90.0]) + rng.uniform(-10, 10))


#: Scene class -> recipe, one row per :data:`SCENE_CLASSES` entry.
SCENE_RECIPES: dict[str, SceneRecipe] = {
    "forest": SceneRecipe({"forest": 1.0, "farmland": 0.5, "bare": 0.4}, _road_with_chance(0.5),
                          (ObjectSpec("building", 0, 2), ObjectSpec("vehicle", 0, 1, aligned=1.0))),
    "farmland": SceneRecipe({"farmland": 1.0, "forest": 0.5, "residential": 0.35}, _road_with_chance(0.6),
                            (ObjectSpec("building", 0, 3), ObjectSpec("vehicle", 0, 2, aligned=1.0))),
    "residential": SceneRecipe({"residential": 1.0, "forest": 0.45, "farmland": 0.4}, _street_grid,
                               (ObjectSpec("building", 3, 6, aligned=0.7), ObjectSpec("vehicle", 0, 2, aligned=1.0))),
    "industrial": SceneRecipe({"industrial": 1.0, "bare": 0.5, "residential": 0.3}, _road_and_cross_road,
                              (ObjectSpec("storage tank", 1, 4), ObjectSpec("building", 1, 3, aligned=1.0),
                               ObjectSpec("vehicle", 0, 2, aligned=1.0))),
    "river": SceneRecipe({"forest": 1.0, "farmland": 0.9, "residential": 0.5}, _river,
                         (ObjectSpec("ship", 0, 3), ObjectSpec("building", 0, 2))),
    "lake": SceneRecipe({"forest": 1.0, "farmland": 0.7, "bare": 0.4}, _lake,
                        (ObjectSpec("ship", 0, 2), ObjectSpec("building", 0, 2))),
    "airport": SceneRecipe({"bare": 1.0, "industrial": 0.55, "farmland": 0.4}, _runway,
                           (ObjectSpec("plane", 1, 4), ObjectSpec("building", 0, 2), ObjectSpec("vehicle", 0, 2))),
    "harbor": SceneRecipe({"industrial": 1.0, "residential": 0.5, "bare": 0.4}, _coast,
                          (ObjectSpec("ship", 2, 5), ObjectSpec("storage tank", 0, 2), ObjectSpec("building", 0, 1))),
    "bare land": SceneRecipe({"bare": 1.0, "farmland": 0.4, "forest": 0.3}, _road_with_chance(0.3),
                             (ObjectSpec("building", 0, 2), ObjectSpec("vehicle", 0, 1, aligned=1.0))),
    # a paved area with rows of vehicles
    "parking lot": SceneRecipe({"industrial": 1.0, "residential": 0.4, "forest": 0.3}, _parking_rows,
                               (ObjectSpec("vehicle", 4, 8, aligned=1.0),)),
}


def make_scene(rng: np.random.Generator, size: int = 128, scene_class: str | None = None) -> Scene:
    """A random scene of ``scene_class`` (random when None), made by its :data:`SCENE_RECIPES` row. At most 8
    objects."""
    if scene_class is None:
        scene_class = SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    if scene_class not in SCENE_CLASSES:
        raise ValueError(f"unknown scene class {scene_class!r}; choose from {', '.join(SCENE_CLASSES)}")
    recipe = SCENE_RECIPES[scene_class]
    grid = int(rng.integers(3, 6))
    lc = _blobs(rng, size, dict(recipe.landcover), grid)
    heading = recipe.terrain(lc, rng)
    own = SCENE_LANDCOVER.get(scene_class)
    if own is not None and int(np.argmax(np.bincount(lc.ravel(), minlength=_N_LC))) != LC[own]:
        return make_scene(rng, size, scene_class)  # rare (< 1%): the scene must be dominated by its class
    placer = _Placer(lc)
    for spec in recipe.objects:
        n = _n(rng, spec.lo, spec.hi)
        aligned = spec.aligned >= 1.0 or (spec.aligned > 0.0 and rng.random() < spec.aligned)
        placer.place(rng, spec.label, n, heading=heading if aligned else None)
    objects = placer.objects[:8]
    return Scene(size, scene_class, lc, objects, int(rng.integers(2**31 - 1)), _parcels(rng, size))
