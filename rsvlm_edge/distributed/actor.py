"""The worker side: one process, one loaded :class:`~rsvlm_edge.Pipeline`, running work functions on it.

A work function is any picklable top-level ``fn(pipe, item) -> result`` (``infer``'s batch of tiles, the scene
runner's list of windows): the actor adds nothing to what it computes, so a cluster run answers exactly what the
local loop answers. :class:`PipelineWorker` is a plain class; :mod:`.executor` makes it a Ray actor with the CPUs
(or GPU) it needs.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

from rsvlm_edge.distributed.engine import EngineDir


class PipelineWorker:
    """Opens ``engine`` (at the driver's path when this node has the same engine, else from ``bundle``: a one-item
    list holding the object-store reference, so Ray hands it over unresolved and a worker that does not need the
    files never fetches them). A load that fails is kept as a message for :meth:`ready`, not raised: the driver
    then names the node and the reason in one line."""

    def __init__(self, engine: EngineDir, backend: str, options: dict[str, Any], bundle: list | None = None):
        self.engine, self.backend, self.options = engine, backend, options
        self.pipe: Any = None
        self.error: str | None = None
        self.source = ""
        self.install(bundle)

    def install(self, bundle: list | None) -> None:
        """Open the engine, from the shared path or by unpacking the shipped files (fetched here, once)."""
        if self.pipe is not None:
            return
        path = self.engine.local_copy()
        if path is not None:
            self.source = "shared path"
        elif (path := self.engine.cached_copy()) is not None:
            self.source = "node cache"
        elif bundle:
            import ray

            path = self.engine.unpack(ray.get(bundle[0]))
            self.source = "object store"
        else:
            return  # ready() says the engine is wanted
        from rsvlm_edge.pipeline import Pipeline

        try:
            self.pipe = Pipeline(path, backend=self.backend, **self.options)
            self.error = None
        except Exception as exc:  # any load failure is reported by ready(), the driver stops with it
            self.error = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)

    def ready(self) -> dict[str, Any]:
        """Where this worker runs and whether its pipeline is loaded (``needs_engine``: no copy at the driver's
        path on this node, send the bundle; ``error``: the engine is there but would not load)."""
        return {"node": socket.gethostname(), "pid": os.getpid(), "source": self.source, "error": self.error,
                "needs_engine": self.pipe is None and self.error is None}

    def run(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        if self.pipe is None:
            raise RuntimeError(self.error or "the worker's engine is not loaded")
        return fn(self.pipe, item)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
