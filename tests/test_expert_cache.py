import threading
import time

import pytest

from rsvlm_edge.expert_cache import ExpertBudgetError, ExpertCache


def make_loader(sizes, log, delay=0.0):
    def load(expert):
        time.sleep(delay)
        log.append(expert)
        return f"expert-{expert}", sizes[expert]
    return load


def test_lru_eviction_under_budget():
    log, evicted = [], []
    cache = ExpertCache(make_loader({0: 100, 1: 100, 2: 100}, log), budget_bytes=200,
                        on_evict=lambda e, v: evicted.append(e))
    assert cache.get(0) == "expert-0"
    cache.get(1)
    cache.get(0)  # 0 becomes most recent
    cache.get(2)  # evicts 1 (least recently used)
    assert evicted == [1] and sorted(cache.resident()) == [0, 2]
    s = cache.stats.as_dict()
    assert (s["expert_hits"], s["expert_misses"], s["expert_bytes_loaded"]) == (1, 3, 300)
    assert s["expert_resident_bytes"] == 200


def test_budget_of_one_expert_keeps_only_the_current_one():
    log = []
    cache = ExpertCache(make_loader({0: 10, 1: 10, 2: 10}, log), budget_bytes=10)
    for e in [0, 1, 1, 2, 0]:
        cache.get(e)
        assert cache.resident() == [e]
    assert log == [0, 1, 2, 0]


def test_known_sizes_evict_before_loading():
    """With sizes known up front, the resident bytes never exceed the budget, not even while switching."""
    sizes, peak, resident = {0: 10, 1: 10, 2: 10}, [], []
    cache: ExpertCache

    def load(expert):
        peak.append(sum(sizes[e] for e in cache.resident()) + sizes[expert])  # what would be in memory now
        return f"expert-{expert}", sizes[expert]

    cache = ExpertCache(load, budget_bytes=10, size_of=sizes.__getitem__)
    for e in [0, 1, 2, 0]:
        cache.get(e)
        resident.append(cache.resident())
    assert max(peak) == 10 and resident == [[0], [1], [2], [0]]
    with pytest.raises(ExpertBudgetError, match="more than the budget"):
        ExpertCache(load, budget_bytes=5, size_of=sizes.__getitem__).get(0)


def test_pinned_experts_are_never_evicted():
    cache = ExpertCache(make_loader({0: 10, 1: 10, 2: 10}, []), budget_bytes=20, pinned=(0,))
    for e in [0, 1, 2, 1, 2]:
        cache.get(e)
    assert 0 in cache.resident()
    tight = ExpertCache(make_loader({0: 10, 1: 10}, []), budget_bytes=10, pinned=(0,))
    tight.get(0)
    with pytest.raises(ExpertBudgetError, match="pinned"):
        tight.get(1)


def test_expert_larger_than_budget_is_refused():
    with pytest.raises(ExpertBudgetError, match="more than the budget"):
        ExpertCache(make_loader({0: 50}, []), budget_bytes=10).get(0)


def test_prefetch_loads_in_background_and_get_waits():
    log = []
    cache = ExpertCache(make_loader({0: 1, 1: 1}, log, delay=0.2), budget_bytes=None)
    t0 = time.perf_counter()
    cache.prefetch(1)
    assert time.perf_counter() - t0 < 0.1  # returned at once
    assert cache.get(1) == "expert-1"
    cache.prefetch(1)  # already resident: no second load
    cache.get(1)
    assert log == [1]
    assert cache.stats.prefetches == 1 and cache.stats.misses == 1 and cache.stats.hits == 1
    cache.close()


def test_concurrent_gets_are_safe():
    cache = ExpertCache(make_loader({0: 1, 1: 1, 2: 1}, []), budget_bytes=2)
    errors = []

    def worker(seq):
        try:
            for e in seq:
                assert cache.get(e) == f"expert-{e}"
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=([i % 3, (i + 1) % 3] * 20,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache.resident()) <= 2


# ---------------------------------------------------------------------------------------------- reference counts
def tracked_cache(budget, sizes, delay=0.0, **kw):
    """A cache whose evictions mark the value freed, so a test can check no one used a freed expert."""
    freed: set[int] = set()
    loads: list[int] = []

    def load(expert):
        time.sleep(delay)
        loads.append(expert)
        freed.discard(expert)
        return {"expert": expert, "freed": False}, sizes[expert]

    def evict(expert, value):
        value["freed"] = True
        freed.add(expert)

    cache = ExpertCache(load, budget_bytes=budget, on_evict=evict, **kw)
    return cache, loads, freed


