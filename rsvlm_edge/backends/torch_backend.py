"""PyTorch eager reference backend: what a user would run without this project, and the parity oracle.

This is the only backend that imports torch (lazily, through :mod:`rsvlm_edge.modeling`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsvlm_edge.backends.base import Backend, BackendError, CacheHandle


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        super().__init__(model.cfg)
        self.torch = torch
        self.model = model.eval()

    @classmethod
    def from_dir(cls, model_dir: str | Path, threads: int | None = None) -> "TorchBackend":
        try:
            from rsvlm_edge.modeling import load_model
        except ImportError as exc:  # torch missing
            raise BackendError(f"the torch backend needs PyTorch: pip install 'rsvlm-edge[export]' ({exc})") from None
        try:
            return cls(load_model(model_dir), threads=threads)
        except (FileNotFoundError, ValueError) as exc:
            raise BackendError(f"cannot load a PyTorch checkpoint from {model_dir}: {exc}") from None

    def _t(self, array: np.ndarray, dtype=None):
        tensor = self.torch.from_numpy(np.ascontiguousarray(array))
        return tensor if dtype is None else tensor.to(dtype)

    def encode_images(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        pixels = self.check_pixels(pixels, sensor)
        with self.torch.inference_mode():
            return self.model.encode_images(self._t(pixels), sensor).numpy()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.embed_tokens(self._t(ids, self.torch.long)).numpy()

    def route(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.check_router()
        with self.torch.inference_mode():
            return self.model.router(self._t(embeds), self._t(mask, self.torch.float32)).numpy()

    def new_cache(self, batch: int, capacity: int, expert: int) -> CacheHandle:
        return CacheHandle(batch=batch, capacity=capacity, expert=expert, state=self.model.empty_cache(batch))

    @property
    def has_box_pointer(self) -> bool:
        return self.model.box_pointer is not None

    def point(self, query: np.ndarray, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.model.box_pointer is None:
            return super().point(query, patches)
        torch, pointer = self.torch, self.model.box_pointer
        with torch.inference_mode():
            keys = self._t(patches, torch.float32)
            return pointer.scores(self._t(query, torch.float32), keys).numpy(), pointer.absolute_boxes(keys).numpy()

    @property
    def has_dense_heads(self) -> bool:
        return getattr(self.model, "dense_heads", None) is not None

    def dense(self, query: np.ndarray, patches: np.ndarray, patches_after: np.ndarray) -> dict[str, np.ndarray]:
        if not self.has_dense_heads:
            return super().dense(query, patches, patches_after)
        from rsvlm_edge.manifest import DENSE_OUTPUTS

        torch = self.torch
        with torch.inference_mode():
            outs = self.model.dense_heads(*(self._t(a, torch.float32) for a in (query, patches, patches_after)))
        return {name: out.numpy() for name, out in zip(DENSE_OUTPUTS, outs)}

    def _forward(self, cache: CacheHandle, embeds, position_ids, attention_mask, hidden: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        cache.check(cache.expert, embeds.shape[1])
        torch = self.torch
        args = (self._t(embeds, torch.float32), self._t(position_ids, torch.long), self._t(attention_mask, torch.float32),
                cache.state, cache.expert)
        with torch.inference_mode():
            if hidden:
                states, new = self.model.decode_hidden(*args)
                logits = self.model.lm_head(states[:, -1:]).float()
            else:
                states, (logits, new) = None, self.model.decode(*args)
            # Eager style: grow the cache by concatenation (what a plain PyTorch loop does).
            cache.state = [(torch.cat([pk, nk]), torch.cat([pv, nv])) for (pk, pv), (nk, nv) in zip(cache.state, new)]
        cache.length += embeds.shape[1]
        return logits[:, -1].numpy(), None if states is None else states.numpy()
