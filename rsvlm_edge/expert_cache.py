"""LRU cache of loaded experts under a byte budget, with pinning, background prefetch and counters.

Backends hand it a loader (expert index -> (object, bytes)); the cache decides what stays resident. With a budget of
one expert, only the expert in use is held, which is what makes rsunivlm-1b fit beside the vision encoder on small
boards. Prefetch runs the loader on a worker thread so an expert loads while the vision encoder runs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

Loader = Callable[[int], tuple[Any, int]]


class ExpertBudgetError(RuntimeError):
    """The pinned experts alone exceed the budget, or one expert is larger than the whole budget."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_ms: float = 0.0
    prefetches: int = 0
    resident: list[int] = field(default_factory=list)
    resident_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"expert_hits": self.hits, "expert_misses": self.misses, "expert_evictions": self.evictions,
                "expert_hit_rate": round(self.hits / total, 4) if total else 0.0,
                "expert_bytes_loaded": self.bytes_loaded, "expert_load_ms": round(self.load_ms, 2),
                "expert_prefetches": self.prefetches, "experts_resident": list(self.resident),
                "expert_resident_bytes": self.resident_bytes}


class ExpertCache:
    """Least-recently-used experts, evicted when the resident bytes would exceed ``budget_bytes``."""

    def __init__(self, loader: Loader, budget_bytes: int | None = None, pinned: tuple[int, ...] = (),
                 on_evict: Callable[[int, Any], None] | None = None, size_of: Callable[[int], int] | None = None):
        """``size_of(e)``, when the size is known before loading, lets the cache evict *before* it loads, so the
        resident bytes never exceed the budget, not even during a switch (otherwise peak = budget + one expert)."""
        self.loader, self.budget, self.pinned, self.on_evict = loader, budget_bytes, set(pinned), on_evict
        self.size_of = size_of
        self._items: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")
        self.stats = CacheStats()

    # ------------------------------------------------------------------ public
    def get(self, expert: int) -> Any:
        """The loaded expert, loading (or waiting for a prefetch) on a miss."""
        with self._lock:
            if expert in self._items:
                self._items.move_to_end(expert)
                self.stats.hits += 1
                return self._items[expert][0]
            pending = self._pending.get(expert)
        if pending is not None:
            return pending.result()  # the prefetch counted as the miss
        with self._lock:
            self.stats.misses += 1
        return self._load(expert)

    def prefetch(self, expert: int) -> None:
        """Start loading ``expert`` in the background if it is not resident."""
        with self._lock:
            if expert in self._items or expert in self._pending:
                return
            self.stats.misses += 1
            self.stats.prefetches += 1
            self._pending[expert] = self._pool.submit(self._load, expert)

    def resident(self) -> list[int]:
        with self._lock:
            return list(self._items)

    def resident_items(self) -> list[tuple[int, Any]]:
        """(expert, loaded object) of every resident expert, without touching the hit/miss counts or the order."""
        with self._lock:
            return [(expert, item) for expert, (item, _) in self._items.items()]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for expert in list(self._items):
                self._evict(expert)

    # ------------------------------------------------------------------ internals
    def _load(self, expert: int) -> Any:
        try:
            if self.size_of is not None and self.budget is not None:
                expected = self.size_of(expert)
                with self._lock:
                    if expected > self.budget:
                        raise ExpertBudgetError(
                            f"expert {expert} needs {expected:,} bytes, more than the budget of {self.budget:,}")
                    self._make_room(expected, keep=expert)
            t0 = time.perf_counter()
            value, size = self.loader(expert)
            elapsed = (time.perf_counter() - t0) * 1e3
            with self._lock:
                if self.budget is not None and size > self.budget:
                    raise ExpertBudgetError(f"expert {expert} needs {size:,} bytes, more than the budget of {self.budget:,}")
                self._make_room(size, keep=expert)
                self._items[expert] = (value, size)
                self.stats.bytes_loaded += size
                self.stats.load_ms += elapsed
                self._refresh()
            return value
        finally:
            with self._lock:
                self._pending.pop(expert, None)

    def _make_room(self, size: int, keep: int) -> None:
        if self.budget is None:
            return
        while self._used() + size > self.budget:
            victims = [e for e in self._items if e not in self.pinned and e != keep]
            if not victims:
                raise ExpertBudgetError(
                    f"cannot fit expert {keep} ({size:,} bytes): pinned experts {sorted(self.pinned)} already use "
                    f"{self._used():,} of the {self.budget:,}-byte budget")
            self._evict(victims[0])  # OrderedDict order = least recently used first

    def _evict(self, expert: int) -> None:
        value, _ = self._items.pop(expert)
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(expert, value)
        self._refresh()

    def _used(self) -> int:
        return sum(size for _, size in self._items.values())

    def _refresh(self) -> None:
        self.stats.resident = list(self._items)
        self.stats.resident_bytes = self._used()
