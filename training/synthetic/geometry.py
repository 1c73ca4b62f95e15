"""Geometry of synthetic scenes: smooth noise, land-cover painters (blobs, roads, rivers, lakes, coasts, field
parcels) and object footprints (shapes, rasterising, binary morphology).

Functions take the caller's :class:`numpy.random.Generator` and draw from it in a fixed order: the generator's
output is reproducible only as long as that order does not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from rsvlm_edge.training.synthetic.vocab import LC

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


# --------------------------------------------------------------------------------------------------- object footprints

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
