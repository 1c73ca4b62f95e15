"""The actor pool: every item of a job runs once on some actor, whatever happens to the actors.

The driver owns the queue. Each actor holds at most ``DEPTH`` items in flight (the next one is already waiting
when the current one ends, so an actor never idles on a round trip). An item's result is taken the first time it
comes back and the item leaves the queue only then; when an actor dies (``ray.kill``, a node lost, a crash), the
items it held go back to the front of the queue and a fresh actor takes its slot. So no item is lost, and none is
answered twice: an item is only re-sent after its earlier attempt failed, and the caller sees one result per item.
An item that kills ``MAX_ATTEMPTS`` actors in a row stops the job with that item named.

Ray Core actors rather than Ray Data's actor pool: the retry rule above is the whole point, and here it is ten
lines the driver can see.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rsvlm_edge.distributed.actor import PipelineWorker
from rsvlm_edge.distributed.engine import EngineDir
from rsvlm_edge.distributed.settings import RaySettings

DEPTH = 2  # items in flight per actor: one running, one queued behind it
MAX_ATTEMPTS = 3  # actors an item may take down before the job stops on it
START_TIMEOUT_S = 600  # loading an engine (sha256 of every file included) takes seconds; a pool that waits for
# CPUs another job holds would wait forever


def connect(address: str) -> None:
    """Join the cluster ``--ray`` names (``auto``: the one ``RAY_ADDRESS`` names, else the one ``ray start`` runs
    on this machine, else a new one-machine cluster). Worker output is not forwarded: stdout belongs to the
    answers."""
    import ray

    if ray.is_initialized():
        return
    if address == "auto" and not os.environ.get("RAY_ADDRESS") and _started_cluster() is None:
        address = "local"  # Ray would wait minutes on the address a stopped `ray start` left behind
    ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)


def _started_cluster() -> str | None:
    """The address ``ray start`` recorded on this machine (``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``), if
    something still answers there."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        recorded = (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip()
        host, _, port = recorded.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=2):
            return recorded
    except (OSError, ValueError):
        return None


@dataclass
class PoolStats:
    """What the pool did: actors started (replacements included), items re-sent after an actor died."""

    started: int = 0
    retried: int = 0
    sources: list[str] = field(default_factory=list)  # how each actor got its engine: shared path / object store


