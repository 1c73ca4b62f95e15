"""The automatic thread count: one thread for a small decoder, the free cores for a large one, OMP_NUM_THREADS
when set; and the ort backend (the default for infer, chat, eval and bench) uses it when given no count."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rsvlm_edge.config import preset, tiny_config
from rsvlm_edge.pipeline import Pipeline
from rsvlm_edge.threads import SMALL_DECODER_PARAMS, decoder_work, default_threads, explain, free_cores, idle_cpus, physical_cores
from rsvlm_edge.validate import available_cores

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_small_decoder_gets_one_thread_large_one_the_cores(cores):
    assert default_threads(tiny_config(), cores, NO_ENV) == 1
    assert default_threads(preset("rsunivlm-1b"), cores, NO_ENV) == cores


def test_the_rule_reads_configs_dicts_and_counts():
    cfg = preset("rsunivlm-1b")
    assert decoder_work(cfg.to_dict()) == decoder_work(cfg) > SMALL_DECODER_PARAMS > decoder_work(tiny_config())
    assert default_threads(SMALL_DECODER_PARAMS - 1, 4, NO_ENV) == 1
    assert default_threads(SMALL_DECODER_PARAMS, 4, NO_ENV) == 4


@pytest.mark.skipif(not (DEMO / "manifest.json").exists(), reason="demo model not built")
def test_manifest_model_config_is_small():
    model_config = json.loads((DEMO / "manifest.json").read_text())["model_config"]
    assert default_threads(model_config, 2, NO_ENV) == 1


@pytest.mark.parametrize("value,expected", [("3", 3), ("64", 8), ("", 1), ("0", 1), ("two", 1), ("-2", 1)])
def test_omp_num_threads_replaces_the_rule_when_it_is_a_positive_count(value, expected):
    assert default_threads(tiny_config(), 8, {"OMP_NUM_THREADS": value}) == expected
    used = value in ("3", "64")
    assert ("OMP_NUM_THREADS" in explain(tiny_config(), expected, {"OMP_NUM_THREADS": value})) == used


@pytest.mark.parametrize("bad", [True, -1, 2.5])
def test_nonsense_model_sizes_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        default_threads(bad, 2, NO_ENV)


def test_cores_must_be_positive():
    with pytest.raises(ValueError, match="cores"):
        default_threads(tiny_config(), 0, NO_ENV)


def test_free_cores_counts_the_affinity_less_busy_cores():
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}
    assert 1 <= free_cores(window_s=0.05) <= physical_cores() <= len(allowed)
    assert free_cores({min(allowed)}, window_s=0.05) == 1


def test_idle_cpus_sees_a_busy_core():
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if not allowed or idle_cpus(allowed, 0.01) is None:
        pytest.skip("no per-CPU times here")
    cpu = min(allowed)
    os.sched_setaffinity(0, {cpu})
    try:
        with ThreadPoolExecutor(1) as pool:  # keep this CPU busy while it is watched
            stop = time.monotonic() + 0.6
            spin = pool.submit(lambda: sum(1 for _ in iter(lambda: time.monotonic() < stop, False)))
            time.sleep(0.05)
            idle = idle_cpus({cpu}, 0.3)
            spin.result()
    finally:
        os.sched_setaffinity(0, allowed)
    assert idle is not None and idle < 0.5


def test_explain_names_the_count_and_the_reason():
    assert explain(tiny_config(), 1, NO_ENV).startswith("1 (auto: small decoder, 3.8 M multiply-adds per token")
    assert "2 of" in explain(preset("rsunivlm-1b"), 2, NO_ENV)


@pytest.mark.skipif(not (DEMO / "manifest.json").exists(), reason="demo model not built")
def test_ort_backend_without_a_count_uses_the_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with Pipeline(DEMO) as pipe:
        assert pipe.backend.threads == default_threads(pipe.config) == 1
    with Pipeline(DEMO, threads=2) as pipe:
        assert pipe.backend.threads == min(2, available_cores())
