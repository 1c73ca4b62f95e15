"""Language helpers shared by change captions and task emitters: position phrases on a 3x3 grid, counts in words,
plurals, lists joined with "and", object groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsvlm_edge.training.synthetic.scene import SceneObject
from rsvlm_edge.training.synthetic.vocab import NUMBER_WORDS, OBJECT_CLASSES, PLURALS


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _things(label: str, n: int) -> str:
    if n == 1:
        return f"an {label}" if label[0] in "aeiou" else f"a {label}"
    return f"{_count_word(n)} {PLURALS.get(label, label + 's')}"


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
