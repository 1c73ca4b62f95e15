"""Text formats of every task: render training targets as text and parse what the model generates.

Everything the model produces is text (docs/design.md "Text formats"), so this module is the only place that knows the
grammar. It is torch-free (numpy only) because the edge runtime parses answers without torch.

Conventions
-----------
* Coordinates are integers normalised to 0..100 of the image width (x) and height (y).
* Boxes ``[x1, y1, x2, y2]``; oriented boxes ``[cx, cy, w, h, angle]`` with whole degrees in [-90, 90). The angle is
  that of the edge of length ``w`` measured in the normalised frame, image coordinates (y down), so a positive angle
  turns clockwise on screen. A box turned by 180 degrees is the same box, hence the half-open angle range.
* Detections group boxes by label: ``plane [1, 2, 3, 4] [5, 6, 7, 8]; ship [10, 10, 20, 20]``; nothing -> ``none``.
* Masks are a 24x24 grid, one text row per grid row, runs ``label*count`` joined by ``, ``; background ``others``.
* Labels are lower-case words of ``a-z0-9`` joined by single spaces, hyphens or underscores (``storage tank``,
  ``small-vehicle``, ``boeing737``); parsers lower-case and collapse whitespace before checking.

Strict parsers raise only :class:`FormatError` (a ``ValueError``) on malformed text, never ``IndexError`` and
friends, so callers need one ``except``. :func:`parse_answer` is the runtime's entry point and never raises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsvlm_edge.tasks import END, TAGS

MASK_SIZE = 24
BACKGROUND = "others"
NONE_TEXT = "none"

Box = tuple[int, int, int, int]
OBB = tuple[int, int, int, int, int]


class FormatError(ValueError):
    """Text does not follow the task's answer format (or a target cannot be rendered into it)."""


class BoxFormatError(FormatError):
    """Malformed box, oriented box or detection text."""


class MaskFormatError(FormatError):
    """Malformed 24x24 mask text or grid."""


# --------------------------------------------------------------------------------------------------- helpers

_GROUP = re.compile(r"\[([^\[\]]*)\]")
_INT = re.compile(r"\s*([+-]?[0-9]+)\s*")  # ASCII digits only: int() would accept other scripts' digits too
#: The label grammar: lower-case words of a-z0-9 joined by one space, ``-`` or ``_`` (the answer grammars of
#: :mod:`rsvlm_edge.constrain` and a caller's [CLS] class list use it too).
LABEL_PATTERN = re.compile(r"[a-z0-9]+(?:[ _-][a-z0-9]+)*")
_MAX_DIGITS = 6  # longer numbers are out of range anyway, and int() refuses > 4300 digits with a ValueError


def _is_none(text: str) -> bool:
    return text.strip().lower() == NONE_TEXT


def _round(value: float) -> int:
    """Round half up: deterministic, unlike Python's round-half-to-even."""
    return math.floor(value + 0.5)


def _clamp(value: int, low: int = 0, high: int = 100) -> int:
    return max(low, min(high, value))


