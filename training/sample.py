"""One training / evaluation example, shared by the synthetic generator, the real-data loaders and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsvlm_edge.tasks import expert_for_tag, split_tag


@dataclass
class Sample:
    """An instruction example.

    ``images`` hold sensor-native arrays, HxWxC (C = the sensor's band count): uint8/uint16 optical, IR and
    multispectral values, SAR backscatter in dB as float32. :func:`rsvlm_edge.preprocess.prepare_image` turns them
    into model input. ``prompt`` starts with the task tag (``"[VG] the ship on the left"``); ``answer`` is the exact
    target text. ``target`` keeps the structured truth for metrics (``boxes``, ``obbs``, ``labels``, ``mask``,
    ``class_name``, ``question_type``, ...).
    """

    images: list[np.ndarray]
    sensor: str
    prompt: str
    answer: str
    source: str = "synthetic"  # dataset name, e.g. "aid", "rsvqa_lr", "synthetic"
    target: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        tag, _ = split_tag(self.prompt)
        if tag is None:
            raise ValueError(f"sample prompt has no task tag: {self.prompt!r}")
        return tag

    @property
    def expert(self) -> int:
        return expert_for_tag(self.tag)

    @property
    def instruction(self) -> str:
        """The prompt without its tag: what the router sees for untagged requests."""
        return split_tag(self.prompt)[1]
