"""Parameter counts and FLOPs from a :class:`ModelConfig`, so figures can be set against the machine's limits
without loading a model (or torch). Counts follow :mod:`rsvlm_edge.modeling.model` layer by layer."""

from __future__ import annotations

from dataclasses import dataclass

from rsvlm_edge.config import ModelConfig

FP32_BYTES = 4


@dataclass(frozen=True)
class DecoderParams:
    """Decoder weights split the way an engine stores them: shared trunk, one expert, embedding table."""

    attention: int  # q/k/v/o projections (+ biases) of all layers
    norms: int  # RMSNorm weights of all layers + the final norm
    lm_head: int
    expert: int  # one expert's SwiGLU FFN over all layers
    embedding: int

    @property
    def trunk(self) -> int:
        return self.attention + self.norms + self.lm_head


def decoder_params(cfg: ModelConfig) -> DecoderParams:
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    bias = (q + 2 * kv) if cfg.attention_bias else 0
    attention = cfg.num_layers * (d * q + 2 * d * kv + q * d + bias)
    norms = cfg.num_layers * 2 * d + d
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    expert = cfg.num_layers * 3 * d * cfg.intermediate_size
    return DecoderParams(attention, norms, lm_head, expert, cfg.vocab_size * d)


def active_bytes_fp32(cfg: ModelConfig) -> int:
    """Weight bytes one decode step reads in FP32: trunk + one expert + one embedding row."""
    p = decoder_params(cfg)
    lm_head = p.lm_head or p.embedding  # a tied head still reads the whole table
    return (p.attention + p.norms + lm_head + p.expert + cfg.hidden_size) * FP32_BYTES


def attention_flops(cfg: ModelConfig, new: int, past: int = 0) -> float:
    """QK^T and AV over a causal window: each new position i attends to past + i + 1 keys."""
    keys = new * past + new * (new + 1) / 2
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    """One prefill of ``tokens`` positions: matmuls of trunk + expert per position, logits for the last one only."""
    p = decoder_params(cfg)
    per_token = p.attention + p.expert  # norms are elementwise; the embedding is a lookup
    return 2.0 * per_token * tokens + 2.0 * (p.lm_head or p.embedding) + attention_flops(cfg, tokens)


def vision_flops(cfg: ModelConfig, bands: int = 3) -> float:
    """One image through the sensor stem (models that have one), ViT (up to the last fused layer), CNN branch and
    projector."""
    s, n, w = cfg.image_size, cfg.num_patches, cfg.vision_width
    stem = 2.0 * s * s * (bands * 3 + bands * 9 * 16 + 16 * 3) if cfg.vision_stems else 0.0
    patch = 2.0 * n * 3 * cfg.patch_size**2 * w
    layers = [i if i > 0 else cfg.vision_layers + 1 + i for i in cfg.vision_feature_layers]
    block = 2.0 * n * (w * 3 * w + w * w + 2 * w * cfg.vision_mlp) + 4.0 * n * n * w
    cnn, size, cin = 0.0, s, 3
    for cout in cfg.cnn_channels if cfg.cnn_branch else []:
        size = (size + 1) // 2
        cnn += 2.0 * size * size * 9 * (cin * cout + cout * cout)
        cin = cout
    proj = 2.0 * n * (cfg.vision_feature_dim * cfg.hidden_size + cfg.hidden_size**2)
    return stem + patch + max(layers) * block + cnn + proj
