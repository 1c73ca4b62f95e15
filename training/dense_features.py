"""Frozen-trunk features for the dense heads: what the heads read at run time, computed once per sample.

The dense heads (:class:`rsvlm_edge.modeling.model.DenseHeads`) read the same states as the box pointer: the
decoder's final-norm hidden states of the image patch tokens and of the last prompt position (the state that starts
the answer), under the expert the task's tag routes to. The trunk is frozen while the heads train, so these states
are computed once through the runtime's own generation steps (:class:`~rsvlm_edge.generation.Generator` on the torch
backend: the same prompt template, image splicing and left padding as inference) and the heads train on the cache
in minutes instead of re-running the decoder every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.training.sample import Sample


@dataclass
class DenseFeatures:
    """Per sample: ``query`` (D,) and ``patches`` (images, grid^2, D), float16 to halve the cache."""

    query: np.ndarray  # (n, D)
    patches: np.ndarray  # (n, images, grid^2, D)


def sample_features(generator: Generator, samples: list[Sample], batch_size: int = 32) -> DenseFeatures:
    """Query and patch states of ``samples`` (all with the same number of images), in order."""
    cfg = generator.config
    grid2 = cfg.grid_size ** 2
    images = {len(s.images) for s in samples}
    if len(images) != 1:
        raise ValueError(f"samples must share their image count, got {sorted(images)}")
    queries, patches = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        requests = [Request([prepare_image(im, s.sensor, cfg.image_size, mode=cfg.image_preprocess) for im in s.images],
                            s.sensor, s.prompt) for s in chunk]
        by_expert: dict[int, list[int]] = {}
        for row, s in enumerate(chunk):
            by_expert.setdefault(s.expert, []).append(row)
        q = np.zeros((len(chunk), cfg.hidden_size), np.float16)
        p = np.zeros((len(chunk), len(chunk[0].images), grid2, cfg.hidden_size), np.float16)
        for expert, rows in by_expert.items():
            group = [requests[r] for r in rows]
            batch = generator.splice_images([generator.prompt(r) for r in group], generator.encode_images(group))
            cache = generator.backend.new_cache(len(group), batch.width, expert)
            _, hidden = generator.prefill(cache, batch.embeds, batch.positions, batch.mask, keep_hidden=True)
            assert hidden is not None
            for i, row in enumerate(rows):
                slots = np.nonzero(batch.slots[i])[0]
                per_image = cfg.num_visual_tokens
                q[row] = hidden[i, -1]
                for k in range(len(chunk[0].images)):
                    p[row, k] = hidden[i, slots[k * per_image: k * per_image + grid2]]
        queries.append(q)
        patches.append(p)
    return DenseFeatures(np.concatenate(queries), np.concatenate(patches))
