"""The PyTorch reference MoE VLM, whole in one file (nanoGPT style).

Vision: per-sensor stem -> ViT (multi-layer features) + optional CNN branch (multi-scale) -> fused (+ LayerNorm)
-> mlp2x_gelu projector -> visual tokens (+ one learned newline token, as in RSUniVLM).
Decoder: Qwen2 style (RoPE, GQA with q/k/v bias, RMSNorm, SwiGLU) whose FFN in every layer is one of 3 granularity
experts (image, region, pixel), chosen once per request (top-1). An instruction router (small MLP on the pooled
instruction embedding) predicts the expert when the request carries no task tag.

RSUniVLM itself (``vision_stems``, ``vision_feature_norm`` and ``router`` off) is the same code path with those
modules absent: SigLIP-so400m (transformers ``SiglipVisionModel``, 26 layers, ``hidden_states[-1]``, no
post-layernorm) -> Linear-GELU(erf)-Linear -> newline, and transformers' ``Qwen2`` decoder layers whose ``mlp`` is the
tag-chosen expert; tests/test_rsunivlm_parity.py checks this against transformers' own modules.

KV cache layout is sequence-major ``(T, B, kv_heads, head_dim)`` so a runtime can pass ``cache[:t]`` of a
preallocated buffer as a contiguous, zero-copy view. Only torch (no transformers) is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from rsvlm_edge.config import ModelConfig

#: Additive attention bias for masked keys: finite (no NaN on fully masked pad rows) and representable in fp16.
MASK_VALUE = -30000.0

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------- vision
class SensorStem(nn.Module):
    """Maps a sensor's bands to the 3 channels the shared encoder expects (RGB starts as identity)."""

    def __init__(self, in_channels: int, hidden: int = 16):
        super().__init__()
        self.in_channels = in_channels
        self.mix = nn.Conv2d(in_channels, 3, 1)
        spread, out = nn.Conv2d(in_channels, hidden, 3, padding=1), nn.Conv2d(hidden, 3, 1)
        for p in out.parameters():  # the local path starts silent: the stem begins as its linear mix
            nn.init.zeros_(p)
        self.local = nn.Sequential(spread, nn.GELU(), out)
        if in_channels == 3:
            with torch.no_grad():
                self.mix.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                self.mix.bias.zero_()  # type: ignore[union-attr]  # Conv2d has a bias unless bias=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x) + self.local(x)


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class CNNBranch(nn.Module):
    """Multi-scale convolutional features (EarthGPT-style), each stage pooled onto the ViT patch grid."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [3] + list(cfg.cnn_channels)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1), nn.GELU())
            for cin, cout in zip(chans[:-1], chans[1:])
        )
        size, self.pools = cfg.image_size, []
        for _ in cfg.cnn_channels:
            size = (size + 1) // 2
            if size % cfg.grid_size:
                raise ValueError(f"CNN stage size {size} is not a multiple of the patch grid {cfg.grid_size}")
            self.pools.append(size // cfg.grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage, pool in zip(self.stages, self.pools):
            x = stage(x)
            feats.append(F.avg_pool2d(x, pool).flatten(2).transpose(1, 2))  # (B, grid*grid, C)
        return torch.cat(feats, dim=-1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) row-major 2-D sin/cos code: the first half of the channels encodes the row, the second the
    column, each at dim/4 geometric frequencies (MAE / ViT-style). Values in [-1, 1]."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    freqs = 1.0 / (100.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def code(v: torch.Tensor) -> torch.Tensor:
        angles = v.reshape(-1, 1) * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1)


class VisionEncoder(nn.Module):
    """Pixels of one sensor -> visual tokens in the decoder's embedding space.

    ``stem`` maps a sensor's bands to 3 channels (the identity on RGB-only models without stems); ``encode`` is the
    shared rest, which the exported ``vision_encoder`` graph holds.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stems = (nn.ModuleDict({name: SensorStem(bands) for name, bands in cfg.sensors.items()})
                      if cfg.vision_stems else None)
        self.patch_embed = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.vision_width) * 0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp, cfg.vision_norm_eps) for _ in range(cfg.vision_layers)
        )
        self.feature_layers = [(i if i > 0 else cfg.vision_layers + 1 + i) for i in cfg.vision_feature_layers]
        self.cnn = CNNBranch(cfg) if cfg.cnn_branch else None
        self.feature_norm = (nn.LayerNorm(cfg.vision_feature_dim, eps=cfg.vision_norm_eps) if cfg.vision_feature_norm
                             else nn.Identity())
        self.proj1 = nn.Linear(cfg.vision_feature_dim, cfg.hidden_size)  # mlp2x_gelu projector
        self.proj2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.newline = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02) if cfg.image_newline else None
        self.token_pos_embed = (nn.Parameter(sincos_2d(cfg.grid_size, cfg.hidden_size)[None])
                                if cfg.token_pos_embed else None)

    def forward(self, pixels: torch.Tensor, sensor: str) -> torch.Tensor:
        return self.encode(self.stem(pixels, sensor))

    def stem(self, pixels: torch.Tensor, sensor: str) -> torch.Tensor:
        """(B, bands, H, W) of ``sensor`` -> (B, 3, H, W) encoder input."""
        if sensor not in self.cfg.sensors:
            raise KeyError(f"unknown sensor {sensor!r}; this model takes {', '.join(self.cfg.sensors)}")
        if self.stems is None:
            return pixels  # RGB-only model: the preprocessed image is the encoder input
        return self.stems[sensor](pixels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) stem output (or preprocessed RGB) -> (B, num_visual_tokens, hidden)."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            if i in self.feature_layers:
                feats.append(h)
            if i >= max(self.feature_layers):
                break  # later layers are unused (RSUniVLM drops SigLIP's last layer the same way)
        if self.cnn is not None:
            feats.append(self.cnn(x))
        tokens = self.proj2(F.gelu(self.proj1(self.feature_norm(torch.cat(feats, dim=-1)))))
        if self.token_pos_embed is not None:
            tokens = tokens + self.token_pos_embed
        if self.newline is not None:
            tokens = torch.cat([tokens, self.newline.expand(tokens.shape[0], 1, -1)], dim=1)
        return tokens


