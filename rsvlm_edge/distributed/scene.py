"""``rsvlm-edge scene ... --ray``: the scene runner's tile batches on a Ray actor pool.

The runner (:func:`rsvlm_edge.scene.runner.run_scene`) stays the driver: it plans the tiles, skips what its journal
holds, journals every batch as it comes back and writes the outputs. Only its executor changes: the pool maps
:func:`~rsvlm_edge.scene.runner.run_tiles` over the batches on the actors, each batch answered once even when an
actor dies, so the journal, the GeoJSON and the GeoTIFF are the local run's. The scene files must be readable at
the same paths on every node (one machine, or a shared filesystem); the engine dir need not be.

Several scenes share one pool (the engines load once): :func:`run_scenes_ray` runs them at once, each scene's
driver in a thread of its own (its journal, its progress bar, its outputs), their batches on the same actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rsvlm_edge.distributed.executor import RayExecutor
from rsvlm_edge.distributed.settings import RaySettings


@dataclass(frozen=True)
class EngineView:
    """What the scene driver reads from a pipeline (its config and directory), without loading the engines on
    the driver: the actors hold the only pipelines."""

    config: Any
    model_dir: Path

    @classmethod
    def of(cls, model_dir: str | Path) -> "EngineView":
        from rsvlm_edge.config import ModelConfig
        from rsvlm_edge.manifest import MANIFEST_FILE, Manifest

        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if (path / MANIFEST_FILE).is_file():
            return cls(Manifest.load(path, verify=False).config(), path)
        return cls(ModelConfig.load(path / "config.json"), path)


def run_scenes_ray(model_dir: str | Path, scenes: Sequence[tuple[Any, str | Path]], options: Any, *,
                   cluster: RaySettings, backend: str = "ort", engine_options: dict[str, Any] | None = None,
                   bands: str | None = None, sensor: str | None = None, log: Callable[[str], None] | None = None,
                   ship_engine: bool = False) -> list[Any]:
    """Run ``options`` (a :class:`~rsvlm_edge.scene.runner.SceneOptions`) over each ``(scene, out_dir)`` at once
    on one actor pool; the :class:`~rsvlm_edge.scene.runner.SceneRun` of each, in order. Output folders must
    differ (each holds its scene's journal)."""
    from concurrent.futures import ThreadPoolExecutor

    from rsvlm_edge.scene.runner import run_scene

    folders = [Path(out).resolve() for _, out in scenes]
    if len(set(folders)) < len(folders):
        raise ValueError("each scene needs its own output folder (the resume journal lives there)")
    view = EngineView.of(model_dir)
    with RayExecutor(cluster, str(model_dir), backend, engine_options, ship_engine=ship_engine) as pool:
        if log is not None:
            log(f"ray: {len(pool.actors)} actors x {cluster.threads_per_actor} threads, engine "
                f"{pool.engine.digest[:12]} ({', '.join(sorted(set(pool.stats.sources)))})")
        with ThreadPoolExecutor(max_workers=max(1, len(scenes)), thread_name_prefix="scene") as threads:
            futures = [threads.submit(run_scene, view, scene, out_dir, options, bands=bands, sensor=sensor,
                                      executor=pool, log=log) for scene, out_dir in scenes]
            runs = [f.result() for f in futures]
        if log is not None and pool.stats.retried:
            log(f"ray: {pool.stats.retried} batch(es) re-sent after an actor died")
    return runs


def run_scene_ray(model_dir: str | Path, scene: Any, out_dir: str | Path, options: Any, **kwargs: Any) -> Any:
    """One scene on a pool: :func:`run_scenes_ray` with one ``(scene, out_dir)``."""
    return run_scenes_ray(model_dir, [(scene, out_dir)], options, **kwargs)[0]
