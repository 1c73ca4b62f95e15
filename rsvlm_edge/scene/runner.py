"""The tile loop: windows of a scene through a :class:`~rsvlm_edge.pipeline.Pipeline`, records out, resumable.

The unit of work is :func:`run_tiles` ``(pipe, job) -> list[TileRecord]``: a pure function of a pipeline and a
picklable :class:`TileJob` (the scene's spec, a batch of windows and the request options). It opens the scene itself
(kept open per process for the next batch), so a worker process or a Ray actor runs the very same function; an
executor only decides where. :class:`LocalExecutor` maps it over the batches in this process; a Ray executor
(:mod:`rsvlm_edge.distributed`) plugs into the same ``map(fn, items) -> (index, result)`` seam.

:func:`run_scene` is the driver: open and describe the scene, plan the tiles, skip what the journal already holds,
run the rest in batches behind a progress bar (tiles/s, ETA), journal every batch, then hand all records to
:func:`rsvlm_edge.scene.outputs.write_scene_outputs` (merging and the GeoJSON / GeoTIFF files).

The journal (``<out>/<stem>.journal.jsonl``) has one JSON line per tile record, each keyed by the run's key: a
hash of the scene's files (path, size, mtime), the bands, the tiling, the instruction and decoding options, and the
engine (its manifest hash). A rerun with the same key skips the tiles it holds; a tile that failed is run again and
its new line replaces the old one; lines of another key (the scene or options changed) are ignored, and a line cut
by a crash is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from rsvlm_edge.scene.source import SceneSource, SceneSpec, open_scene
from rsvlm_edge.scene.tiling import TilePlan, TileWindow

#: Errors that belong to one tile (its pixels, its generation): the other tiles go on, the record says why.
TILE_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)


@dataclass(frozen=True)
class TileJob:
    """One batch of work, picklable: which scene, which windows, read at what size, asked what."""

    spec: SceneSpec
    windows: tuple[TileWindow, ...]
    read_size: tuple[int, int]  # (width, height) of the image the model gets (a plan's windows share one size)
    instruction: str
    sampling: Any = None  # SamplingConfig | None
    default_tokens: bool = True  # the task's own answer length (no --max-new-tokens)


@dataclass
class TileRecord:
    """What one tile gave, JSON-ready (:meth:`to_dict` / :meth:`from_dict`).

    ``status``: ``ok`` (``result`` is :meth:`rsvlm_edge.results.Result.to_dict`, scores included; ``grid`` the
    24x24 label grid of a [SEG] answer), ``nodata`` (every pixel nodata: skipped, no answer) or ``error``
    (``error`` says why). ``image_size`` is the (width, height) the model saw; an answer's pixels map to the scene
    as ``col_off + x / image_size[0] * window.width`` (likewise for y)."""

    tile_id: str
    window: TileWindow
    image_size: tuple[int, int]
    task: str | None
    status: str
    result: dict[str, Any] | None = None
    grid: list[list[str]] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tile_id": self.tile_id, "window": self.window.to_dict(), "image_size": list(self.image_size),
                "task": self.task, "status": self.status, "result": self.result, "grid": self.grid,
                "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TileRecord":
        return cls(str(d["tile_id"]), TileWindow.from_dict(d["window"]), tuple(d["image_size"]),  # type: ignore[arg-type]
                   d.get("task"), str(d["status"]), d.get("result"), d.get("grid"), d.get("error"))


# --------------------------------------------------------------------------------------------------- the work


_OPEN: dict[SceneSpec, SceneSource] = {}  # per process: the scene the last batch read (its GDAL block cache)


def scene_for(spec: SceneSpec) -> SceneSource:
    """The open scene of ``spec`` in this process (opened on first use, the previous one closed)."""
    if spec not in _OPEN:
        keep_open(spec, open_scene(spec))
    return _OPEN[spec]


def keep_open(spec: SceneSpec, source: SceneSource) -> None:
    """Make ``source`` the scene this process reads for ``spec`` (the one it held before is closed)."""
    for held in [s for k, s in _OPEN.items() if k != spec and s is not source]:
        held.close()
    _OPEN.clear()
    _OPEN[spec] = source


def close_scenes() -> None:
    """Close the scene this process holds open for :func:`run_tiles`."""
    while _OPEN:
        _OPEN.popitem()[1].close()


def run_tiles(pipe: Any, job: TileJob) -> list[TileRecord]:
    """Answer one batch of windows with ``pipe`` (a :class:`~rsvlm_edge.pipeline.Pipeline`). Pure: what it returns
    depends on the pipeline and the job only. Tiles whose pixels are all nodata are skipped; a tile that cannot be
    read or answered gets an error record and the others are still answered."""
    from rsvlm_edge.inputs import Loaded, prepare_tile
    from rsvlm_edge.tasks import split_tag

    source = scene_for(job.spec)
    config = pipe.config
    task = split_tag(job.instruction)[0]
    size = job.read_size
    records: dict[int, TileRecord] = {}
    prepared: dict[int, Any] = {}
    for i, window in enumerate(job.windows):
        try:
            arrays = source.read(window, size)
            if any(source.invalid(a).all() for a in arrays):
                records[i] = TileRecord(window.id, window, size, task, "nodata")
                continue
            names = [f"{job.spec.name}:{window.id}" + (f":{k}" if len(arrays) > 1 else "") for k in range(len(arrays))]
            loaded = [Loaded(np.moveaxis(a, 0, -1), name, source.nodata) for a, name in zip(arrays, names)]
            prepared[i] = prepare_tile(loaded, source.sensor, config.image_size, config.sensors,
                                       config.image_preprocess)
        except TILE_ERRORS as exc:
            records[i] = TileRecord(window.id, window, size, task, "error", error=_message(exc))
    for i, outcome in _answer(pipe, prepared, job).items():
        window = job.windows[i]
        if isinstance(outcome, str):
            records[i] = TileRecord(window.id, window, size, task, "error", error=outcome)
        else:
            grid = [list(row) for row in outcome.parsed.mask] if outcome.parsed.mask is not None else None
            records[i] = TileRecord(window.id, window, size, outcome.task, "ok", outcome.to_dict(), grid)
    return [records[i] for i in range(len(job.windows))]


def _answer(pipe: Any, tiles: dict[int, Any], job: TileJob) -> dict[int, Any]:
    """Run the tiles as one batch; if the batch fails, each alone, so only the tile at fault gets an error."""
    if not tiles:
        return {}
    try:
        results = pipe.run(list(tiles.values()), job.instruction, job.sampling, default_tokens=job.default_tokens)
        return dict(zip(tiles, results))
    except TILE_ERRORS as exc:
        if len(tiles) == 1:
            return {next(iter(tiles)): _message(exc)}
    out: dict[int, Any] = {}
    for i, tile in tiles.items():
        out.update(_answer(pipe, {i: tile}, job))
    return out


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------- executors


class Executor(Protocol):
    """Where the work runs: ``map(fn, items)`` yields ``(index, fn(pipe, item))`` once per item, in any order. An
    executor whose work runs in other processes says so with ``in_process = False`` (see :func:`run_scene`)."""

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


class LocalExecutor:
    """The work in this process, on one pipeline, in order."""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(self.pipe, item)


# --------------------------------------------------------------------------------------------------- the journal


def run_key(spec: SceneSpec, plan: TilePlan, job_fields: dict[str, Any], engine: str) -> str:
    """What must match for a journalled tile to be reused: the files (path, size, mtime), bands and sensor, the
    tiling, the request and the engine."""
    files = []
    for image in spec.images:
        for path in image.files:
            st = os.stat(path)
            files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"files": files, "spec": spec.to_dict(), "sensor": spec.sensor, "tile": plan.tile,
                       "step": plan.step, "read": plan.read_size, "job": job_fields, "engine": engine},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def engine_key(model_dir: str | Path) -> str:
    """The engine's identity in a resume key (:func:`rsvlm_edge.manifest.engine_digest`, checkpoint dirs by their
    files' sizes and times)."""
    from rsvlm_edge.manifest import engine_digest

    return engine_digest(model_dir, exact=False)[:24]


