"""What the ``--ray``, ``--actors`` and ``--threads-per-actor`` options ask for. No Ray import: the CLI builds this
before anything loads, and a local run never needs more."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RaySettings:
    """Where the cluster is and how to split it into pipelines.

    ``address``: ``auto`` (the cluster named by ``RAY_ADDRESS`` or started on this machine by ``ray start``, else a
    new one-machine cluster for this run) or an address (``HOST:6379``, ``ray://HOST:10001``).
    ``actors``: pipelines to load; None = as many as the cluster's CPUs (GPUs for ``trt``) allow.
    ``threads_per_actor``: CPU threads each pipeline's backend runs on (and the CPUs each actor reserves).
    """

    address: str = "auto"
    actors: int | None = None
    threads_per_actor: int = 1

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("--ray: give `auto` or a cluster address (HOST:6379, ray://HOST:10001)")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors {self.actors}: give at least 1")
        if self.threads_per_actor < 1:
            raise ValueError(f"--threads-per-actor {self.threads_per_actor}: give at least 1")
