"""Optimization profiles for every component, computed from the ONNX manifest's IO shapes (axis names) and a preset.

The decoder gets two profiles, because prefill and decode are different programs to TensorRT:

* ``prefill``: ``seq`` 1..max prompt, ``past_seq`` 0 (the cache is empty), ``total_seq`` = ``seq``;
* ``decode``: ``seq`` 1, ``past_seq`` 1..max context - 1, ``total_seq`` = ``past_seq`` + 1.

Every other component has one profile. Axis names come from the exporter (``batch``, ``seq``, ``total_seq``,
``past_seq``); an axis this module does not know is an error, not a silent guess. The ranges are recorded in
the TensorRT manifest so the backend can pick a profile (or split a call) without asking the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.engines.trt_presets import BuildPreset
from rsvlm_edge.manifest import Component

Shape = tuple[int, ...]
AxisRange = tuple[int, int, int]  # min, opt, max


class ProfileError(ValueError):
    """A component has an axis no profile rule covers, or the preset's limits are impossible for the model."""


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


@dataclass(frozen=True)
class Limits:
    """The sequence limits a preset implies for a model."""

    max_context: int
    max_prompt: int
    opt_prompt: int
    opt_past: int

    @classmethod
    def of(cls, cfg: ModelConfig, preset: BuildPreset) -> "Limits":
        context = min(preset.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        prompt = min(context, preset.max_images * cfg.num_visual_tokens + preset.max_text_tokens)
        if context < 2:
            raise ProfileError(f"a context of {context} tokens leaves no room to decode")
        return cls(max_context=context, max_prompt=prompt, opt_prompt=min(prompt, cfg.num_visual_tokens + 32),
                   opt_past=min(context - 1, cfg.num_visual_tokens + 64))


def _resolve(component: Component, axes: dict[str, AxisRange]) -> dict[str, tuple[Shape, Shape, Shape]]:
    shapes = {}
    for spec in component.inputs:
        mins, opts, maxs = [], [], []
        for dim in spec.shape:
            if isinstance(dim, int):
                lo = opt = hi = dim
            elif dim in axes:
                lo, opt, hi = axes[dim]
            else:
                raise ProfileError(f"{component.name}: input {spec.name} has axis {dim!r} that no TensorRT profile rule "
                                   f"covers (known: {', '.join(sorted(axes))})")
            mins.append(lo)
            opts.append(opt)
            maxs.append(hi)
        shapes[spec.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return shapes


def _batch(preset: BuildPreset, images: bool, static: bool) -> AxisRange:
    if static:
        return (preset.dla_batch,) * 3
    scale = preset.max_images if images else 1
    return 1, min(preset.opt_batch * scale, preset.max_batch * scale), preset.max_batch * scale


def component_profiles(component: Component, cfg: ModelConfig, preset: BuildPreset, static_batch: bool = False) -> list[Profile]:
    """The optimization profiles ``component`` is built with (decoder: prefill + decode; others: one)."""
    kind = component.extra.get("kind") or component.name
    lim = Limits.of(cfg, preset)
    images = str(kind).startswith("vision")
    batch = _batch(preset, images, static_batch)
    if str(kind).startswith("decoder"):
        prompt = (1, lim.opt_prompt, lim.max_prompt)
        prefill = {"batch": batch, "seq": prompt, "past_seq": (0, 0, 0), "total_seq": prompt}
        decode = {"batch": batch, "seq": (1, 1, 1), "past_seq": (1, lim.opt_past, lim.max_context - 1),
                  "total_seq": (2, lim.opt_past + 1, lim.max_context)}
        return [Profile("prefill", _resolve(component, prefill)), Profile("decode", _resolve(component, decode))]
    # embedding: prompts (prefill) and single tokens (decode); router: the instruction only
    seq = (1, lim.opt_prompt, lim.max_prompt)
    return [Profile("default", _resolve(component, {"batch": batch, "seq": seq}))]
