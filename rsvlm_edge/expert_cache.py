"""LRU cache of loaded experts under a byte budget, with pinning, reference counts, background prefetch and counters.

Backends hand it a loader (expert index -> (object, bytes)); the cache decides what stays resident. With a budget of
one expert, only the expert in use is held, which is what makes rsunivlm-1b fit beside the vision encoder on small
boards. Prefetch runs the loader on a worker thread so an expert loads while the vision encoder runs.

Thread safety: a caller uses an expert only between :meth:`ExpertCache.acquire` and :meth:`ExpertCache.release`
(or inside ``with cache.hold(e) as value``). An expert in use is never evicted: it is what a running session reads
its weights from, and freeing it mid-run gives wrong answers, not an error. A load that needs the room held by
experts in use *waits* for their release rather than failing; :class:`ExpertBudgetError` is raised only when the
load can never fit (one expert larger than the budget, pinned experts filling it, or the budget filled by experts
the calling thread itself holds). Concurrent requests for one expert share one load.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

Loader = Callable[[int], tuple[Any, int]]


class ExpertBudgetError(RuntimeError):
    """The pinned experts alone exceed the budget, one expert is larger than the whole budget, or the caller holds
    the experts that fill it."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_ms: float = 0.0
    prefetches: int = 0
    waits: int = 0  # loads that waited for another thread to release an expert
    resident: list[int] = field(default_factory=list)
    resident_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"expert_hits": self.hits, "expert_misses": self.misses, "expert_evictions": self.evictions,
                "expert_hit_rate": round(self.hits / total, 4) if total else 0.0,
                "expert_bytes_loaded": self.bytes_loaded, "expert_load_ms": round(self.load_ms, 2),
                "expert_prefetches": self.prefetches, "expert_waits": self.waits,
                "experts_resident": list(self.resident), "expert_resident_bytes": self.resident_bytes}


