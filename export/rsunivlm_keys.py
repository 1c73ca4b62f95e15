"""RSUniVLM (``llava_qwen_gmoe``) tensor names -> this repo's model names: the single table both the converter and
the parity tests use.

The source names are the module paths of ``LlavaQwenGMoeForCausalLM`` as ``builder.py`` loads it: SigLIP under
``model.vision_tower.vision_tower.vision_model``, the projector as ``model.mm_projector.{0,2}``, the Qwen2 decoder
under ``model.`` with ``mlp.{e}`` one of three experts per layer, and ``lm_head``. Our names are those of
:class:`rsvlm_edge.modeling.model.RSVLM` for a stem-less, router-less config without feature norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rsvlm_edge.config import ModelConfig

SIGLIP = "model.vision_tower.vision_tower.vision_model."
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class KeyMapping:
    """Where one source tensor goes.

    ``target`` None: read and checked, not stored (SigLIP's unused ``post_layernorm``; ``lm_head`` of a tied model,
    which HF replaces by ``embed_tokens``). ``part``: slot along dim 0 of a fused target (our ViT's ``qkv`` is
    ``cat([q, k, v])``). ``rows``: keep the first rows only (the vocab cut to ``len(tokenizer)``, as builder.py's
    ``resize_token_embeddings`` does). ``target_shape``: the stored shape when it differs (the position embedding
    table becomes ``(1, N, C)``). ``optional``: absent is fine (``lm_head`` of a tied model)."""

    target: str | None
    shape: tuple[int, ...]
    part: int | None = None
    rows: int | None = None
    target_shape: tuple[int, ...] | None = None
    optional: bool = False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.target_shape is not None:
            return self.target_shape
        if self.rows is not None:
            return (self.rows,) + self.shape[1:]
        return self.shape


def rsunivlm_key_map(cfg: ModelConfig, stored_vocab: int | None = None) -> dict[str, KeyMapping]:
    """Every tensor a ``llava_qwen_gmoe`` checkpoint of ``cfg``'s shape holds -> :class:`KeyMapping`, in the order
    our model stores them. ``stored_vocab``: rows of the stored embed / lm_head (config.json ``vocab_size``),
    at least ``cfg.vocab_size`` (= len(tokenizer)); default ``cfg.vocab_size``."""
    rows = stored_vocab or cfg.vocab_size
    w, mlp, h = cfg.vision_width, cfg.vision_mlp, cfg.hidden_size
    kv = cfg.num_kv_heads * cfg.head_dim
    out: dict[str, KeyMapping] = {}

    def add(source: str, target: str | None, shape: tuple[int, ...], **kw: Any) -> None:
        out[source] = KeyMapping(target, shape, **kw)

    # ---- SigLIP tower (its last layer deleted by the tower, head replaced by identity: neither is stored)
    add(SIGLIP + "embeddings.patch_embedding.weight", "vision.patch_embed.weight", (w, 3, cfg.patch_size, cfg.patch_size))
    add(SIGLIP + "embeddings.patch_embedding.bias", "vision.patch_embed.bias", (w,))
    add(SIGLIP + "embeddings.position_embedding.weight", "vision.pos_embed", (cfg.num_patches, w),
        target_shape=(1, cfg.num_patches, w))
    for j in range(cfg.vision_layers):
        src, dst = f"{SIGLIP}encoder.layers.{j}.", f"vision.blocks.{j}."
        for kind in ("weight", "bias"):
            add(f"{src}layer_norm1.{kind}", f"{dst}norm1.{kind}", (w,))
            for part, name in enumerate(QKV):
                add(f"{src}self_attn.{name}_proj.{kind}", f"{dst}qkv.{kind}", (w, w) if kind == "weight" else (w,),
                    part=part)
            add(f"{src}self_attn.out_proj.{kind}", f"{dst}proj.{kind}", (w, w) if kind == "weight" else (w,))
            add(f"{src}layer_norm2.{kind}", f"{dst}norm2.{kind}", (w,))
            add(f"{src}mlp.fc1.{kind}", f"{dst}fc1.{kind}", (mlp, w) if kind == "weight" else (mlp,))
            add(f"{src}mlp.fc2.{kind}", f"{dst}fc2.{kind}", (w, mlp) if kind == "weight" else (w,))
    for kind in ("weight", "bias"):  # computed by SigLIP, never used: the tower returns hidden_states[-1]
        add(f"{SIGLIP}post_layernorm.{kind}", None, (w,))
    # ---- mlp2x_gelu projector and the newline token
    add("model.mm_projector.0.weight", "vision.proj1.weight", (h, w))
    add("model.mm_projector.0.bias", "vision.proj1.bias", (h,))
    add("model.mm_projector.2.weight", "vision.proj2.weight", (h, h))
    add("model.mm_projector.2.bias", "vision.proj2.bias", (h,))
    if cfg.image_newline:
        add("model.image_newline", "vision.newline", (h,))
    # ---- Qwen2 decoder with three experts per layer
    add("model.embed_tokens.weight", "embed_tokens.weight", (rows, h), rows=cfg.vocab_size)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        add(f"{src}input_layernorm.weight", f"{dst}input_layernorm.weight", (h,))
        for name, width in (("q", h), ("k", kv), ("v", kv)):
            add(f"{src}self_attn.{name}_proj.weight", f"{dst}self_attn.{name}_proj.weight", (width, h))
            add(f"{src}self_attn.{name}_proj.bias", f"{dst}self_attn.{name}_proj.bias", (width,))
        add(f"{src}self_attn.o_proj.weight", f"{dst}self_attn.o_proj.weight", (h, h))
        add(f"{src}post_attention_layernorm.weight", f"{dst}post_attention_layernorm.weight", (h,))
        for e in range(cfg.num_experts):
            for name, shape in (("gate", (cfg.intermediate_size, h)), ("up", (cfg.intermediate_size, h)),
                                ("down", (h, cfg.intermediate_size))):
                add(f"{src}mlp.{e}.{name}_proj.weight", f"{dst}experts.{e}.{name}_proj.weight", shape)
    add("model.norm.weight", "norm.weight", (h,))
    if cfg.tie_word_embeddings:
        add("lm_head.weight", None, (rows, h), optional=True)
    else:
        add("lm_head.weight", "lm_head.weight", (rows, h), rows=cfg.vocab_size)
    return out


def target_shapes(key_map: Mapping[str, KeyMapping]) -> dict[str, tuple[int, ...]]:
    """Our key -> stored shape (a fused target's parts add up along dim 0), in key-map order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for m in key_map.values():
        if m.target is None:
            continue
        shape = m.stored_shape
        if m.target in shapes and m.part is not None:
            prev = shapes[m.target]
            shapes[m.target] = (prev[0] + shape[0],) + prev[1:]
        else:
            shapes[m.target] = shape
    return shapes


def map_state_dict(source: Mapping[str, Any], key_map: Mapping[str, KeyMapping]) -> dict[str, Any]:
    """Apply the key map to in-memory tensors (numpy arrays or torch tensors): our state dict, same array type.
    For tests and small checkpoints; the converter streams the same mapping from disk."""
    parts: dict[str, list[tuple[int, Any]]] = {}
    out: dict[str, Any] = {}
    for name, m in key_map.items():
        if m.target is None or name not in source:
            continue
        t = source[name]
        if m.rows is not None:
            t = t[: m.rows]
        if m.target_shape is not None:
            t = t.reshape(m.target_shape)
        if m.part is not None:
            parts.setdefault(m.target, []).append((m.part, t))
        else:
            out[m.target] = t
    for target, pieces in parts.items():
        ordered = [t for _, t in sorted(pieces, key=lambda p: p[0])]
        if isinstance(ordered[0], np.ndarray):
            out[target] = np.concatenate(ordered)
        else:
            import torch

            out[target] = torch.cat(ordered)
    return {k: out[k] for k in target_shapes(key_map) if k in out}
