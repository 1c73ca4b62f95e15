"""Tiles/s of ``infer`` batches on a Ray actor pool against the local loop, and the per-tile cost Ray adds.

    python -m rsvlm_edge.distributed.bench MODEL_DIR [--tiles 96] [--batch-size 4] [--task cls] [--rounds 3]

Starts a one-machine cluster (three logical CPUs on this machine's cores, so the 1- and 2-actor pools are held at
once; only one pool runs at a time), then times the same batches (synthetic RGB tiles at the model's input size) three
ways, each in steady state (engines loaded, one warm-up batch done): the local loop (one pipeline, one thread),
a 1-actor pool and a 2-actor pool (one thread per actor). The three alternate for ``--rounds`` rounds, so a
neighbour's load on a shared machine skews them alike; tiles/s is each one's best round (the least disturbed).

Ray's per-tile overhead is counted in CPU time, which a neighbour's load does not inflate the way it inflates
wall time: the CPU seconds of this process and every process it started (Ray's raylet, GCS and workers; their
idle cost counts in both), per tile, for the 1-actor pool against the local loop, over all rounds. On a machine
with a free core per actor that is what the pool costs: the round trip itself is hidden, the next batch already
waits on the actor. ``two_process_ceiling`` is what two busy processes of this run get done against one,
measured just before: where the machine has no second core free (neighbours' load, or Linux autogroup giving a
session one share), no pool can scale past it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from rsvlm_edge.distributed.executor import RayExecutor
from rsvlm_edge.distributed.infer import infer_batch
from rsvlm_edge.distributed.settings import RaySettings
from rsvlm_edge.machine import cpu_description
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import make_instruction, max_new_tokens_for, split_tag


def write_tiles(folder: Path, count: int, size: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"tile{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append([str(path)])
    return paths


def _spin(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n


def two_process_ceiling(seconds: float = 2.0) -> float:
    """Work two busy processes get done in ``seconds`` over what one gets done: 2.0 on two free cores."""
    from multiprocessing import Pool

    with Pool(1) as one:
        alone = sum(one.map(_spin, [seconds]))
    with Pool(2) as two:
        pair = sum(two.map(_spin, [seconds, seconds]))
    return pair / alone


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, used = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        parent[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(used.get(pid, 0.0) for pid in tree)


def _timed(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def measure(model_dir: str, tiles: int, batch_size: int, task: str, rounds: int) -> dict[str, Any]:
    import ray

    from rsvlm_edge.manifest import Manifest
    from rsvlm_edge.pipeline import Pipeline

    instruction = make_instruction(task, None)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens_for(split_tag(instruction)[0]), constrain=True)
    size = Manifest.load(model_dir, verify=False).config().image_size
    ceiling = two_process_ceiling()
    with tempfile.TemporaryDirectory() as tmp:
        groups = write_tiles(Path(tmp), tiles, size)
        jobs = [(groups[i:i + batch_size], None, instruction, sampling, True) for i in range(0, tiles, batch_size)]
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        times: dict[str, list[float]] = {}
        cpu: dict[str, float] = {}  # CPU seconds of the process tree, all rounds
        with Pipeline(model_dir, threads=1) as pipe, \
                RayExecutor(RaySettings(actors=1), model_dir) as one, RayExecutor(RaySettings(actors=2), model_dir) as two:
            runs: dict[str, Callable[[], Any]] = {
                "local": lambda: [infer_batch(pipe, job) for job in jobs],
                "ray_1_actor": lambda: list(one.map(infer_batch, jobs)),
                "ray_2_actors": lambda: list(two.map(infer_batch, jobs)),
            }
            infer_batch(pipe, jobs[0])  # warm-up: first-call allocations, expert loads
            list(one.map(infer_batch, jobs[:1]))
            list(two.map(infer_batch, jobs[:2]))
            for _ in range(rounds):
                for name, run in runs.items():
                    cpu0 = tree_cpu_seconds()
                    times.setdefault(name, []).append(_timed(run))
                    cpu[name] = cpu.get(name, 0.0) + tree_cpu_seconds() - cpu0
    per_tile = {name: min(seconds) / tiles for name, seconds in times.items()}
    cpu_ms = {name: seconds / (tiles * rounds) * 1e3 for name, seconds in cpu.items()}
    return {"cpu": cpu_description(), "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1),
            "tiles": tiles, "batch_size": batch_size, "task": task, "threads_per_actor": 1,
            "tiles_per_s": {name: round(1 / s, 2) for name, s in per_tile.items()},
            "rounds": rounds, "cpu_ms_per_tile": {name: round(ms, 2) for name, ms in cpu_ms.items()},
            "ray_overhead_cpu_ms_per_tile": round(cpu_ms["ray_1_actor"] - cpu_ms["local"], 2),
            "ray_overhead_pct": round((cpu_ms["ray_1_actor"] / cpu_ms["local"] - 1) * 100, 1),
            "speedup_2_actors": round(per_tile["ray_1_actor"] / per_tile["ray_2_actors"], 2),
            "two_process_ceiling": round(ceiling, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--tiles", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--task", default="cls")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model_dir, args.tiles, args.batch_size, args.task, args.rounds)))


if __name__ == "__main__":
    main()