class ExpertCache:
    """Least-recently-used experts, evicted when the resident bytes would exceed ``budget_bytes``.

    Bookkeeping, all under one condition variable:

    * ``_items``: resident experts (value, bytes), least recently used first;
    * ``_refs``: per expert, the callers holding it or waiting for its load (never evicted while > 0);
    * ``_holders``: per thread, the experts it holds (to refuse a wait only the caller could end);
    * ``_loading``: one future per load in flight; ``_reserved``: the bytes set aside for it.
    """

    def __init__(self, loader: Loader, budget_bytes: int | None = None, pinned: tuple[int, ...] = (),
                 on_evict: Callable[[int, Any], None] | None = None, size_of: Callable[[int], int] | None = None):
        """``size_of(e)``, when the size is known before loading, lets the cache evict *before* it loads, so the
        resident bytes never exceed the budget, not even during a switch (otherwise peak = budget + one expert)."""
        self.loader, self.budget, self.pinned, self.on_evict = loader, budget_bytes, set(pinned), on_evict
        self.size_of = size_of
        self._items: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._refs: Counter[int] = Counter()
        self._holders: dict[int, Counter[int]] = {}
        self._loading: dict[int, Future] = {}
        self._reserved: dict[int, int] = {}
        self._cond = threading.Condition(threading.RLock())
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")
        self.stats = CacheStats()

    # ------------------------------------------------------------------ public
    def acquire(self, expert: int) -> Any:
        """The loaded expert, held (not evictable) until :meth:`release`; loads, or waits for a load, on a miss."""
        me = threading.get_ident()
        with self._cond:
            self._refs[expert] += 1  # from here on no other thread evicts it
            self._holders.setdefault(me, Counter())[expert] += 1
        waited = False  # for another thread's load or a prefetch, which counted the miss
        try:
            while True:
                with self._cond:
                    if expert in self._items:
                        self._items.move_to_end(expert)
                        self.stats.hits += 0 if waited else 1
                        return self._items[expert][0]
                    future = self._loading.get(expert)
                    if future is None:  # nobody loads it: this thread does
                        self.stats.misses += 1
                        future = self._start_load(expert)
                        mine = True
                    else:
                        mine = False  # a prefetch (counted as the miss) or another thread's load
                if mine:
                    self._run_load(expert, future)
                    with self._cond:
                        return self._items[expert][0]
                future.result()  # re-raises the loader's error; on success the loop finds it resident
                waited = True
        except BaseException:
            self.release(expert)
            raise

    def release(self, expert: int) -> None:
        """End one :meth:`acquire` of ``expert`` by this thread; wakes loads waiting for room."""
        me = threading.get_ident()
        with self._cond:
            held = self._holders.get(me)
            if not held or held[expert] <= 0 or self._refs[expert] <= 0:
                raise RuntimeError(f"expert {expert} released by a thread that does not hold it")
            held[expert] -= 1
            if not +held:
                del self._holders[me]
            self._refs[expert] -= 1
            if self._refs[expert] <= 0:
                del self._refs[expert]
            self._cond.notify_all()

    @contextmanager
    def hold(self, expert: int) -> Iterator[Any]:
        """``with cache.hold(e) as value:`` the expert stays resident for the block."""
        value = self.acquire(expert)
        try:
            yield value
        finally:
            self.release(expert)

    def get(self, expert: int) -> Any:
        """The loaded expert, not held: it may be evicted as soon as another load needs the room, so only a
        single-threaded caller may use the value afterwards. Everything that runs the expert uses :meth:`hold`."""
        with self.hold(expert) as value:
            return value

    def prefetch(self, expert: int) -> None:
        """Start loading ``expert`` in the background if it is neither resident nor loading."""
        with self._cond:
            if expert in self._items or expert in self._loading:
                return
            self.stats.misses += 1
            self.stats.prefetches += 1
            future = self._start_load(expert)
        self._pool.submit(self._prefetch_load, expert, future)

    def in_use(self) -> dict[int, int]:
        """expert -> callers holding it or waiting for its load."""
        with self._cond:
            return dict(self._refs)

    def resident(self) -> list[int]:
        with self._cond:
            return list(self._items)

    def resident_items(self) -> list[tuple[int, Any]]:
        """(expert, loaded object) of every resident expert, without touching the hit/miss counts or the order."""
        with self._cond:
            return [(expert, item) for expert, (item, _) in self._items.items()]

    def close(self) -> None:
        """Wait for background loads, then evict every expert (callers must no longer hold any)."""
        self._pool.shutdown(wait=True)
        with self._cond:
            for expert in list(self._items):
                self._evict(expert)

    # ------------------------------------------------------------------ loading
    def _start_load(self, expert: int) -> Future:
        future: Future = Future()
        self._loading[expert] = future
        return future

    def _prefetch_load(self, expert: int, future: Future) -> None:
        try:
            self._run_load(expert, future)
        except Exception:  # noqa: BLE001 - kept in the future: the request that needs the expert re-raises it
            pass

    def _run_load(self, expert: int, future: Future) -> None:
        """Make room, load, publish; the outcome (or the error) goes to everyone waiting on ``future``."""
        try:
            value = self._load(expert)
        except BaseException as exc:
            with self._cond:
                self._loading.pop(expert, None)
                self._reserved.pop(expert, None)
                self._cond.notify_all()
            future.set_exception(exc)
            raise
        with self._cond:
            self._loading.pop(expert, None)
            self._cond.notify_all()
        future.set_result(value)

    def _load(self, expert: int) -> Any:
        if self.size_of is not None and self.budget is not None:
            expected = self.size_of(expert)
            with self._cond:
                self._make_room(expected, expert)
                self._reserved[expert] = expected
        t0 = time.perf_counter()
        value, size = self.loader(expert)
        elapsed = (time.perf_counter() - t0) * 1e3
        with self._cond:
            self._reserved.pop(expert, None)
            try:
                self._make_room(size, expert)
            except BaseException:
                if self.on_evict is not None:  # loaded but never published: free it like an evicted one
                    self.on_evict(expert, value)
                raise
            self._items[expert] = (value, size)
            self.stats.bytes_loaded += size
            self.stats.load_ms += elapsed
            self._refresh()
        return value

    def _make_room(self, size: int, expert: int) -> None:
        """Evict unused experts (least recently used first) until ``size`` more bytes fit; wait while only
        experts in use stand in the way. Called with the lock held; ``wait`` releases it."""
        if self.budget is None:
            return
        if size > self.budget:
            raise ExpertBudgetError(f"expert {expert} needs {size:,} bytes, more than the budget of {self.budget:,}")
        waited = False
        while self._used() + size > self.budget:
            victims = [e for e in self._items if e not in self.pinned and e != expert and not self._refs[e]]
            if victims:
                self._evict(victims[0])  # OrderedDict order = least recently used first
                continue
            pinned = sum(s for e, (_, s) in self._items.items() if e in self.pinned)
            if pinned + size > self.budget:
                raise ExpertBudgetError(
                    f"cannot fit expert {expert} ({size:,} bytes): pinned experts {sorted(self.pinned)} already use "
                    f"{pinned:,} of the {self.budget:,}-byte budget")
            # only experts in use (and loads in flight, which always end) stand in the way: wait, unless every
            # one of them is held by this very thread, whose wait nobody else could end
            mine = self._holders.get(threading.get_ident(), Counter())
            in_use = [e for e in self._items if e != expert and e not in self.pinned]
            if not self._reserved and all(mine[e] >= self._refs[e] for e in in_use):
                raise ExpertBudgetError(
                    f"cannot fit expert {expert} ({size:,} bytes): this thread holds experts {sorted(in_use)}, which "
                    f"fill the {self.budget:,}-byte budget; release them first or raise the budget")
            if not waited:
                self.stats.waits += 1
                waited = True
            self._cond.wait()  # an expert in use is released, or a load finishes or fails

    def _evict(self, expert: int) -> None:
        value, _ = self._items.pop(expert)
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(expert, value)
        self._refresh()

    def _resident_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def _used(self) -> int:
        """Resident bytes plus the bytes set aside for loads in flight."""
        return self._resident_bytes() + sum(self._reserved.values())

    def _refresh(self) -> None:
        self.stats.resident = list(self._items)
        self.stats.resident_bytes = self._resident_bytes()
