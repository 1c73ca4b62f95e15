"""Interleaved rounds and what is kept of them. Pure functions (no engines), so they are tested without the peers.

A shared VM's speed drifts by tens of percent within minutes. Running each engine once per round, the rounds one
after another and the order rotated each round, spreads that drift over every engine instead of charging it to
whichever ran in a slow phase; the table then gives each figure as its range over the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def schedule(engines: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, engine) in run order: every engine once per round, the order rotated by one each round."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    n = len(engines)
    return [(r, engines[(r + i) % n]) for r in range(rounds) for i in range(n)]


@dataclass
class Span:
    """The values one figure took over the rounds."""

    values: list[float] = field(default_factory=list)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


@dataclass
class EngineFigures:
    """One engine's measurements over the rounds, plus the constants of its files."""

    name: str
    prefill_s: Span = field(default_factory=Span)
    decode_tok_s: Span = field(default_factory=Span)
    peak_rss_mb: Span = field(default_factory=Span)
    weight_bytes_per_token: int | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how a round had to run (printed under the table)

    def add(self, measured: dict[str, Any]) -> None:
        self.prefill_s.values.append(float(measured["prefill_s"]))
        self.decode_tok_s.values.append(float(measured["decode_tok_s"]))
        self.peak_rss_mb.values.append(float(measured["peak_rss_mb"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "prefill_s": self.prefill_s.values, "decode_tok_s": self.decode_tok_s.values,
                "peak_rss_mb": self.peak_rss_mb.values, "weight_bytes_per_token": self.weight_bytes_per_token,
                "errors": self.errors, "notes": self.notes}


def collect(engines: list[str], results: list[tuple[str, dict[str, Any] | str]]) -> list[EngineFigures]:
    """Group (engine, measurement or error message) pairs by engine, in ``engines`` order; a measurement's
    ``note`` is kept once per engine."""
    figures = {name: EngineFigures(name) for name in engines}
    for name, measured in results:
        if isinstance(measured, str):
            figures[name].errors.append(measured)
            continue
        figures[name].add(measured)
        if measured.get("note") and measured["note"] not in figures[name].notes:
            figures[name].notes.append(measured["note"])
    return [figures[name] for name in engines]
