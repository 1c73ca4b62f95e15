"""The interface every backend (torch reference, ONNX Runtime, TensorRT) implements, in numpy arrays only.

The generation loop in :mod:`rsvlm_edge.generation` drives these five calls; a backend owns its KV cache
representation behind :class:`CacheHandle`.

Threads: a backend may be shared by threads. :attr:`Backend.lock` (re-entrant) is what serialises requests: the
generation loop holds it for a whole request group (prefill and every decode step), and a backend whose run state
is per backend rather than per cache (TensorRT: one stream, per-engine bindings and buffers) also takes it in
each call. Decoder weights are held in the expert cache only while a step runs on them
(:meth:`~rsvlm_edge.expert_cache.ExpertCache.hold`), so loading one expert never frees another in use.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from rsvlm_edge.config import ModelConfig


class BackendError(RuntimeError):
    """A backend cannot load or run a model (missing files, wrong shapes, unavailable provider)."""


@dataclass
class CacheHandle:
    """A KV cache built with one expert: it is invalid for any other (docs/design.md), so the expert travels with it."""

    batch: int
    capacity: int
    expert: int
    length: int = 0
    state: Any = None  # backend specific storage
    stats: dict[str, float] = field(default_factory=dict)

    def check(self, expert: int, new_tokens: int) -> None:
        if expert != self.expert:
            raise BackendError(f"KV cache was computed with expert {self.expert}; re-prefill to use expert {expert}")
        if self.length + new_tokens > self.capacity:
            raise BackendError(f"KV cache full: {self.length} + {new_tokens} tokens > capacity {self.capacity}")

    def check_step(self, embeds: np.ndarray, attention_mask: np.ndarray) -> tuple[int, int, int]:
        """Validate one :meth:`Backend.forward` call against this cache; returns (batch, new positions, start)."""
        b, s = embeds.shape[:2]
        self.check(self.expert, s)
        if b != self.batch:
            raise BackendError(f"batch {b} does not match the cache's batch {self.batch}")
        start = self.length
        if attention_mask.shape != (b, start + s):
            raise BackendError(f"attention_mask must be (B, cache length + S) = {(b, start + s)}, got {attention_mask.shape}")
        return b, s, start


class Backend(abc.ABC):
    name: str = "base"

    def __init__(self, config: ModelConfig):
        self.config = config
        self.lock = threading.RLock()  # one request (group) at a time; see the module docstring

    @abc.abstractmethod
    def encode_images(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        """(B, C, H, W) float32 prepared pixels -> (B, num_visual_tokens, hidden) visual tokens.

        Models with stems run ``sensor``'s stem first; models without (``config.vision_stems`` false) take the
        preprocessed RGB (``sensor`` "rgb") straight into the encoder.
        """

    def check_pixels(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        """``pixels`` as contiguous float32, refused unless they are (B, bands of ``sensor``, size, size)."""
        if sensor not in self.config.sensors:
            what = "has stems for" if self.config.vision_stems else "takes only"
            raise BackendError(f"unknown sensor {sensor!r}; this model {what} {', '.join(self.config.sensors)}")
        bands, size = self.config.sensors[sensor], self.config.image_size
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (bands, size, size):
            raise BackendError(f"{sensor} pixels must be (B, {bands}, {size}, {size}), got {pixels.shape}")
        return pixels

    @abc.abstractmethod
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(B, S) int32 token ids -> (B, S, hidden) float32 embeddings."""

    @abc.abstractmethod
    def route(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Instruction embeddings (B, S, hidden) + 1/0 mask (B, S) -> router logits (B, num_experts).

        Refused (:meth:`check_router`) on models without a router, whose expert comes from the prompt's tags.
        """

    def check_router(self) -> None:
        if not self.config.router:
            raise BackendError(f"{self.config.name} has no instruction router (model_config.router is false): its "
                               f"expert comes from the prompt's tags ([SEG] -> pixel, [VG]/[REF] -> region, else image)")

    @abc.abstractmethod
    def new_cache(self, batch: int, capacity: int, expert: int) -> CacheHandle:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens."""

    def forward(self, cache: CacheHandle, embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run S new positions through the decoder with ``cache.expert``; append their K/V; return last-position logits (B, V).

        ``attention_mask`` covers the cache plus the new positions: (B, cache.length + S), 1 = attend, 0 = padding.
        """
        return self._forward(cache, embeds, position_ids, attention_mask, hidden=False)[0]

    @property
    def has_box_pointer(self) -> bool:
        """Whether :meth:`forward_hidden` and :meth:`point` work: the model has a box pointer and this backend runs it."""
        return False

    def forward_hidden(self, cache: CacheHandle, embeds: np.ndarray, position_ids: np.ndarray,
                       attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`forward` that also returns the final-norm hidden states of the S new positions (B, S, hidden)."""
        if not self.has_box_pointer:
            raise BackendError(f"the {self.name} backend does not return hidden states for this model (no box pointer)")
        logits, hidden = self._forward(cache, embeds, position_ids, attention_mask, hidden=True)
        assert hidden is not None
        return logits, hidden

    @abc.abstractmethod
    def _forward(self, cache: CacheHandle, embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One decoder step, the part each backend implements: last-position logits, and the new positions' hidden
        states when ``hidden`` (else None). :meth:`forward` and :meth:`forward_hidden` are both this step."""

    def point(self, query: np.ndarray, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Box pointer: answer query states (B, hidden) + image patch states (B, grid^2, hidden) -> pointer scores
        (B, grid^2) and every patch's box (B, grid^2, 4) as x1, y1, x2, y2 in image sizes (0-1)."""
        raise BackendError(f"the {self.name} backend has no box pointer for this model")

    @property
    def has_dense_heads(self) -> bool:
        """Whether :meth:`dense` works: the model has dense heads (and hidden states) and this backend runs them."""
        return False

    def dense(self, query: np.ndarray, patches: np.ndarray, patches_after: np.ndarray) -> dict[str, np.ndarray]:
        """Dense heads: answer query states (B, hidden) + patch states of the image (B, grid^2, hidden) and of the
        second image of a pair (the first again for one image) -> the arrays of
        :data:`rsvlm_edge.manifest.DENSE_OUTPUTS` by name (see :class:`rsvlm_edge.dense.DenseOutputs`)."""
        raise BackendError(f"the {self.name} backend has no dense heads for this model")

    def prefetch_expert(self, expert: int) -> None:
        """Start making ``expert`` resident (backends with an expert cache load it while the vision encoder runs)."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``--verbose`` (expert cache hits, bytes loaded ...)."""
        return {}

    def close(self) -> None:
        """Release sessions and device memory."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """``with OrtBackend.load(...) as backend:`` closes the sessions (and frees device memory) on the way out,
        also when a request fails."""
        self.close()