def _finite_floats(values: Sequence[float], count: int, what: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise BoxFormatError(f"{what} must be {count} numbers, got {values!r}") from exc
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise BoxFormatError(f"{what} must be {count} finite numbers, got {values!r}")
    return out


def _clean_label(label: Any, error: type[FormatError]) -> str:
    """Lower-case and collapse whitespace, then insist on the label grammar so the text parses back."""
    if not isinstance(label, str):
        raise error(f"label must be a string, got {label!r}")
    clean = " ".join(label.lower().split())
    if not LABEL_PATTERN.fullmatch(clean):
        raise error(f"bad label {label!r}: use lower-case words of a-z0-9 joined by spaces, '-' or '_'")
    return clean


def _int_group(group: str, count: int, what: str) -> tuple[int, ...]:
    """One ``[n, n, ...]`` group (brackets included) of exactly ``count`` integers."""
    parts = group[1:-1].split(",")
    if len(parts) != count:
        raise BoxFormatError(f"{what} needs {count} numbers, got {len(parts)} in {group!r}")
    values = []
    for part in parts:
        number = _INT.fullmatch(part)
        if number is None:
            raise BoxFormatError(f"{part.strip()!r} is not an integer in {group!r}")
        digits = number.group(1)
        if len(digits.lstrip("+-")) > _MAX_DIGITS:
            raise BoxFormatError(f"number {digits[:12]}... out of range in {what}")
        values.append(int(digits))
    return tuple(values)


def _int_groups(text: str, count: int, what: str) -> tuple[list[tuple[int, ...]], str]:
    """Every ``[n, n, ...]`` group of ``count`` integers, plus the text left around them.

    Any bracket group must be a well-formed group, and a bracket left unmatched (a truncated answer, nesting) is an
    error rather than something silently skipped.
    """
    groups = [_int_group(match.group(0), count, what) for match in _GROUP.finditer(text)]
    rest = _GROUP.sub(" ", text)
    if "[" in rest or "]" in rest:
        raise BoxFormatError(f"unbalanced bracket in {text[:80]!r}")
    return groups, rest


def _check_box(values: tuple[int, ...]) -> Box:
    """Range-check a parsed box and order its corners (the model may swap them; the box is still meaningful)."""
    if not all(0 <= v <= 100 for v in values):
        raise BoxFormatError(f"box coordinates must be in 0..100, got {list(values)}")
    x1, y1, x2, y2 = values
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _check_obb(values: tuple[int, ...]) -> OBB:
    cx, cy, w, h, angle = values
    if not all(0 <= v <= 100 for v in (cx, cy, w, h)):
        raise BoxFormatError(f"oriented box cx, cy, w, h must be in 0..100, got {list(values)}")
    if not -90 <= angle < 90:
        raise BoxFormatError(f"oriented box angle must be in [-90, 90), got {angle}")
    return cx, cy, w, h, angle


# --------------------------------------------------------------------------------------------------- boxes


def format_box(box: Sequence[float]) -> str:
    """``[x1, y1, x2, y2]`` with rounded, clamped, ordered coordinates, so any float target renders validly."""
    x1, y1, x2, y2 = (_clamp(_round(v)) for v in _finite_floats(box, 4, "box"))
    return f"[{min(x1, x2)}, {min(y1, y2)}, {max(x1, x2)}, {max(y1, y2)}]"


def format_boxes(boxes: Iterable[Sequence[float]]) -> str:
    return " ".join(format_box(b) for b in boxes) or NONE_TEXT


def parse_boxes(text: str) -> list[Box]:
    """Every box in ``text`` (other words around them are tolerated); ``none`` -> []. Corners come back ordered."""
    if _is_none(text):
        return []
    groups, _ = _int_groups(text, 4, "box")
    if not groups:
        raise BoxFormatError(f"no box in {text[:80]!r} (and it is not 'none')")
    return [_check_box(g) for g in groups]


def parse_box(text: str) -> Box:
    """The first box; an answer with no box is an error because the caller needs one."""
    boxes = parse_boxes(text)
    if not boxes:
        raise BoxFormatError("expected a box, got 'none'")
    return boxes[0]


# --------------------------------------------------------------------------------------------------- oriented boxes


def normalize_obb(cx: float, cy: float, w: float, h: float, angle: float) -> tuple[float, float, float, float, float]:
    """Bring the angle into [-90, 90): turning a rectangle by 180 degrees gives the same rectangle."""
    angle = (float(angle) + 90.0) % 180.0 - 90.0
    if angle >= 90.0:  # float modulo can land exactly on 180 for tiny negative inputs
        angle -= 180.0
    return float(cx), float(cy), float(w), float(h), angle


def format_obb(obb: Sequence[float]) -> str:
    """``[cx, cy, w, h, angle]``: rounded, clamped to 0..100 (sizes by magnitude), angle wrapped after rounding."""
    cx, cy, w, h, angle = _finite_floats(obb, 5, "oriented box")
    cx, cy = _clamp(_round(cx)), _clamp(_round(cy))
    w, h = _clamp(_round(abs(w))), _clamp(_round(abs(h)))
    angle = (_round(angle) + 90) % 180 - 90  # integer arithmetic: 89.6 -> 90 -> -90, exactly
    return f"[{cx}, {cy}, {w}, {h}, {angle}]"


def format_obbs(obbs: Iterable[Sequence[float]]) -> str:
    return " ".join(format_obb(o) for o in obbs) or NONE_TEXT


def parse_obbs(text: str) -> list[OBB]:
    """Every ``[cx, cy, w, h, angle]`` in ``text``; ``none`` -> []; an angle outside [-90, 90) is an error."""
    if _is_none(text):
        return []
    groups, _ = _int_groups(text, 5, "oriented box")
    if not groups:
        raise BoxFormatError(f"no oriented box in {text[:80]!r} (and it is not 'none')")
    return [_check_obb(g) for g in groups]


def obb_corners(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """The 4 corners (4, 2) in the same units, ordered like DOTA: p0->p1 is the ``w`` edge, p1->p2 the ``h`` edge."""
    theta = math.radians(angle)
    u = np.array([math.cos(theta), math.sin(theta)]) * (w / 2.0)  # along the w edge
    v = np.array([-math.sin(theta), math.cos(theta)]) * (h / 2.0)  # perpendicular, clockwise on screen (y down)
    c = np.array([cx, cy], dtype=float)
    return np.stack([c - u - v, c + u - v, c + u + v, c - u + v])


def obb_from_corners(points: np.ndarray | Sequence[Sequence[float]]) -> tuple[float, float, float, float, float]:
    """(cx, cy, w, h, angle) from 4 ordered corners (DOTA order), without a minimum-area-rectangle fit.

    Centre = mean of the corners, ``w`` = |p0->p1|, ``h`` = |p1->p2|, angle = direction of p0->p1. When the
    corners are not an exact rectangle (e.g. after non-uniform scaling) this is the natural approximation that keeps
    the first edge exact. A zero-length first edge takes its direction from the second edge, so thin boxes keep
    their orientation.
    """
    pts = np.asarray(points, dtype=float)
    if pts.shape != (4, 2) or not np.all(np.isfinite(pts)):
        raise BoxFormatError(f"expected 4 finite (x, y) corners, got an array of shape {pts.shape}")
    cx, cy = pts.mean(axis=0)
    e1, e2 = pts[1] - pts[0], pts[2] - pts[1]
    w, h = float(np.hypot(*e1)), float(np.hypot(*e2))
    if w > 1e-12 or h <= 1e-12:
        angle = math.degrees(math.atan2(e1[1], e1[0]))
    else:
        angle = math.degrees(math.atan2(e2[1], e2[0])) - 90.0
    return normalize_obb(float(cx), float(cy), w, h, angle)


# --------------------------------------------------------------------------------------------------- detections


def _format_grouped(items: Iterable[tuple[str, Sequence[float]]], render) -> str:
    groups: dict[str, list[str]] = {}  # dicts keep first-appearance order
    for label, shape in items:
        groups.setdefault(_clean_label(label, BoxFormatError), []).append(render(shape))
    return "; ".join(f"{label} {' '.join(shapes)}" for label, shapes in groups.items()) or NONE_TEXT


def _parse_grouped(text: str, count: int, what: str, check) -> list[tuple[str, tuple[int, ...]]]:
    """``label [..] [..]; label [..]`` -> [(label, shape), ...] in text order; empty segments are skipped."""
    if _is_none(text):
        return []
    out: list[tuple[str, tuple[int, ...]]] = []
    for segment in text.split(";"):
        if not segment.strip():
            continue
        start = segment.find("[")
        if start < 0:
            raise BoxFormatError(f"no {what} after the label in {segment.strip()[:80]!r}")
        label = _clean_label(segment[:start], BoxFormatError)
        groups, rest = _int_groups(segment[start:], count, what)
        if rest.replace(",", " ").strip():
            raise BoxFormatError(f"unexpected text {rest.strip()[:40]!r} between {what}es of {label!r}")
        out.extend((label, check(g)) for g in groups)
    if not out:
        raise BoxFormatError(f"no detections in {text[:80]!r} (and it is not 'none')")
    return out


def format_detections(items: Iterable[tuple[str, Sequence[float]]]) -> str:
    """Boxes grouped by label in order of first appearance: ``plane [..] [..]; ship [..]``."""
    return _format_grouped(items, format_box)


def format_oriented_detections(items: Iterable[tuple[str, Sequence[float]]]) -> str:
    return _format_grouped(items, format_obb)


def parse_detections(text: str) -> list[tuple[str, Box]]:
    return _parse_grouped(text, 4, "box", _check_box)  # type: ignore[return-value]


def parse_oriented_detections(text: str) -> list[tuple[str, OBB]]:
    return _parse_grouped(text, 5, "oriented box", _check_obb)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------- masks

_RUN = re.compile(r"\s*([^*]*?)\s*\*\s*([0-9]+)\s*")


def _check_grid(grid: Sequence[Sequence[str]] | np.ndarray) -> list[list[str]]:
    rows = [list(row) for row in grid]
    if len(rows) != MASK_SIZE or any(len(row) != MASK_SIZE for row in rows):
        raise MaskFormatError(f"mask grid must be {MASK_SIZE}x{MASK_SIZE}")
    return rows


def format_mask(grid: Sequence[Sequence[str]] | np.ndarray) -> str:
    """Run-length rows ``label*count`` joined by ``, ``, rows joined by newlines."""
    lines = []
    for row in _check_grid(grid):
        runs: list[list] = []
        for cell in row:
            label = _clean_label(str(cell), MaskFormatError)
            if runs and runs[-1][0] == label:
                runs[-1][1] += 1
            else:
                runs.append([label, 1])
        lines.append(", ".join(f"{label}*{count}" for label, count in runs))
    return "\n".join(lines)


def parse_mask(text: str) -> list[list[str]]:
    """The 24x24 label grid; exactly 24 non-blank rows, each of positive runs summing to 24."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != MASK_SIZE:
        raise MaskFormatError(f"mask needs {MASK_SIZE} rows, got {len(lines)}")
    grid = []
    for number, line in enumerate(lines, 1):
        row: list[str] = []
        for run in line.split(","):
            match = _RUN.fullmatch(run)
            if match is None:
                raise MaskFormatError(f"row {number}: {run.strip()[:40]!r} is not 'label*count'")
            label = _clean_label(match.group(1), MaskFormatError)
            digits = match.group(2)
            count = int(digits) if len(digits) <= _MAX_DIGITS else MASK_SIZE + 1
            if count <= 0 or len(row) + count > MASK_SIZE:
                raise MaskFormatError(f"row {number}: run {run.strip()[:40]!r} does not fit {MASK_SIZE} cells")
            row.extend([label] * count)
        if len(row) != MASK_SIZE:
            raise MaskFormatError(f"row {number} covers {len(row)} cells, not {MASK_SIZE}")
        grid.append(row)
    return grid


def _cell_edges(size: int) -> list[tuple[int, int]]:
    """[start, end) of each of the 24 cells: floor(np.linspace(0, size, 25)) in exact integer arithmetic.

    Images smaller than 24 pixels give empty cells; those take the single pixel at their start.
    """
    starts = [i * size // MASK_SIZE for i in range(MASK_SIZE)]
    return [(s, max(s + 1, (i + 1) * size // MASK_SIZE)) for i, s in enumerate(starts)]


def mask_to_grid(mask: np.ndarray, names: dict[int, str] | None = None) -> list[list[str]]:
    """Downsample an HxW label mask to the 24x24 grid by majority vote per cell (ties -> the smallest class id).

    ``names`` maps class id -> label (default ``{1: "target"}``, which suits bool masks); id 0 is ``others`` unless
    ``names`` says otherwise. An id with no name is an error rather than a made-up label.
    """
    array = np.asarray(mask)
    if array.ndim != 2 or 0 in array.shape:
        raise MaskFormatError(f"expected a non-empty 2-D mask, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        raise MaskFormatError(f"expected an integer or bool mask, got dtype {array.dtype}")
    lookup = {0: BACKGROUND, **({1: "target"} if names is None else names)}
    grid = []
    for r0, r1 in _cell_edges(array.shape[0]):
        row = []
        for c0, c1 in _cell_edges(array.shape[1]):
            values, counts = np.unique(array[r0:r1, c0:c1], return_counts=True)
            winner = int(values[np.argmax(counts)])  # unique() sorts, argmax takes the first: smallest id on ties
            if winner not in lookup:
                raise MaskFormatError(f"class id {winner} has no name (names: {sorted(lookup)})")
            row.append(lookup[winner])
        grid.append(row)
    return grid


def grid_to_mask(grid: Sequence[Sequence[str]] | np.ndarray, label: str) -> np.ndarray:
    """(24, 24) bool mask of the cells carrying ``label``."""
    return (np.array(_check_grid(grid), dtype=object) == label).astype(bool)


def grid_labels(grid: Sequence[Sequence[str]] | np.ndarray) -> list[str]:
    """Labels other than the background, in first-appearance (row-major) order."""
    seen: dict[str, None] = {}
    for row in grid:
        for cell in row:
            if cell != BACKGROUND:
                seen.setdefault(str(cell), None)
    return list(seen)


def upsample_grid_mask(mask24: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour (height, width) copy of a 24x24 mask, using the same cells as :func:`mask_to_grid`.

    Pixel y lies in cell (24 * (y + 1) - 1) // height, the last cell starting at or before y, so for images of at
    least 24x24 pixels ``mask_to_grid`` of the result gives the grid back exactly.
    """
    grid = np.asarray(mask24)
    if grid.shape != (MASK_SIZE, MASK_SIZE):
        raise MaskFormatError(f"expected a {MASK_SIZE}x{MASK_SIZE} mask, got shape {grid.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rows = (MASK_SIZE * (np.arange(height) + 1) - 1) // height
    cols = (MASK_SIZE * (np.arange(width) + 1) - 1) // width
    return grid[rows[:, None], cols[None, :]]


# --------------------------------------------------------------------------------------------------- class lists


def format_class_list(labels: Iterable[str]) -> str:
    """``a, b, c``; refuses labels that would not parse back (empty, with a comma or newline, or ``none``)."""
    clean = []
    for label in labels:
        text = " ".join(str(label).lower().split())
        if not text or "," in text or text == NONE_TEXT:
            raise FormatError(f"class label {label!r} cannot be written in a class list")
        clean.append(text)
    return ", ".join(clean) or NONE_TEXT


def parse_class_list(text: str) -> list[str]:
    """Comma-separated labels, lower-cased with whitespace collapsed; lenient on purpose (scene names vary)."""
    if _is_none(text):
        return []
    return [label for label in (" ".join(part.lower().split()) for part in text.split(",")) if label]


# --------------------------------------------------------------------------------------------------- pixels


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")


def box_to_pixels(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    _check_size(width, height)
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = width / 100.0, height / 100.0
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def box_from_pixels(box_px: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Pixel box -> 0..100 units, clamped to the image (annotations sometimes spill over the border)."""
    _check_size(width, height)
    x1, y1, x2, y2 = (float(v) for v in box_px)
    sx, sy = 100.0 / width, 100.0 / height
    return tuple(min(100.0, max(0.0, v)) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy))  # type: ignore[return-value]


def obb_to_pixels(obb: Sequence[float], width: float, height: float) -> tuple[float, float, float, float, float]:
    """Oriented box in 0..100 units -> pixels (cx, cy, w, h, angle in degrees, y down).

    The angle lives in the normalised frame, so on a non-square image a turned rectangle becomes a parallelogram
    in pixels. We scale the corners per axis and re-derive with :func:`obb_from_corners`: exact for square images
    and axis-aligned boxes; otherwise the ``w`` edge is exact and ``h`` is the length of the sheared side.
    """
    _check_size(width, height)
    corners = obb_corners(*(float(v) for v in obb)) * np.array([width / 100.0, height / 100.0])
    return obb_from_corners(corners)


# --------------------------------------------------------------------------------------------------- partial answers
#
# The strict parsers above refuse an answer with any flaw, which suits training targets. A generated answer can be
# cut by max_new_tokens or carry one malformed item among good ones; the runtime keeps what is well formed and
# says what it dropped, so one bad box does not cost the other twenty.

#: A [SEG] answer is kept when at least this many of its rows are well formed; fewer is mostly made-up background.
MIN_MASK_ROWS = MASK_SIZE // 2
_MAX_NOTES = 10  # notes kept per answer; ``dropped`` still counts every item


Span = tuple[int, int]  # [start, end) characters of the text a parser was given


@dataclass
class Salvage:
    """What a lenient parser kept, and how many items it dropped and why (one note per dropped item or row).

    ``spans``: for each kept item, the character ranges of the text that wrote it (a detection: its label and its
    box); for a mask, the ranges of each label's runs (``label_spans``). Answer scores read them."""

    items: list
    dropped: int = 0
    notes: list[str] | None = None
    spans: list[list[Span]] = field(default_factory=list)
    label_spans: dict[str, list[Span]] = field(default_factory=dict)

    def add(self, item: Any, *spans: Span) -> None:
        self.items.append(item)
        self.spans.append(list(spans))

    def drop(self, note: str) -> None:
        self.dropped += 1
        self.notes = (self.notes or []) + [note]

    def nothing_kept(self, what: str, text: str) -> str:
        """The error when no item survived: the first problem, or that there was no item at all."""
        if self.notes:
            return f"no well-formed {what}: {self.notes[0]}"
        return f"no {what} in {text[:80]!r} (and it is not 'none')"


def salvage_grouped(text: str, count: int, what: str, check) -> Salvage:
    """``label [..] [..]; label [..]`` -> the well-formed (label, shape) pairs in text order.

    A shape that is malformed or out of range, a bracket left open (an answer cut mid-box), a label that breaks the
    label grammar (with every shape under it) and a trailing label with no shape (cut before its first box) are each
    dropped and noted; the rest is kept. ``check`` orders box corners, so an inverted box (y2 < y1) is kept with
    its corners swapped, the same box the strict parser returns. Stray words between shapes are ignored. No shape
    kept and no ``none`` -> :class:`BoxFormatError`.
    """
    if _is_none(text):
        return Salvage([])
    found = Salvage([])
    offset = 0  # of the segment in ``text``
    for segment in text.split(";"):
        seg_at, offset = offset, offset + len(segment) + 1
        if not segment.strip():
            continue
        start = segment.find("[")
        if start < 0:
            found.drop(f"label {segment.strip()[:40]!r} has no {what}")
            continue
        shapes = list(_GROUP.finditer(segment, start))
        try:
            label = _clean_label(segment[:start], BoxFormatError)
        except BoxFormatError as exc:
            for _ in range(max(1, len(shapes))):
                found.drop(str(exc))
            continue
        label_at = seg_at + len(segment[:start]) - len(segment[:start].lstrip())
        label_span = (label_at, seg_at + len(segment[:start].rstrip()))
        for match in shapes:
            try:
                found.add((label, check(_int_group(match.group(0), count, what))), label_span,
                          (seg_at + match.start(), seg_at + match.end()))
            except BoxFormatError as exc:
                found.drop(f"{label}: {exc}")
        if "[" in _GROUP.sub(" ", segment[start:]):
            found.drop(f"{label}: unfinished {what} {segment[segment.rfind('['):][:40]!r}")
    if not found.items:
        raise BoxFormatError(found.nothing_kept(what, text))
    return found


def salvage_boxes(text: str) -> Salvage:
    """[VG] boxes, keeping the well-formed ones (corners ordered, as :func:`parse_boxes`)."""
    if _is_none(text):
        return Salvage([])
    found = Salvage([])
    for match in _GROUP.finditer(text):
        try:
            found.add(_check_box(_int_group(match.group(0), 4, "box")), match.span())
        except BoxFormatError as exc:
            found.drop(str(exc))
    if "[" in _GROUP.sub(" ", text):
        found.drop(f"unfinished box {text[text.rfind('['):][:40]!r}")
    if not found.items:
        raise BoxFormatError(found.nothing_kept("box", text))
    return found


def _mask_row(line: str, number: int, runs: list[tuple[str, Span]] | None = None) -> tuple[list[str], str | None]:
    """The cells of one mask row and None, or its leading well-formed runs that fit 24 cells and what is wrong.
    ``runs`` collects each kept run's label and its character range in ``line``."""
    row: list[str] = []
    at = 0
    for run in line.split(","):
        run_at, at = at, at + len(run) + 1
        match = _RUN.fullmatch(run)
        if match is None:
            return row, f"row {number}: {run.strip()[:40]!r} is not 'label*count'"
        try:
            label = _clean_label(match.group(1), MaskFormatError)
        except MaskFormatError as exc:
            return row, f"row {number}: {exc}"
        digits = match.group(2)
        count = int(digits) if len(digits) <= _MAX_DIGITS else MASK_SIZE + 1
        if count <= 0 or len(row) + count > MASK_SIZE:
            return row, f"row {number}: run {run.strip()[:40]!r} does not fit {MASK_SIZE} cells"
        row.extend([label] * count)
        if runs is not None:
            runs.append((label, (run_at, run_at + len(run))))
    if len(row) != MASK_SIZE:
        return row, f"row {number} covers {len(row)} cells, not {MASK_SIZE}"
    return row, None


def salvage_mask(text: str) -> tuple[Salvage, list[int]]:
    """A 24x24 grid from a mask answer with missing, extra or malformed rows, and the 0-based rows it filled.

    The rule: the first 24 non-blank lines are the grid's rows, lines after them are dropped (one note for all).
    A malformed row keeps its leading well-formed runs that fit in 24 cells and the rest of it is background
    (``others``); rows the answer did not reach (cut by max_new_tokens) are background. Every such row is listed
    as filled. Fewer than :data:`MIN_MASK_ROWS` well-formed rows -> :class:`MaskFormatError`: such a grid would be
    mostly invented background.
    """
    lines, starts = [], []
    at = 0
    for line in text.splitlines(keepends=True):
        if line.strip():
            lines.append(line.splitlines()[0])  # without its line break, whichever splitlines() saw
            starts.append(at)
        at += len(line)
    found = Salvage([])
    filled: list[int] = []
    for number, line in enumerate(lines[:MASK_SIZE], 1):
        runs: list[tuple[str, Span]] = []
        row, problem = _mask_row(line, number, runs)
        for label, (a, b) in runs:
            found.label_spans.setdefault(label, []).append((starts[number - 1] + a, starts[number - 1] + b))
        if problem is not None:
            found.drop(problem)
            filled.append(number - 1)
        found.items.append(row + [BACKGROUND] * (MASK_SIZE - len(row)))
    if len(lines) > MASK_SIZE:
        found.dropped += len(lines) - MASK_SIZE
        found.notes = (found.notes or []) + [f"{len(lines) - MASK_SIZE} rows after row {MASK_SIZE} dropped"]
    if len(lines) < MASK_SIZE:
        filled += list(range(len(lines), MASK_SIZE))
        found.notes = (found.notes or []) + [f"rows {len(lines) + 1}-{MASK_SIZE} missing, filled as {BACKGROUND}"]
        found.items += [[BACKGROUND] * MASK_SIZE for _ in range(MASK_SIZE - len(lines))]
    good = MASK_SIZE - len(filled)
    if good < MIN_MASK_ROWS:
        raise MaskFormatError(f"mask needs {MASK_SIZE} rows, got {good} well-formed of {len(lines)} "
                              f"(at least {MIN_MASK_ROWS} keep a partial mask)")
    return found, filled


# --------------------------------------------------------------------------------------------------- answers

FREE_TEXT_TAGS = ("[CAP]", "[VQA]", "[REF]", "[CCD]")


@dataclass
class ParsedAnswer:
    """A generated answer plus its structure. ``obbs`` holds oriented detections: (label, obb) pairs.

    ``partial``: the structure keeps only the well-formed part of the answer; ``dropped`` counts the items (boxes,
    mask rows) left out, ``notes`` says why, and ``filled_rows`` lists the mask rows (0-based) that are background
    because the answer did not give them well formed. See :func:`salvage_grouped` and :func:`salvage_mask`.
    """

    task: str
    text: str
    boxes: list | None = None
    obbs: list | None = None
    detections: list | None = None
    mask: list[list[str]] | None = None
    labels: list[str] | None = None
    error: str | None = None
    partial: bool = False
    dropped: int = 0
    notes: list[str] = field(default_factory=list)
    filled_rows: list[int] = field(default_factory=list)
    #: character ranges of ``text`` per kept box / detection, and per mask label (see :class:`Salvage`)
    item_spans: list[list[Span]] = field(default_factory=list)
    label_spans: dict[str, list[Span]] = field(default_factory=dict)

    def keep(self, found: Salvage) -> list:
        """Record what a lenient parser dropped; its kept items back."""
        self.item_spans, self.label_spans = found.spans, found.label_spans
        notes = list(found.notes or [])
        if len(notes) > _MAX_NOTES:  # a long garbled list would bury the JSON record in notes
            notes = notes[:_MAX_NOTES] + [f"... and {len(notes) - _MAX_NOTES} more"]
        self.dropped, self.notes = found.dropped, notes
        self.partial = bool(found.dropped or self.filled_rows)
        return found.items

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, labelled shapes become small objects; absent structure stays None."""
        return {
            "task": self.task,
            "text": self.text,
            "boxes": None if self.boxes is None else [list(b) for b in self.boxes],
            "obbs": None if self.obbs is None else [{"label": lab, "obb": list(o)} for lab, o in self.obbs],
            "detections": (None if self.detections is None
                           else [{"label": lab, "box": list(b)} for lab, b in self.detections]),
            "mask": None if self.mask is None else [list(row) for row in self.mask],
            "labels": None if self.labels is None else list(self.labels),
            "error": self.error,
            "partial": self.partial,
            "dropped": self.dropped,
            "notes": list(self.notes),
            "filled_rows": list(self.filled_rows),
        }


def _strip_answer(text: str) -> str:
    text = text.strip()
    if text.endswith(END):
        text = text[: -len(END)].rstrip()
    return text


def parse_answer(tag: str, text: str) -> ParsedAnswer:
    """Parse a generated answer by task tag. Never raises: a malformed answer comes back with ``error`` set.

    Box lists and masks keep their well-formed part (``partial`` set, see :class:`ParsedAnswer`); ``error`` is set
    only when nothing usable is left, and then every structure field is None.
    """
    answer = ParsedAnswer(task=str(tag), text=_strip_answer(text) if isinstance(text, str) else str(text))
    clean = answer.text
    try:
        if tag == "[VG]":
            answer.boxes = answer.keep(salvage_boxes(clean))
        elif tag == "[CLS]":
            answer.labels = parse_class_list(clean)
        elif tag == "[DET]":
            answer.detections = answer.keep(salvage_grouped(clean, 4, "box", _check_box))
        elif tag == "[OBB]":
            answer.obbs = answer.keep(salvage_grouped(clean, 5, "oriented box", _check_obb))
        elif tag == "[SEG]":
            found, answer.filled_rows = salvage_mask(clean)
            answer.mask = answer.keep(found)
        elif tag not in FREE_TEXT_TAGS:
            answer.error = f"unknown task tag {tag!r}; known tags: {' '.join(TAGS)}"
    except FormatError as exc:
        answer.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a parser bug must not take the runtime down; fuzz tests keep this dead
        answer.error = f"internal parser error: {type(exc).__name__}: {exc}"
    return answer
