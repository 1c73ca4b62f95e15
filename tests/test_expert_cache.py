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