class RayExecutor:
    """``with RayExecutor(settings, model_dir, backend, options) as pool: for i, r in pool.map(fn, items): ...``

    Starts ``settings.actors`` actors, each opening one pipeline with ``settings.threads_per_actor`` threads (a
    GPU each for ``trt``), and maps ``fn(pipe, item)`` over the items, yielding ``(index, result)`` as results come
    back (completion order; each index exactly once). ``ship_engine``: send the engine through the object store
    even to nodes that see the driver's path. Several threads may map at once (several scenes on one pool): each
    keeps its own queue, and an actor that dies is replaced once."""

    in_process = False  # the work runs in the actors' processes (rsvlm_edge.scene.runner.run_scene reads this)

    def __init__(self, settings: RaySettings, model_dir: str, backend: str = "ort",
                 options: dict[str, Any] | None = None, ship_engine: bool = False):
        self.settings, self.backend = settings, backend
        self.options = dict(options or {})
        if backend != "trt":
            self.options["threads"] = settings.threads_per_actor
        self.engine = EngineDir.of(model_dir, shared=not ship_engine)
        self.actors: list[Any] = []
        self.stats = PoolStats()
        self._bundle: list = []  # [ObjectRef] once the engine has been put in the object store
        self._actor_cls: Any = None
        self._lock = threading.Lock()  # actor replacement, when maps run from several threads

    # ------------------------------------------------------------------ start and stop
    def __enter__(self) -> "RayExecutor":
        import ray

        connect(self.settings.address)
        gpu = self.backend == "trt"
        cpus = 1 if gpu else self.settings.threads_per_actor
        self._actor_cls = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=0)(PipelineWorker)
        count = self.settings.actors or self._fitting_actors(cpus, gpu)
        self._check_fits(count, cpus, gpu)
        try:
            self.actors = [self._new_actor() for _ in range(count)]
            self._check_ready(list(range(count)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._bundle = [], []  # the shipped engine leaves the object store with its last reference

    def _fitting_actors(self, cpus: int, gpu: bool) -> int:
        import ray

        total = ray.cluster_resources()
        if gpu:
            count = int(total.get("GPU", 0))
            if count < 1:
                raise ValueError("--backend trt on Ray needs GPU nodes; the cluster has none")
            return count
        return max(1, int(total.get("CPU", 1)) // cpus)

    def _check_fits(self, count: int, cpus: int, gpu: bool) -> None:
        """Refuse a pool the cluster can never hold (its actors would wait for resources forever)."""
        import ray

        total = ray.cluster_resources()
        have, need, what = (total.get("GPU", 0), count, "GPU") if gpu else (total.get("CPU", 0), count * cpus, "CPU")
        if need > have:
            per = "" if gpu else f" x --threads-per-actor {cpus}"
            raise ValueError(f"--actors {count}{per} needs {need} {what}s; the Ray cluster has {have:g}")

    def _new_actor(self) -> Any:
        self.stats.started += 1
        return self._actor_cls.remote(self.engine, self.backend, self.options, self._bundle)

    def _check_ready(self, slots: list[int]) -> None:
        """Wait for the actors in ``slots`` to load; ship the engine to those whose node lacks it (once); stop with
        the first load error, naming its node."""
        import ray

        infos = self._get([self.actors[s].ready.remote() for s in slots])
        wanting = [s for s, info in zip(slots, infos) if info["needs_engine"]]
        if wanting:
            if not self._bundle:
                self._bundle = [ray.put(self.engine.bundle())]
            self._get([self.actors[s].install.remote(self._bundle) for s in wanting])
            infos = self._get([self.actors[s].ready.remote() for s in slots])
        for info in infos:
            if info["error"]:
                raise ValueError(f"{self.engine.path} on Ray node {info['node']}: {info['error']}")
            self.stats.sources.append(info["source"])

    @staticmethod
    def _get(refs: list) -> list:
        """The answers of actors that are starting, or one line saying why they never will."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(refs, timeout=START_TIMEOUT_S)
        except GetTimeoutError:
            raise ValueError(f"the Ray actors did not start within {START_TIMEOUT_S} s: the cluster's CPUs/GPUs are "
                             f"held by other work (see `ray status`)") from None
        except RayActorError as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"a Ray actor died while it loaded the engine: {cause}") from None

    # ------------------------------------------------------------------ the job
    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import ray
        from ray.exceptions import RayActorError

        queue = deque(range(len(items)))
        attempts = [0] * len(items)
        inflight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (slot, item index, actor it went to)
        load = [0] * len(self.actors)
        while queue or inflight:
            for slot in range(len(self.actors)):
                while queue and load[slot] < DEPTH:
                    index = queue.popleft()
                    actor = self.actors[slot]
                    inflight[actor.run.remote(fn, items[index])] = (slot, index, actor)
                    load[slot] += 1
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, index, actor = inflight.pop(ref)
            load[slot] -= 1
            try:
                result = ray.get(ref)
            except RayActorError:
                attempts[index] += 1
                if attempts[index] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"item {index} of the job took down {MAX_ATTEMPTS} Ray actors; "
                                       f"stopping") from None
                queue.appendleft(index)
                with self._lock:
                    if not self.actors:
                        raise RuntimeError("the Ray actor pool was closed while a job was running") from None
                    self.stats.retried += 1
                    if self.actors[slot] is actor:  # the first of its lost items (in any thread) replaces it
                        self.actors[slot] = self._new_actor()
                        self._check_ready([slot])
                continue
            yield index, result
