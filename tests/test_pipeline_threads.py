"""Threads sharing one Pipeline (and one ORT backend) under a one-expert budget get the single-thread answers.

The model is a random-init tiny export with the box pointer, so the four tasks use all three experts and the
[VG] answers come from the pointer: a freed expert shows up as a NaN box or a different token, not as an error.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from rsvlm_edge.config import tiny_config
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.pipeline import Pipeline
from rsvlm_edge.sampling import SamplingConfig

TASKS = ("seg", "vg", "cls", "cap")  # pixel, region (pointer), image, image experts
THREADS, PER_THREAD = 4, 4
SAMPLING = SamplingConfig(max_new_tokens=12)
ROUNDS = int(os.environ.get("RSVLM_THREAD_ROUNDS", "3"))  # the slow test runs 100


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = dataclasses.replace(tiny_config(), box_pointer=True, token_pos_embed=True).validate()
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt-threads"), cfg)
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx-threads") / "tiny")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thread-tiles")
    rng = np.random.default_rng(7)
    paths = []
    for i in range(PER_THREAD):
        paths.append(folder / f"tile{i}.png")
        Image.fromarray(rng.integers(0, 255, (96 + 8 * i, 120, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def pipe(engine):
    with_budget = Pipeline(engine, "ort", expert_budget_experts=1, threads=1)
    yield with_budget
    with_budget.close()


def work(thread: int) -> list[tuple[str, int]]:
    """Thread t asks (task, tile) pairs in its own order, so the threads switch experts against each other."""
    return [(TASKS[(thread + k) % len(TASKS)], (thread * 3 + k) % PER_THREAD) for k in range(PER_THREAD)]


def answer(pipe: Pipeline, tiles, task: str, tile: int) -> dict:
    out = pipe(tiles[tile], task=task, sampling=SAMPLING).to_dict()
    out.pop("timings_ms")
    return out


def start_and_join(worker) -> None:
    """``worker(t)`` on THREADS threads at once; returns when all have finished (or after 120 s each)."""
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def run_threads(pipe: Pipeline, tiles) -> tuple[dict, list[BaseException]]:
    answers: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for k, (task, tile) in enumerate(work(t)):
                answers[t, k] = answer(pipe, tiles, task, tile)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    start_and_join(worker)
    return answers, errors


def expected(pipe: Pipeline, tiles) -> dict:
    return {(t, k): answer(pipe, tiles, task, tile) for t in range(THREADS) for k, (task, tile) in enumerate(work(t))}


def check_rounds(pipe: Pipeline, tiles, rounds: int) -> float:
    want = expected(pipe, tiles)
    assert {a["expert"] for a in want.values()} == {"image", "region", "pixel"}
    assert all("pointer" in a for a in want.values() if a["task"] == "[VG]")  # the pointer wrote every [VG] box
    t0 = time.perf_counter()
    for round_ in range(rounds):
        got, errors = run_threads(pipe, tiles)
        assert not errors, f"round {round_}: {errors[:3]}"
        wrong = [key for key in want if got.get(key) != want[key]]
        assert not wrong, f"round {round_}: {len(wrong)} of {len(want)} answers differ, e.g. {got.get(wrong[0])}"
    assert pipe.backend.expert_cache.in_use() == {}  # every hold was released
    assert len(pipe.backend.stats()["experts_resident"]) == 1
    return time.perf_counter() - t0


def test_threads_sharing_a_pipeline_get_single_thread_answers(pipe, tiles):
    check_rounds(pipe, tiles, ROUNDS)


@pytest.mark.slow
def test_threads_sharing_a_pipeline_100_rounds(pipe, tiles):
    elapsed = check_rounds(pipe, tiles, 100)
    print(f"\n100 rounds of {THREADS} threads x {PER_THREAD} requests: {elapsed:.1f} s")


def test_backend_steps_from_threads_hold_their_expert(engine):
    """Below the generation lock: threads run decoder steps on their own caches at once, each on another expert,
    with room for one. Steps wait for each other's expert instead of freeing it, and match a lone run."""
    from rsvlm_edge.backends.ort_backend import OrtBackend

    backend = OrtBackend.from_dir(engine, expert_budget_experts=1, verify="size", threads=1)
    cfg = backend.config
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(THREADS, 1, 6, cfg.hidden_size)).astype(np.float32)

    def steps(t: int) -> list[np.ndarray]:
        cache = backend.new_cache(1, 12, t % cfg.num_experts)
        outs = []
        for step in range(2):
            positions = np.arange(6 * step, 6 * step + 6, dtype=np.int32)[None]
            outs.append(backend.forward(cache, embeds[t], positions, np.ones((1, 6 * step + 6), np.float32)))
        return outs

    want = [steps(t) for t in range(THREADS)]
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(5):
                got[t] = steps(t)
                for a, b in zip(got[t], want[t]):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    start_and_join(worker)
    assert not errors, errors[:3]
    assert backend.expert_cache.in_use() == {} and len(backend.stats()["experts_resident"]) == 1
    backend.close()