def start(fn, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_expert_in_use_is_not_evicted_and_the_other_load_waits():
    cache, loads, freed = tracked_cache(10, {0: 10, 1: 10}, size_of={0: 10, 1: 10}.__getitem__)
    held = cache.acquire(0)
    thread, out = start(cache.acquire, 1)  # budget of one expert, held by this thread: must wait, not fail
    thread.join(0.3)
    assert thread.is_alive() and not held["freed"] and loads == [0] and cache.in_use() == {0: 1, 1: 1}
    cache.release(0)
    thread.join(5)
    assert not thread.is_alive() and "error" not in out
    assert out["value"]["expert"] == 1 and held["freed"] and cache.resident() == [1]
    assert cache.stats.waits == 1 and cache.stats.evictions == 1


def test_a_thread_that_holds_the_budget_is_told_instead_of_waiting_forever():
    cache, _, _ = tracked_cache(10, {0: 10, 1: 10})
    with cache.hold(0):
        with pytest.raises(ExpertBudgetError, match="this thread holds experts \\[0\\]"):
            cache.acquire(1)
        assert cache.in_use() == {0: 1}  # the failed acquire left no reference behind
    assert cache.in_use() == {}
    assert cache.get(1)["expert"] == 1  # released: the switch works


def test_concurrent_first_uses_share_one_load():
    """Several threads asking for an expert that is not resident: one load, no budget error (each thread used to
    load its own copy and then find the budget full of that very expert)."""
    cache, loads, _ = tracked_cache(10, {0: 10}, delay=0.2)
    barrier = threading.Barrier(4)

    def use():
        barrier.wait()
        with cache.hold(0) as value:
            return value["expert"]

    runs = [start(use) for _ in range(4)]
    for thread, _ in runs:
        thread.join(5)
    assert [out.get("value") for _, out in runs] == [0, 0, 0, 0] and loads == [0]
    assert cache.stats.misses == 1 and cache.in_use() == {}


def test_failed_load_releases_and_the_next_call_retries():
    attempts = []

    def load(expert):
        attempts.append(expert)
        if len(attempts) == 1:
            raise OSError("disk hiccup")
        return f"expert-{expert}", 10

    cache = ExpertCache(load, budget_bytes=10)
    with pytest.raises(OSError, match="hiccup"):
        cache.acquire(0)
    assert cache.in_use() == {} and cache.resident() == []
    assert cache.get(0) == "expert-0" and attempts == [0, 0]


def test_release_without_acquire_is_an_error():
    cache, _, _ = tracked_cache(10, {0: 10})
    with pytest.raises(RuntimeError, match="does not hold"):
        cache.release(0)
    cache.acquire(0)
    thread, out = start(cache.release, 0)  # another thread cannot release this thread's hold
    thread.join(5)
    assert isinstance(out.get("error"), RuntimeError)
    cache.release(0)


def test_prefetch_waits_for_the_expert_in_use_to_be_released():
    cache, loads, _ = tracked_cache(10, {0: 10, 1: 10}, size_of={0: 10, 1: 10}.__getitem__)
    with cache.hold(0) as zero:
        cache.prefetch(1)  # the worker must not evict 0 under us
        time.sleep(0.2)
        assert loads == [0] and not zero["freed"]
    assert cache.get(1)["expert"] == 1 and loads == [0, 1]
    cache.close()


@pytest.mark.parametrize("budget,pinned", [(10, ()), (20, ()), (20, (2,))])
def test_many_threads_never_use_a_freed_expert(budget, pinned):
    """8 threads x 60 uses of random experts under a tight budget: every value is intact for as long as it is
    held, the budget is never exceeded, no spurious budget error, and every hold is released at the end."""
    import random

    sizes = {0: 10, 1: 10, 2: 10}
    cache, _, _ = tracked_cache(budget, sizes, delay=0.001, pinned=pinned, size_of=sizes.__getitem__)
    errors: list[BaseException] = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(60):
                expert = rng.randrange(3)
                if rng.random() < 0.2:
                    cache.prefetch(rng.randrange(3))
                with cache.hold(expert) as value:
                    assert value["expert"] == expert and not value["freed"]
                    assert sum(sizes[e] for e in cache.resident()) <= budget
                    time.sleep(rng.random() * 0.002)
                    assert not value["freed"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert cache.in_use() == {} and sum(sizes[e] for e in cache.resident()) <= budget
    if pinned:
        assert set(pinned) <= set(cache.resident())
    cache.close()
