"""Model configuration: one dataclass shared by the torch reference, exporters and the torch-free runtime.

The config is plain data (JSON in ``config.json`` and inside ``manifest.json``), so the runtime can read shapes
without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Sensor name -> number of input bands its stem takes. ``ms`` is Sentinel-2 style (12 bands).
DEFAULT_SENSORS: dict[str, int] = {"rgb": 3, "sar": 2, "ir": 1, "ms": 12}

#: Granularity experts, in expert-index order (docs/design.md: image=0, region=1, pixel=2).
EXPERT_NAMES: tuple[str, ...] = ("image", "region", "pixel")

#: How an image becomes the encoder's input. "rsvlm": float normalise then bilinear resize (models trained here);
#: "siglip-square": uint8 RGB bicubic resize to image_size, /255, (x-0.5)/0.5 (SigLIP / RSUniVLM);
#: "siglip-pad": as siglip-square after padding to a square with grey (127, 127, 127).
IMAGE_PREPROCESS_MODES: tuple[str, ...] = ("rsvlm", "siglip-square", "siglip-pad")

#: Prompt templates: "rsvlm" (<|user|> ... <|end|>, models trained here); "qwen_1_5" (ChatML with a system turn, as
#: RSUniVLM's app.py builds prompts).
PROMPT_TEMPLATES: tuple[str, ...] = ("rsvlm", "qwen_1_5")

#: The only sensor a model without stems takes: its encoder reads preprocessed RGB directly.
STEMLESS_SENSORS: dict[str, int] = {"rgb": 3}


class ConfigError(ValueError):
    """A config file is malformed or inconsistent."""


@dataclass
class ModelConfig:
    """Shapes of the MoE VLM. Vision fields describe the ViT (+ optional CNN branch); the rest the decoder."""

    name: str = "tiny"
    # --- vision ---
    image_size: int = 128
    patch_size: int = 16
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 768
    vision_feature_layers: list[int] = field(default_factory=lambda: [2, 4])  # 1-based ViT layers whose outputs are fused
    vision_norm_eps: float = 1e-6
    cnn_branch: bool = True
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # one stride-2 stage each
    image_newline: bool = True  # RSUniVLM appends one learned token after the patch grid
    # A learned 2-D position embedding added to the projected patch tokens (2-D sin/cos at init). The decoder's RoPE
    # positions reach attention scores but not the values it reads, so without this a patch token does not say where
    # it is and box answers fall back to language priors. Off by default because RSUniVLM has none (a converted
    # checkpoint cannot carry one); the demo model turns it on (scripts/train_demo.sh --token-pos-embed).
    token_pos_embed: bool = False
    # Grounding by pointing: a pointer from the hidden state that starts a box answer to the image tokens' hidden
    # states, and a per-patch box read at the chosen patch; the runtime then writes a [VG] answer from the pointed
    # patch instead of sampling box digits, which a small decoder gets wrong far more often. Exported as its own
    # ``box_pointer`` component. Off by default (RSUniVLM has none); the demo model turns it on (--box-pointer).
    box_pointer: bool = False
    pointer_dim: int = 128
    # Dense heads on the same patch states as the box pointer: per patch the objects centred in it (label
    # probabilities, box, oriented box) and its mask cells' label and change probabilities, plus which labels the
    # instruction asks for (from the answer-start state). The runtime writes [DET], [OBB] and [SEG] answers from them
    # (rsvlm_edge.dense) instead of sampling dozens of numbers or a 24x24 mask. Exported as the ``dense_heads``
    # component; needs box_pointer (the decoder's hidden states output). ``dense_labels``: the label vocabulary,
    # ``dense_objects``: those of them that are detected as objects.
    dense_heads: bool = False
    dense_labels: list[str] = field(default_factory=list)
    dense_objects: list[str] = field(default_factory=list)
    dense_hidden: int = 128
    sensors: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SENSORS))
    # Per-sensor stems map each sensor's bands to 3 channels. Off for RGB-only checkpoints (RSUniVLM): the encoder
    # takes the preprocessed RGB itself and ``sensors`` must be {"rgb": 3}.
    vision_stems: bool = True
    # LayerNorm over the fused feature before the projector. RSUniVLM has none; even identity weights would change
    # the values, so a converted model turns it off rather than faking it.
    vision_feature_norm: bool = True
    image_preprocess: str = "rsvlm"  # one of IMAGE_PREPROCESS_MODES
    # --- decoder (Qwen2 style) ---
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 640
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    attention_bias: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    num_experts: int = 3
    # --- prompt ---
    prompt_template: str = "rsvlm"  # one of PROMPT_TEMPLATES
    # --- instruction router ---
    # A learned router picks the expert of untagged prompts. Off for RSUniVLM, whose expert comes from the prompt's
    # tags alone ([SEG] -> pixel, [VG]/[REF] -> region, else image): no router module, weights or component.
    router: bool = True
    router_hidden: int = 128

    # ------------------------------------------------------------------ derived
    @property
    def grid_size(self) -> int:
        # SigLIP-so400m/14 at 384 px: the stride-14 patch conv covers 27x27 patches and drops the last 6 pixels.
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visual_tokens(self) -> int:
        """Tokens one image contributes to the decoder sequence."""
        return self.num_patches + (1 if self.image_newline else 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vision_feature_dim(self) -> int:
        """Width of the fused per-patch feature that enters the projector."""
        dim = self.vision_width * len(self.vision_feature_layers)
        if self.cnn_branch:
            dim += sum(self.cnn_channels)
        return dim

    # ------------------------------------------------------------------ validation / IO
    def validate(self) -> "ModelConfig":
        problems = []
        if self.image_size < self.patch_size:
            problems.append(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.box_pointer and self.pointer_dim < 1:
            problems.append(f"pointer_dim must be positive, got {self.pointer_dim}")
        if self.dense_heads:
            problems.extend(self._dense_problems())
        if self.token_pos_embed and self.hidden_size % 4:
            problems.append(f"token_pos_embed needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.vision_width % self.vision_heads:
            problems.append(f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}")
        for layer in self.vision_feature_layers:
            if not (1 <= layer <= self.vision_layers or -self.vision_layers <= layer <= -1):
                problems.append(f"vision_feature_layers entry {layer} is outside 1..{self.vision_layers}")
        if self.num_experts != len(EXPERT_NAMES):
            problems.append(f"num_experts must be {len(EXPERT_NAMES)} (image, region, pixel), got {self.num_experts}")
        if not self.sensors or any(c < 1 for c in self.sensors.values()):
            problems.append(f"sensors must map names to band counts >= 1, got {self.sensors}")
        for flag in ("vision_stems", "vision_feature_norm", "router", "tie_word_embeddings", "image_newline",
                     "cnn_branch", "token_pos_embed", "box_pointer", "attention_bias", "dense_heads"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not self.vision_stems and self.sensors != STEMLESS_SENSORS:
            problems.append(f"vision_stems false needs sensors {STEMLESS_SENSORS} (the encoder takes RGB directly), "
                            f"got {self.sensors}")
        if self.image_preprocess not in IMAGE_PREPROCESS_MODES:
            problems.append(f"image_preprocess must be one of {', '.join(IMAGE_PREPROCESS_MODES)}, "
                            f"got {self.image_preprocess!r}")
        elif self.image_preprocess != "rsvlm" and self.sensors != STEMLESS_SENSORS:
            problems.append(f"image_preprocess {self.image_preprocess!r} reads RGB images only: sensors must be "
                            f"{STEMLESS_SENSORS}, got {self.sensors}")
        if self.prompt_template not in PROMPT_TEMPLATES:
            problems.append(f"prompt_template must be one of {', '.join(PROMPT_TEMPLATES)}, got {self.prompt_template!r}")
        for name in ("vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "vision_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                problems.append(f"{name} must be a positive number, got {value!r}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        return self

    def _dense_problems(self) -> list[str]:
        problems = []
        if not self.box_pointer:
            problems.append("dense_heads needs box_pointer (the decoder's hidden states output)")
        if not self.dense_labels or len(set(self.dense_labels)) != len(self.dense_labels):
            problems.append(f"dense_labels must be distinct labels, got {self.dense_labels!r}")
        if not set(self.dense_objects) <= set(self.dense_labels) or not self.dense_objects:
            problems.append(f"dense_objects must be some of dense_labels, got {self.dense_objects!r}")
        if 24 % self.grid_size:  # formats.MASK_SIZE: each patch holds a whole block of mask cells
            problems.append(f"dense_heads needs a patch grid that divides the 24x24 mask, got {self.grid_size}")
        if self.dense_hidden < 1:
            problems.append(f"dense_hidden must be positive, got {self.dense_hidden}")
        return problems

    @property
    def dense_cells(self) -> int:
        """Mask cells per patch side (24 / grid)."""
        return 24 // self.grid_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data).validate()

    def save(self, path: str | Path) -> None:
        from rsvlm_edge.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)


def tiny_config() -> ModelConfig:
    """The demo model's shapes (models/tiny-demo adds ``token_pos_embed`` and ``box_pointer``: scripts/train_demo.sh)."""
    return ModelConfig().validate()


def rsunivlm_1b_config() -> ModelConfig:
    """RSUniVLM's architecture: SigLIP-so400m/14 @384 (26 of 27 layers, RGB only, no feature norm) + mlp2x_gelu +
    newline + Qwen2-0.5B with 3 experts chosen by the prompt's tags (no router). ``rsvlm-edge convert rsunivlm``
    starts from this and overrides what the checkpoint's config.json and tokenizer say (vocab, rope, eps, context)."""
    return ModelConfig(
        name="rsunivlm-1b",
        image_size=384,
        patch_size=14,
        vision_width=1152,
        vision_layers=26,
        vision_heads=16,
        vision_mlp=4304,
        vision_feature_layers=[-1],
        cnn_branch=False,
        cnn_channels=[],
        image_newline=True,
        sensors=dict(STEMLESS_SENSORS),
        vision_stems=False,
        vision_feature_norm=False,
        image_preprocess="siglip-square",
        prompt_template="qwen_1_5",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        attention_bias=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        num_experts=3,
        router=False,
    ).validate()


PRESETS = {"tiny": tiny_config, "rsunivlm-1b": rsunivlm_1b_config}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown config preset {name!r}; choose one of {', '.join(PRESETS)}") from None
