"""TensorRT build presets: how much memory the builder may use and which shapes the plans must cover, per device.

Plans only run inside their optimization profiles, and a wider profile costs memory and tuning time, so a
board gets the shapes it will really see: Orin Nano (8 GB shared with the CPU, no DLA) one tile at a time,
AGX Orin a few, a datacenter GPU a batch. The DLA (Orin AGX / NX) takes the vision encoder, the largest
compute-bound component, in FP16/INT8 with GPU fallback for the layers it lacks; DLA loadables need static
shapes, so that component is built for a fixed batch (``dla_batch``) and the backend feeds it in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class BuildPreset:
    name: str
    workspace_bytes: int  # MemoryPoolType.WORKSPACE limit (scratch for tactics, not weights)
    max_batch: int  # requests decoded together
    opt_batch: int  # the batch TensorRT tunes kernels for
    max_context: int | None  # KV cache length; None = the model's max_position_embeddings
    max_text_tokens: int  # prompt tokens beyond the images (chat template + instruction)
    max_images: int = 2  # images per request (change tasks: two)
    dla_core: int | None = None  # DLA core for DLA_COMPONENTS (fp16/int8 only); None = GPU only
    dla_batch: int = 1  # static batch of DLA-built components
    optimization_level: int | None = None  # BuilderConfig.builder_optimization_level (TRT >= 8.6); None = default (3)


#: Components that may run on the DLA when a preset names a DLA core.
DLA_COMPONENTS = ("vision_encoder",)

PRESETS: dict[str, BuildPreset] = {
    "datacenter": BuildPreset("datacenter", workspace_bytes=8 * GiB, max_batch=16, opt_batch=4, max_context=None,
                              max_text_tokens=512, optimization_level=4),
    "orin-agx": BuildPreset("orin-agx", workspace_bytes=4 * GiB, max_batch=4, opt_batch=1, max_context=2048,
                            max_text_tokens=384, dla_core=0),
    "orin-nx": BuildPreset("orin-nx", workspace_bytes=2 * GiB, max_batch=2, opt_batch=1, max_context=2048,
                           max_text_tokens=256, dla_core=0),
    "orin-nano": BuildPreset("orin-nano", workspace_bytes=1 * GiB, max_batch=1, opt_batch=1, max_context=2048,
                             max_text_tokens=256),  # Orin Nano has no DLA
}


class PresetError(ValueError):
    """An unknown preset name or an impossible setting."""


def get_preset(name: str | BuildPreset) -> BuildPreset:
    if isinstance(name, BuildPreset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown TensorRT preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def uses_dla(preset: BuildPreset, component: str, precision: str) -> bool:
    """DLA runs FP16/INT8 only; FP32 builds keep everything on the GPU."""
    return preset.dla_core is not None and component in DLA_COMPONENTS and precision in ("fp16", "int8")
