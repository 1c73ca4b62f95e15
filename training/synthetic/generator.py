"""The public stream: :class:`SyntheticGenerator` draws a task and a sensor from the mixtures, a scene (or change
pair) of a class that suits both, and hands it to the task's emitter; :func:`generate` collects ``n`` samples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from rsvlm_edge.tasks import TAGS, normalize_tag
from rsvlm_edge.training.sample import Sample
from rsvlm_edge.training.synthetic.change import make_change_pair
from rsvlm_edge.training.synthetic.emitters import (
    _OBJECT_SCENES,
    _OBJECT_TASKS,
    SCENE_EMITTERS,
    emit_ccd,
    emit_change_seg,
)
from rsvlm_edge.training.synthetic.scene import make_scene
from rsvlm_edge.training.synthetic.vocab import CHANGE_SEG_SHARE, SENSOR_MIXTURE, SENSOR_SCENES, SENSORS, TASK_MIXTURE


def _mixture(weights: dict[str, float], keep: Sequence[str]) -> tuple[list[str], np.ndarray]:
    names = [k for k in weights if k in keep]
    if not names:
        raise ValueError(f"nothing to draw from {list(keep)}")
    p = np.array([weights[k] for k in names], float)
    return names, p / p.sum()


class SyntheticGenerator:
    """A reproducible stream of synthetic samples: same (size, seed) -> identical arrays and texts.

    ``tasks`` restricts the task mixture (tags like ``"[CAP]"`` or names like ``"cap"``), ``sensors`` the sensors;
    ``task_weights`` replaces :data:`TASK_MIXTURE`'s shares (tags missing from it keep theirs).
    """

    def __init__(self, size: int = 128, seed: int = 0, tasks: Sequence[str] | None = None,
                 sensors: Sequence[str] | None = None, task_weights: dict[str, float] | None = None):
        if size < 32:
            raise ValueError(f"synthetic scenes need size >= 32, got {size}")
        self.size = int(size)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        weights = dict(TASK_MIXTURE)
        for tag, weight in (task_weights or {}).items():
            if normalize_tag(tag) not in weights or not weight >= 0:
                raise ValueError(f"task weight {tag!r}: {weight!r} (tags: {', '.join(TASK_MIXTURE)}; weights >= 0)")
            weights[normalize_tag(tag)] = float(weight)
        self._tasks = _mixture(weights, [normalize_tag(t) for t in tasks] if tasks else TAGS)
        for s in sensors or ():
            self._check_sensor(s)
        self._sensors = _mixture(SENSOR_MIXTURE, sensors or SENSORS)

    @staticmethod
    def _check_sensor(sensor: str) -> None:
        if sensor not in SENSORS:
            raise ValueError(f"unknown sensor {sensor!r}; choose from {', '.join(SENSORS)}")

    def sample(self, task: str | None = None, sensor: str | None = None) -> Sample:
        rng = self.rng
        tag = normalize_tag(task) if task else self._tasks[0][int(rng.choice(len(self._tasks[0]), p=self._tasks[1]))]
        if sensor is None:
            sensor = self._sensors[0][int(rng.choice(len(self._sensors[0]), p=self._sensors[1]))]
        self._check_sensor(sensor)
        if tag == "[CCD]":
            return emit_ccd(make_change_pair(rng, self.size), sensor, rng)
        if tag == "[SEG]" and rng.random() < CHANGE_SEG_SHARE:
            return emit_change_seg(make_change_pair(rng, self.size), sensor, rng)
        emitter = SCENE_EMITTERS[tag]
        classes = _OBJECT_SCENES[sensor] if tag in _OBJECT_TASKS else SENSOR_SCENES[sensor]
        for _ in range(50):
            scene = make_scene(rng, self.size, classes[int(rng.integers(len(classes)))])
            out = emitter(scene, sensor, rng)
            if out is not None:
                return out
        raise RuntimeError(f"could not emit {tag} for {sensor} in 50 scenes")  # pragma: no cover - never seen

    def samples(self, n: int, task: str | None = None, sensor: str | None = None) -> Iterator[Sample]:
        for _ in range(n):
            yield self.sample(task, sensor)


def generate(n: int, seed: int = 0, size: int = 128, tasks: Sequence[str] | None = None,
             sensors: Sequence[str] | None = None) -> list[Sample]:
    """``n`` samples from a fresh :class:`SyntheticGenerator` (the task/sensor mixtures, optionally restricted)."""
    return list(SyntheticGenerator(size, seed, tasks=tasks, sensors=sensors).samples(n))
