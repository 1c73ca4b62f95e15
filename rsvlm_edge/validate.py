"""Checks on values a user hands the runtime (thread counts, prompt text), shared by the CLI and the Python API.

Each check runs before a model loads where it can, and fails with one line that names what was wrong.
"""

from __future__ import annotations

import os
import warnings


def cpu_affinity() -> set[int] | None:
    """The CPUs this process may run on (containers and ``taskset`` narrow them); None where the OS cannot say."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else every CPU), at least 1."""
    cpus = cpu_affinity()
    return max(1, len(cpus) if cpus is not None else os.cpu_count() or 1)


def cap_threads(threads: int | None, what: str = "threads") -> int | None:
    """None or 0 = the backend's default (all cores); 1..cores as given; more than the cores is capped with a warning.

    Thread pools past the core count only add contention, and each pool thread reserves a stack: 100,000 of them
    exhaust memory before the first tile.
    """
    if threads is None or threads == 0:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise ValueError(f"{what} must be a whole number of threads, got {threads!r}")
    if threads < 0:
        raise ValueError(f"{what} must be >= 1, got {threads}")
    cores = available_cores()
    if threads > cores:
        warnings.warn(f"{what} {threads} is more than the {cores} cores available here; using {cores}", stacklevel=2)
        return cores
    return threads


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8, or None. Argv bytes that are not UTF-8 arrive as lone surrogates,
    which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        piece = text[exc.start:exc.end]
        try:
            shown = "bytes " + piece.encode("utf-8", "surrogateescape").hex(" ")  # the bytes argv held
        except UnicodeEncodeError:
            shown = ascii(piece)
        return f"not valid UTF-8 text ({shown} at character {exc.start})"
    return None


def require_text(text: str, what: str) -> str:
    problem = utf8_problem(text)
    if problem:
        raise ValueError(f"{what} is {problem}")
    return text
