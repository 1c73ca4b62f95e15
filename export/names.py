"""Component names and groups (torch-free, shared by the CLI, the exporter and tests)."""

from __future__ import annotations

from rsvlm_edge.manifest import DENSE_COMPONENT, HIDDEN_STATES, POINTER_COMPONENT  # noqa: F401 - HIDDEN_STATES re-exported

#: ``--components`` groups -> prefixes of the component names they select.
GROUPS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_stem_", "vision_encoder"),
    "stems": ("vision_stem_",),
    "encoder": ("vision_encoder",),
    "embedding": ("embedding",),
    "router": ("router",),
    "decoder": ("decoder_expert",),
    "pointer": (POINTER_COMPONENT,),  # only in models with a box pointer
    "dense": (DENSE_COMPONENT,),  # only in models with dense heads
}
COMPONENT_CHOICES = tuple(GROUPS)
TRUNK_FILE = "decoder_trunk.bin"


def stem_component(sensor: str) -> str:
    return f"vision_stem_{sensor}"


def decoder_component(expert: int) -> str:
    return f"decoder_expert{expert}"


def expert_file(expert: int) -> str:
    return f"decoder_expert{expert}.bin"
