"""The exported components: thin ``nn.Module`` views onto the reference model, their IO specs and sample inputs.

Each view reuses the reference forward code unchanged (``VisionEncoder.forward``, ``RSVLM.decode`` ...) on a
*shallow copy* of the reference module whose children are swapped (an identity sensor stem; one expert per
layer), so the graphs compute exactly what :mod:`rsvlm_edge.modeling.model` computes.

Split (see also docs/design.md "Components" and "Manifest format"):

* ``vision_stem_<sensor>``: pixels (B, bands, H, W) -> (B, 3, H, W). One small graph per sensor.
* ``vision_encoder``: (B, 3, H, W) -> (B, num_visual_tokens, hidden). ViT + CNN branch + projector + newline,
  stored once and shared by every sensor. The CNN branch reads the stem output too, so cutting at the stem output
  is the only cut that keeps all encoder weights in one graph. Its input is ``stem_pixels``; models without stems
  (``ModelConfig.vision_stems`` false, RSUniVLM) export no stem graphs and the encoder takes the preprocessed RGB
  as ``pixels`` (:func:`rsvlm_edge.manifest.encoder_input`).
* ``embedding``: input_ids (B, S) int32 -> (B, S, hidden).
* ``router``: embeds (B, S, hidden) + mask (B, S) -> logits (B, num_experts). Absent for models without a router
  (``ModelConfig.router`` false): their expert comes from the prompt's tags.
* ``decoder_expert<e>``: one step (prefill or decode) with expert e; last-position logits and this call's K/V
  (models with a box pointer: also ``hidden_states``, the final-norm states of this call's positions).
* ``box_pointer`` (models with one): answer query state (B, hidden) + patch states (B, grid^2, hidden) -> pointer
  scores (B, grid^2) and each patch's box (B, grid^2, 4), in image sizes (the patch centres are added in the graph).
* ``dense_heads`` (models with them): answer query state + the image's patch states (and a pair's second image's,
  ``patches_after``) -> label, object, box, mask-cell and change probabilities (:class:`DenseGraph`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.export.names import DENSE_COMPONENT, HIDDEN_STATES, POINTER_COMPONENT
from rsvlm_edge.manifest import DENSE_OUTPUTS, encoder_input
from rsvlm_edge.modeling.model import VisionEncoder

#: Parameters of the decoder that belong to one expert (everything else in the decoder is the shared trunk).
EXPERT_PARAM = re.compile(r"^layers\.(\d+)\.experts\.(\d+)\.")


M = TypeVar("M", bound=nn.Module)


def shallow(module: M, keep: tuple[str, ...] | None = None, **children: nn.Module) -> M:
    """A copy of ``module`` sharing its parameters, with some children replaced (and, with ``keep``, others dropped)."""
    new = object.__new__(type(module))
    new.__dict__ = dict(module.__dict__)
    new._modules = {k: v for k, v in module._modules.items() if keep is None or k in keep or k in children}
    new._modules.update(children)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


class StemGraph(nn.Module):
    def __init__(self, stem: nn.Module):
        super().__init__()
        self.stem = stem

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stem(pixels)


class VisionEncoderGraph(nn.Module):
    """The shared encoder after the stem: ``VisionEncoder.encode`` on a copy without the stems."""

    def __init__(self, vision: VisionEncoder):
        super().__init__()
        self.vision = shallow(vision, keep=tuple(k for k in vision._modules if k != "stems"))

    def forward(self, stem_pixels: torch.Tensor) -> torch.Tensor:
        return self.vision.encode(stem_pixels)


class EmbeddingGraph(nn.Module):
    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class RouterGraph(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.router(embeds, mask)


class DecoderGraph(nn.Module):
    """``RSVLM.decode`` with expert ``expert`` in every layer, flattened KV inputs/outputs, last-position logits."""

    def __init__(self, model: Any, expert: int):
        super().__init__()
        layers = nn.ModuleList(shallow(layer, experts=nn.ModuleList([layer.experts[expert]])) for layer in model.layers)
        self.core = shallow(model, keep=("norm", "lm_head"), layers=layers)
        self.num_layers = len(layers)

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        if self.core.cfg.box_pointer:  # one extra output; the graph of models without a pointer is unchanged
            hidden, new = self.core.decode_hidden(inputs_embeds, position_ids, attention_mask, pairs, 0)
            logits = self.core.lm_head(hidden[:, -1]).float()
            return (logits, *[t for kv in new for t in kv], hidden)
        logits, new = self.core.decode(inputs_embeds, position_ids, attention_mask, pairs, 0)
        flat = [t for kv in new for t in kv]
        return (logits[:, -1], *flat)


class PointerGraph(nn.Module):
    """``BoxPointer`` scores and absolute boxes (each patch's box head output plus that patch's centre)."""

    def __init__(self, pointer: nn.Module):
        super().__init__()
        self.pointer = pointer

    def forward(self, query, patches):
        return self.pointer.scores(query, patches), self.pointer.absolute_boxes(patches)


class DenseGraph(nn.Module):
    """``DenseHeads`` as probabilities and absolute geometry: what :mod:`rsvlm_edge.dense` reads."""

    def __init__(self, heads: nn.Module):
        super().__init__()
        self.heads = heads

    def forward(self, query, patches, patches_after):
        return self.heads(query, patches, patches_after)


# ----------------------------------------------------------------------------------------------- specs
def T(name: str, dtype: str, *shape) -> dict:  # noqa: N802 - a tiny constructor
    return {"name": name, "dtype": dtype, "shape": list(shape)}


@dataclass
class ComponentSpec:
    """How to export one component: the module, sample inputs for tracing, IO spec, weight naming."""

    name: str
    kind: str  # vision_stem / vision_encoder / embedding / router / decoder
    module: nn.Module
    sample: tuple[torch.Tensor, ...]
    inputs: list[dict]
    outputs: list[dict]
    rename: Callable[[str], str]
    extra: dict

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
            if dyn:
                axes[t["name"]] = dyn
        return axes


def _strip(prefix: str) -> Callable[[str], str]:
    return lambda n: n[len(prefix):] if n.startswith(prefix) else n


def decoder_io(cfg: ModelConfig) -> tuple[list[dict], list[dict]]:
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    inputs = [T("inputs_embeds", "float32", "batch", "seq", cfg.hidden_size), T("position_ids", "int32", "batch", "seq"),
              T("attention_mask", "float32", "batch", "total_seq")]
    outputs = [T("logits", "float32", "batch", cfg.vocab_size)]
    for i in range(cfg.num_layers):
        inputs += [T(f"past_{kv_name}_{i}", "float32", "past_seq", "batch", kv, hd) for kv_name in ("key", "value")]
        outputs += [T(f"new_{kv_name}_{i}", "float32", "seq", "batch", kv, hd) for kv_name in ("key", "value")]
    if cfg.box_pointer:
        outputs.append(T(HIDDEN_STATES, "float32", "batch", "seq", cfg.hidden_size))
    return inputs, outputs


def decoder_weight_name(name: str) -> str:
    """``core.layers.3.experts.0.up_proj.weight.T`` -> ``layers.3.mlp.up_proj.weight.T`` (same in every expert graph)."""
    name = _strip("core.")(name)
    return re.sub(r"^(layers\.\d+)\.experts\.0\.", r"\1.mlp.", name)


def component_specs(model: Any, names: list[str] | None = None, batch: int = 2, seq: int = 3, past: int = 4,
                    seed: int = 0) -> list[ComponentSpec]:
    """Specs of every component of ``model`` (or those in ``names``), in export order.

    Only ``decoder_expert0`` is traced: the other experts' graphs are the same graph with their own FFN weights.
    """
    cfg: ModelConfig = model.cfg
    gen = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    specs: list[ComponentSpec] = []
    for sensor, bands in (cfg.sensors.items() if cfg.vision_stems else ()):
        specs.append(ComponentSpec(
            f"vision_stem_{sensor}", "vision_stem", StemGraph(model.vision.stems[sensor]),
            (torch.randn(batch, bands, size, size, generator=gen),),
            [T("pixels", "float32", "batch", bands, size, size)], [T("stem_pixels", "float32", "batch", 3, size, size)],
            _strip("stem."), {"sensor": sensor, "bands": bands}))
    specs.append(ComponentSpec(
        "vision_encoder", "vision_encoder", VisionEncoderGraph(model.vision),
        (torch.randn(batch, 3, size, size, generator=gen),),
        [T(encoder_input(cfg), "float32", "batch", 3, size, size)],
        [T("visual_tokens", "float32", "batch", cfg.num_visual_tokens, cfg.hidden_size)], _strip("vision."), {}))
    specs.append(ComponentSpec(
        "embedding", "embedding", EmbeddingGraph(model.embed_tokens),
        (torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen, dtype=torch.int32),),
        [T("input_ids", "int32", "batch", "seq")], [T("inputs_embeds", "float32", "batch", "seq", cfg.hidden_size)],
        lambda n: n, {}))
    if cfg.router:
        mask = torch.ones(batch, seq)
        mask[0, 0] = 0
        specs.append(ComponentSpec(
            "router", "router", RouterGraph(model.router),
            (torch.randn(batch, seq, cfg.hidden_size, generator=gen), mask),
            [T("embeds", "float32", "batch", "seq", cfg.hidden_size), T("mask", "float32", "batch", "seq")],
            [T("logits", "float32", "batch", cfg.num_experts)], lambda n: n, {}))
    inputs, outputs = decoder_io(cfg)
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    sample = (torch.randn(batch, seq, cfg.hidden_size, generator=gen),
              torch.arange(past, past + seq, dtype=torch.int32).expand(batch, seq).contiguous(),
              torch.ones(batch, past + seq),
              *[torch.randn(past, batch, kv, hd, generator=gen) for _ in range(2 * cfg.num_layers)])
    specs.append(ComponentSpec("decoder_expert0", "decoder", DecoderGraph(model, 0), sample, inputs, outputs,
                               decoder_weight_name, {"expert": 0}))
    if cfg.box_pointer:
        n = cfg.grid_size ** 2
        specs.append(ComponentSpec(
            POINTER_COMPONENT, "box_pointer", PointerGraph(model.box_pointer),
            (torch.randn(batch, cfg.hidden_size, generator=gen), torch.randn(batch, n, cfg.hidden_size, generator=gen)),
            [T("query", "float32", "batch", cfg.hidden_size), T("patches", "float32", "batch", n, cfg.hidden_size)],
            [T("scores", "float32", "batch", n), T("boxes", "float32", "batch", n, 4)], _strip("pointer."),
            {"grid": cfg.grid_size}))
    if cfg.dense_heads:
        n, labels, cells = cfg.grid_size ** 2, len(cfg.dense_labels), cfg.dense_cells ** 2
        shapes = {"asked": (labels,), "objects": (n, labels), "boxes": (n, 4), "obbs": (n, 6),
                  "cells": (n, cells, labels), "change": (n, cells)}
        specs.append(ComponentSpec(
            DENSE_COMPONENT, "dense_heads", DenseGraph(model.dense_heads),
            (torch.randn(batch, cfg.hidden_size, generator=gen), torch.randn(batch, n, cfg.hidden_size, generator=gen),
             torch.randn(batch, n, cfg.hidden_size, generator=gen)),
            [T("query", "float32", "batch", cfg.hidden_size), T("patches", "float32", "batch", n, cfg.hidden_size),
             T("patches_after", "float32", "batch", n, cfg.hidden_size)],
            [T(name, "float32", "batch", *shapes[name]) for name in DENSE_OUTPUTS], _strip("heads."),
            {"grid": cfg.grid_size, "labels": list(cfg.dense_labels)}))
    if names is not None:
        specs = [s for s in specs if s.name in names]
    return specs