class Journal:
    """Append-only JSON lines of tile records under one run key; see the module docstring."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def load(self) -> dict[str, TileRecord]:
        """The records of this key by tile id, the last line of a tile winning; other keys and torn lines skipped."""
        done: dict[str, TileRecord] = {}
        if not self.path.is_file():
            return done
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                    if entry.get("key") == self.key:
                        record = TileRecord.from_dict(entry["record"])
                        done[record.tile_id] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash, or not ours
        return done

    def append(self, records: Iterable[TileRecord]) -> None:
        lines = "".join(json.dumps({"key": self.key, "record": r.to_dict()}, ensure_ascii=False) + "\n"
                        for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class SceneOptions:
    """How to run a scene (the ``rsvlm-edge scene`` options). ``tile`` / ``overlap``: ``"128"`` (pixels of the
    working grid), ``"1280m"`` (metres), an overlap also ``"0.25"`` (of a tile); ``gsd``: metres per pixel the model
    sees (default: native). ``default_tokens``: each answer gets its task's length (None: when ``sampling`` is None).
    ``max_tiles``: stop after that many tiles of the plan (a preview, or a benchmark). ``progress``: a tqdm bar on
    stderr (None: on a terminal). ``min_score``, ``merge``, ``vectorise``: see
    :func:`rsvlm_edge.scene.outputs.write_scene_outputs`."""

    task: str | None = None
    prompt: str | None = None
    tile: str | None = None
    overlap: str | None = None
    gsd: float | None = None
    batch_size: int = 8
    sampling: Any = None
    default_tokens: bool | None = None
    resume: bool = True
    stem: str = "scene"
    min_score: float | None = None
    merge: str = "nms"
    vectorise: bool = False
    max_tiles: int | None = None
    progress: bool | None = None

    def check(self) -> "SceneOptions":
        """Refuse bad values before the scene or the model is opened."""
        from rsvlm_edge.scene.tiling import TilingError, parse_length

        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles!r}")
        if self.tile is not None:
            parse_length(self.tile, "--tile")
        if self.overlap is not None:
            parse_length(self.overlap, "--overlap", fraction=True)
        if self.gsd is not None and not (isinstance(self.gsd, (int, float)) and 0 < self.gsd < float("inf")):
            raise TilingError(f"--gsd {self.gsd!r}: give a positive size in metres per pixel")
        return self


@dataclass
class SceneRun:
    """What :func:`run_scene` did: the summary the outputs wrote, the records, and the counts of this run."""

    summary: dict[str, Any]
    records: list[TileRecord]
    planned: int
    resumed: int
    ran: int
    seconds: float
    scene: dict[str, Any] = field(default_factory=dict)

    @property
    def tiles_per_second(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else 0.0


def run_scene(pipe: Any, scene: SceneSpec | str | Path | Sequence[str | Path], out_dir: str | Path,
              options: SceneOptions | None = None, *, bands: str | None = None, sensor: str | None = None,
              pair: bool | None = None, executor: Executor | None = None, log: Callable[[str], None] | None = None,
              **option_fields: Any) -> SceneRun:
    """Run a task over every tile of a scene and write the outputs into ``out_dir``.

    ``pipe``: an open :class:`~rsvlm_edge.pipeline.Pipeline`. ``scene``: a raster path, a list of band files (a
    before/after pair for a change task), a folder of band files, or a resolved :class:`SceneSpec`; ``bands`` and
    ``sensor`` as in :func:`~rsvlm_edge.scene.source.resolve_scene`; ``pair``: two scenes are before and after
    (default: for a change task such as ``ccd``). ``options`` (or its fields as keywords:
    ``task="det", tile="256", overlap="0.25"``): :class:`SceneOptions`. ``executor``: where the batches run (default:
    here). ``log``: where the scene and tiling lines go (default: stderr)."""
    from rsvlm_edge.scene.source import resolve_scene
    from rsvlm_edge.tasks import PAIR_TASKS, make_instruction, split_tag

    opts = dataclasses.replace(options or SceneOptions(), **option_fields).check()
    instruction = make_instruction(opts.task, opts.prompt)
    if not isinstance(scene, SceneSpec):
        inputs = [scene] if isinstance(scene, (str, os.PathLike)) else list(scene)
        if pair is None:
            pair = split_tag(instruction)[0] in PAIR_TASKS
        scene = resolve_scene(inputs, bands=bands, pair=pair, sensor=sensor)
    say = log or (lambda line: print(line, file=sys.stderr))
    # an executor whose work runs in other processes (``in_process = False``: a Ray pool) opens the scene there;
    # this process then shares nothing, and several scenes may run at once from threads
    share = getattr(executor, "in_process", True)
    source = open_scene(scene)
    try:
        # the workers get the sensor decided here: one guess for the whole scene, not one per tile
        spec = dataclasses.replace(scene, sensor=source.sensor, sensor_reason=source.sensor_reason)
        if share:
            keep_open(spec, source)
        say(source.describe())
        return _run(pipe, spec, source, Path(out_dir), instruction, opts, executor or LocalExecutor(pipe), say)
    finally:
        if share:
            close_scenes()
        source.close()


def _run(pipe: Any, spec: SceneSpec, source: SceneSource, out: Path, instruction: str, opts: SceneOptions,
         executor: Executor, say: Callable[[str], None]) -> SceneRun:
    from tqdm import tqdm

    from rsvlm_edge.scene.georef import GeoReference
    from rsvlm_edge.scene.outputs import write_scene_outputs
    from rsvlm_edge.scene.tiling import parse_length, plan_tiles
    from rsvlm_edge.tasks import split_tag

    config = pipe.config
    if source.sensor not in config.sensors:
        raise ValueError(f"sensor {source.sensor!r} is not one this model has a stem for ({', '.join(config.sensors)})")
    plan = plan_tiles(source.width, source.height, model_size=config.image_size,
                      tile=parse_length(opts.tile, "--tile") if opts.tile is not None else None,
                      overlap=parse_length(opts.overlap, "--overlap", fraction=True) if opts.overlap else None,
                      gsd=opts.gsd, res=source.grid.res, metres=source.grid.metres)
    say(f"tiles: {plan.describe(source.grid.res, source.grid.metres)}")
    windows = list(plan.windows[:opts.max_tiles] if opts.max_tiles else plan.windows)

    # ---- the journal: what an earlier run of the same key already answered
    default_tokens = opts.sampling is None if opts.default_tokens is None else opts.default_tokens
    job_fields = {"instruction": instruction, "default_tokens": default_tokens,
                  "sampling": dataclasses.asdict(opts.sampling) if opts.sampling is not None else None}
    engine = engine_key(pipe.model_dir)
    journal = Journal(out / f"{opts.stem}.journal.jsonl", run_key(spec, plan, job_fields, engine))
    if not opts.resume and journal.path.exists():
        journal.path.unlink()
    done = journal.load()
    todo = [w for w in windows if w.id not in done or done[w.id].status == "error"]
    resumed = len(windows) - len(todo)
    if resumed:
        say(f"resuming: {resumed:,} tile(s) already answered in {journal.path}")

    # ---- the tiles, in batches, journalled as they come back
    jobs = [TileJob(spec, tuple(todo[i:i + opts.batch_size]), plan.read_size, instruction, opts.sampling,
                    default_tokens) for i in range(0, len(todo), opts.batch_size)]
    t0 = time.perf_counter()
    with tqdm(total=len(windows), initial=resumed, desc="scene", unit="tile", file=sys.stderr, dynamic_ncols=True,
              disable=None if opts.progress is None else not opts.progress) as bar:
        for _, records in executor.map(run_tiles, jobs):
            journal.append(records)
            done.update((r.tile_id, r) for r in records)
            bar.update(len(records))
    seconds = time.perf_counter() - t0

    # ---- merge and write (atomically, only once every tile is in)
    records = [done[w.id] for w in windows]
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "nodata", "error")}
    summary = write_scene_outputs(
        [r for r in records if r.status != "nodata"], GeoReference.of(source), out, stem=opts.stem,
        scene_name=spec.name, model=pipe.model_dir.name, engine=engine, min_score=opts.min_score,
        merge=opts.merge, vectorise=opts.vectorise, tiles=len(todo), seconds=seconds,
        extra={"task": split_tag(instruction)[0], "instruction": instruction, "sensor": source.sensor,
               "sensor_reason": source.sensor_reason, "tiles_planned": len(plan.windows),
               "tiles_total": len(records), "tiles_nodata": counts["nodata"], "tiles_resumed": resumed,
               "tiles_run": len(todo), "tile_px": list(plan.tile), "step_px": list(plan.step),
               "read_px": list(plan.read_size), "journal": str(journal.path), "run_key": journal.key})
    return SceneRun(summary, records, len(plan.windows), resumed, len(todo), seconds, source.info())


__all__ = ["TileJob", "TileRecord", "SceneOptions", "SceneRun", "run_tiles", "run_scene", "Executor",
           "LocalExecutor", "Journal", "engine_key", "run_key", "scene_for", "keep_open", "close_scenes",
           "TILE_ERRORS"]