# ----------------------------------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, S, head_dim) for integer positions (B, S)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        """x (B,S,D); past_k/v (P,B,kv,hd); bias (B,1,S,P+S). Returns output and this call's new k/v (S,B,kv,hd)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_k, new_v = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # (S,B,kv,hd)
        keys = torch.cat([past_k, new_k], dim=0).permute(1, 2, 0, 3)  # (B,kv,P+S,hd)
        values = torch.cat([past_v, new_v], dim=0).permute(1, 2, 0, 3)
        groups = self.h // self.kv
        q = q.reshape(b, self.kv, groups * s, self.hd)  # fold the query heads of a KV group together (GQA)
        scores = (q @ keys.transpose(-2, -1)) / math.sqrt(self.hd)
        scores = scores.view(b, self.h, s, -1) + bias
        att = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(b, self.kv, groups * s, -1)
        out = (att @ values).view(b, self.h, s, self.hd).transpose(1, 2).reshape(b, s, self.h * self.hd)
        return self.o_proj(out), new_k, new_v


class ExpertMLP(nn.Module):
    """SwiGLU FFN; every decoder layer holds one per granularity expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.experts = nn.ModuleList(ExpertMLP(cfg) for _ in range(cfg.num_experts))

    def forward(self, x, cos, sin, bias, past_k, past_v, expert: int | torch.Tensor):
        a, new_k, new_v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + a
        h = self.post_attention_layernorm(x)
        if isinstance(expert, int):
            return x + self.experts[expert](h), new_k, new_v
        # Training batches mix requests routed to different experts: run each expert on its own rows.
        out = torch.zeros_like(h)
        for e, mlp in enumerate(self.experts):
            rows = (expert == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_copy(0, rows, mlp(h.index_select(0, rows)))
        return x + out, new_k, new_v


class InstructionRouter(nn.Module):
    """Predicts the granularity expert from the masked mean of the instruction's token embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.router_hidden)
        self.fc2 = nn.Linear(cfg.router_hidden, cfg.num_experts)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(embeds.dtype)[..., None]
        pooled = (embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.fc2(F.gelu(self.fc1(pooled)))


class BoxPointer(nn.Module):
    """Grounding by pointing: which image patch a box answer is about, and that patch's box.

    ``scores``: the hidden state that predicts a box answer's first token, against every patch token's hidden state
    (scaled bilinear). ``boxes``: per patch token, the box edges (x1, y1, x2, y2) minus the patch centre, in image
    sizes (0-1). Both read the decoder's final-norm hidden states. The image comes before the instruction, so under
    causal attention the patch states depend on the image only and the query carries the instruction: a chat can
    keep the patch states of its first prefill.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.pointer_dim)
        self.key = nn.Linear(cfg.hidden_size, cfg.pointer_dim)
        self.box = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, 4))
        self.grid = cfg.grid_size

    def scores(self, query: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """query (B, D), patches (B, N, D) -> (B, N) logits."""
        return torch.einsum("bd,bnd->bn", self.query(query), self.key(patches)) / self.query.out_features ** 0.5

    def boxes(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, N, D) -> (B, N, 4) box edges minus each patch's centre."""
        return self.box(patches)

    def absolute_boxes(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, grid^2, D), all of an image's patches in order -> (B, grid^2, 4) box edges in image sizes."""
        return self.boxes(patches) + patch_centres(torch.arange(self.grid ** 2, device=patches.device), self.grid)


class DenseHeads(nn.Module):
    """Detections and masks from the image patch states, and which labels the instruction asks for.

    Reads what the box pointer reads (final-norm decoder states of the patch tokens, and the answer-start state
    ``query``): small per-patch MLPs with one 3x3 convolution over the patch grid for the neighbours' context (one
    for objects, one for masks: the tasks read the states of different experts), then per patch the objects centred
    in it (a sigmoid per label, so a sample's partial labels train it), their box
    (edges minus the patch centre, as the pointer's box head) and oriented box (centre offset, w, h, and the angle
    as cos/sin of twice it: a rectangle turned by 180 degrees is the same), and the label probabilities of its
    ``dense_cells`` x ``dense_cells`` mask cells. A second branch reads both images of a pair (before, after and
    their difference) for change cells. ``forward`` gives probabilities and absolute geometry in image sizes
    (the exported graph); ``logits`` the raw outputs training needs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, n_labels, cells = cfg.hidden_size, cfg.dense_hidden, len(cfg.dense_labels), cfg.dense_cells ** 2
        self.grid, self.labels, self.cells = cfg.grid_size, n_labels, cells
        self.asked = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, n_labels))
        self.patch = nn.Sequential(nn.Linear(d, h), nn.GELU())
        self.context = nn.Conv2d(h, h, 3, padding=1)
        self.mask_patch = nn.Sequential(nn.Linear(d, h), nn.GELU())
        self.mask_context = nn.Conv2d(h, h, 3, padding=1)
        self.objects = nn.Linear(h, n_labels)
        self.box = nn.Linear(h, 4)
        self.obb = nn.Linear(h, 6)
        self.cell = nn.Linear(h, cells * n_labels)
        self.pair = nn.Sequential(nn.Linear(3 * d, h), nn.GELU())
        self.pair_context = nn.Conv2d(h, h, 3, padding=1)
        self.change = nn.Linear(h, cells)

    def _grid(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """(B, grid^2, h) + GELU(3x3 conv over the patch grid)."""
        b, n, h = x.shape
        image = x.transpose(1, 2).reshape(b, h, self.grid, self.grid)
        return x + F.gelu(conv(image)).reshape(b, h, n).transpose(1, 2)

    def image_logits(self, query: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw (asked, objects, boxes, obbs, cells) of one image: boxes and obb centres relative to patch centres."""
        x = self._grid(self.patch(patches), self.context)
        m = self._grid(self.mask_patch(patches), self.mask_context)
        b, n, _ = x.shape
        return (self.asked(query), self.objects(x), self.box(x), self.obb(x),
                self.cell(m).view(b, n, self.cells, self.labels))

    def change_logits(self, patches: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Raw change logits (B, grid^2, cells) of an image pair."""
        pair = self.pair(torch.cat([patches, after, after - patches], dim=-1))
        return self.change(self._grid(pair, self.pair_context))

    def logits(self, query: torch.Tensor, patches: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw (asked, objects, boxes, obbs, cells, change)."""
        return (*self.image_logits(query, patches), self.change_logits(patches, after))

    def forward(self, query: torch.Tensor, patches: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, ...]:
        asked, objects, box, obb, cells, change = self.logits(query, patches, after)
        centres = patch_centres(torch.arange(self.grid ** 2, device=patches.device), self.grid)
        obb = torch.cat([obb[..., :2] + centres[:, :2], obb[..., 2:]], dim=-1)
        return (torch.sigmoid(asked), torch.sigmoid(objects), box + centres, obb, torch.sigmoid(cells),
                torch.sigmoid(change))


def centre_patch(cx: float, cy: float, grid: int) -> int:
    """Index of the patch of a ``grid`` x ``grid`` layout holding the point (cx, cy), in image sizes (0-1)."""
    return min(grid - 1, int(cy * grid)) * grid + min(grid - 1, int(cx * grid))


def patch_centres(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(..., 4) centre (x, y, x, y) in image sizes of each patch index of a ``grid`` x ``grid`` layout."""
    px, py = (patches % grid + 0.5) / grid, (patches // grid + 0.5) / grid
    return torch.stack([px, py, px, py], -1)


def attention_bias(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """(B, P+S) 1/0 key mask -> additive (B,1,S,P+S) bias that is causal over the last S keys."""
    total = attention_mask.shape[1]
    past = total - query_len
    q_pos = torch.arange(query_len, device=attention_mask.device)[:, None] + past
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] > 0)
    return (~allowed).to(torch.float32) * MASK_VALUE


class RSVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.vision = VisionEncoder(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.router = InstructionRouter(cfg) if cfg.router else None
        self.box_pointer = BoxPointer(cfg) if cfg.box_pointer else None
        self.dense_heads = DenseHeads(cfg) if cfg.dense_heads else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # --------------------------------------------------------------------------- pieces used by export + runtime
    def encode_images(self, pixels: torch.Tensor, sensor: str) -> torch.Tensor:
        return self.vision(pixels, sensor)

    def route(self, instruction_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Router logits (B, num_experts) for tokenised instructions (tag removed)."""
        if self.router is None:
            raise ValueError(f"{self.cfg.name} has no instruction router: its expert comes from the prompt's tags")
        return self.router(self.embed_tokens(instruction_ids), mask)

    def empty_cache(self, batch: int, device=None, dtype=torch.float32) -> KVCache:
        shape = (0, batch, self.cfg.num_kv_heads, self.cfg.head_dim)
        return [(torch.zeros(shape, device=device, dtype=dtype),) * 2 for _ in self.layers]

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past: KVCache,
        expert: int | torch.Tensor,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, KVCache]:
        """One prefill or decode step. Returns logits (last position only unless ``all_logits``) and new k/v."""
        x, new = self._layers(inputs_embeds, position_ids, attention_mask, past, expert)
        x = self.norm(x if all_logits else x[:, -1:])
        return self.lm_head(x).float(), new

    def decode_hidden(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                      past: KVCache, expert: int | torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """:meth:`decode` returning the final-norm hidden states of every new position (B, S, D) instead of logits:
        what the box pointer reads (``lm_head`` of the last one gives :meth:`decode`'s logits)."""
        x, new = self._layers(inputs_embeds, position_ids, attention_mask, past, expert)
        return self.norm(x), new

    def _layers(self, inputs_embeds, position_ids, attention_mask, past: KVCache, expert) -> tuple[torch.Tensor, KVCache]:
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        bias = attention_bias(attention_mask, inputs_embeds.shape[1])
        x, new = inputs_embeds, []
        for layer, (pk, pv) in zip(self.layers, past):
            x, nk, nv = layer(x, cos, sin, bias, pk, pv, expert)
            new.append((nk, nv))
        return x, new

    def splice_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
        """Embed ids and put visual tokens, in order, where the ids hold the (expanded) image placeholder."""
        embeds = self.embed_tokens(input_ids)
        if image_embeds is None:
            return embeds
        slots = input_ids == image_token_id
        if int(slots.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"{int(slots.sum())} image placeholder tokens but {image_embeds.shape[0]}x{image_embeds.shape[1]} visual tokens"
            )
        return embeds.masked_scatter(slots[..., None], image_embeds.to(embeds.dtype).reshape(-1))

    def hidden_states(self, input_ids, attention_mask, image_embeds, image_token_id: int, expert) -> torch.Tensor:
        """Final-norm hidden states (B, S, D) of a full sequence (training; lm_head is applied where labels are)."""
        embeds = self.splice_images(input_ids, image_embeds, image_token_id)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        bias = attention_bias(attention_mask, input_ids.shape[1])
        x = embeds
        for layer, (pk, pv) in zip(self.layers, self.empty_cache(input_ids.shape[0], input_ids.device)):
            x, _, _ = layer(x, cos, sin, bias, pk, pv, expert)
        return self.norm(x)

    def forward(self, input_ids, attention_mask, image_embeds, image_token_id: int, expert) -> torch.Tensor:
        """All-position logits (B, S, V). ``image_embeds``: (n_images_total, Nv, D) in batch order."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, image_embeds, image_token_id, expert)).float()


# ----------------------------------------------------------------------------------------------------- utilities
def parameter_counts(model: RSVLM) -> dict[str, int]:
    """Stored parameters, and those active for one request (one expert of three)."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = count(model)
    per_expert = sum(count(cast(DecoderLayer, layer).experts[0]) for layer in model.layers)
    stems = [count(stem) for stem in model.vision.stems.values()] if model.vision.stems is not None else [0]
    # A request runs one expert of three and one sensor stem.
    active = total - per_expert * (model.cfg.num_experts - 1) - (sum(stems) - max(stems))
    return {"stored": total, "active": active, "per_expert": per_expert}


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> RSVLM:
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return RSVLM(cfg)


def save_model(model: RSVLM, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write config.json + model.safetensors (atomically)."""
    from safetensors.torch import save_file

    from rsvlm_edge.fileio import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": model.cfg.name})
    model.cfg.save(directory / "config.json")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> RSVLM:
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = ModelConfig.load(directory / "config.json")
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no model.safetensors in {directory}")
    model = build_model(cfg, device="meta", seed=None)
    state = load_file(str(weights), device=str(device))
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights} does not match its config: missing={missing[:5]} unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()
