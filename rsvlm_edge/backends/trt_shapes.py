"""Which optimization profile a call runs in, and how a call no profile covers is split. Pure (no TensorRT needed).

Plans only accept shapes inside one of their profiles (recorded per component in the TensorRT manifest). Rather
than failing, the backend splits work the profiles do not cover into pieces that they do:

* batches larger than a profile's batch range (a DLA-built vision encoder has a static batch) run in chunks;
* decoder calls are split along the sequence: a chat turn appended to a filled cache (``past_seq`` > 0 and
  ``seq`` > 1, which neither the prefill nor the decode profile covers) or a prompt longer than the prefill
  profile runs as the longest pieces that fit, down to single tokens through the decode profile. Causal attention
  makes that exact: a token sees the same keys whether its predecessors came in the same call or an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsvlm_edge.manifest import Component

Shape = tuple[int, ...]


class ShapeError(ValueError):
    """No profile can run a call, not even split (e.g. the context is longer than the plans were built for)."""


@dataclass(frozen=True)
class ProfileRange:
    index: int
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)

    def fits(self, shapes: dict[str, Shape]) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not (a <= d <= b) for a, d, b in zip(lo, shape, hi)):
                return False
        return True


def read_profiles(component: Component) -> list[ProfileRange]:
    raw = component.extra.get("profiles")
    if not raw:
        raise ShapeError(f"{component.name}: the manifest records no optimization profiles; rebuild the plans")
    return [ProfileRange(i, str(p["name"]), {k: tuple(tuple(int(d) for d in s) for s in v)  # type: ignore[misc]
                                             for k, v in p["shapes"].items()})
            for i, p in enumerate(raw)]


def axis_ranges(component: Component, profile: ProfileRange) -> dict[str, tuple[int, int]]:
    """Named axis -> (min, max) a profile allows, intersected over every input that has the axis."""
    ranges: dict[str, tuple[int, int]] = {}
    for spec in component.inputs:
        lo, _, hi = profile.shapes[spec.name]
        for dim, a, b in zip(spec.shape, lo, hi):
            if isinstance(dim, str):
                old = ranges.get(dim, (a, b))
                ranges[dim] = (max(old[0], a), min(old[1], b))
    return ranges


def concrete_shapes(component: Component, axes: dict[str, int]) -> dict[str, Shape]:
    """Input shapes for named axis values (the manifest's shapes with names filled in)."""
    return {spec.name: tuple(d if isinstance(d, int) else axes[d] for d in spec.shape) for spec in component.inputs}


def pick_profile(component: Component, profiles: list[ProfileRange], axes: dict[str, int]) -> ProfileRange | None:
    shapes = concrete_shapes(component, axes)
    return next((p for p in profiles if p.fits(shapes)), None)


def batch_chunks(component: Component, profiles: list[ProfileRange], batch: int, axes: dict[str, int]) -> list[tuple[int, int, int]]:
    """(start, stop, profile index) pieces of a batch that each fit a profile (other axes as given)."""
    pieces, start = [], 0
    while start < batch:
        best: tuple[int, int] | None = None
        for p in profiles:
            lo, hi = axis_ranges(component, p).get("batch", (1, batch))
            size = min(hi, batch - start)
            if size >= lo and p.fits(concrete_shapes(component, {**axes, "batch": size})) and (best is None or size > best[0]):
                best = (size, p.index)
        if best is None:
            raise ShapeError(f"{component.name}: no optimization profile runs batch {batch - start} with {axes}; "
                             f"rebuild the plans with a preset that covers it")
        pieces.append((start, start + best[0], best[1]))
        start += best[0]
    return pieces


def decoder_steps(component: Component, profiles: list[ProfileRange], batch: int, past: int, seq: int) -> list[tuple[int, int, int]]:
    """(offset, length, profile index) pieces of ``seq`` new tokens after ``past`` cached ones, longest first fit."""
    steps, offset = [], 0
    while offset < seq:
        best: tuple[int, int] | None = None
        cached = past + offset
        for p in profiles:
            r = axis_ranges(component, p)
            if not (r["batch"][0] <= batch <= r["batch"][1] and r["past_seq"][0] <= cached <= r["past_seq"][1]):
                continue
            lo = max(r["seq"][0], r["total_seq"][0] - cached)
            length = min(seq - offset, r["seq"][1], r["total_seq"][1] - cached)
            if length >= max(lo, 1) and (best is None or length > best[0]):
                best = (length, p.index)
        if best is None:
            raise ShapeError(f"{component.name}: no optimization profile runs batch {batch} at cache length {cached} "
                             f"(the plans cover {_describe(component, profiles)}); rebuild with a larger preset")
        steps.append((offset, best[0], best[1]))
        offset += best[0]
    return steps


def _describe(component: Component, profiles: list[ProfileRange]) -> str:
    parts = []
    for p in profiles:
        r = axis_ranges(component, p)
        parts.append(f"{p.name}: " + ", ".join(f"{k} {a}..{b}" for k, (a, b) in sorted(r.items())))
    return "; ".join(parts)
