"""Chunked prefill (``OrtBackend(prefill_chunk=N)``): a long prompt run N positions per decoder run gives the same
logits, hidden states and KV cache as one run, on both KV layouts and at batch 1 and 2; a failed chunk leaves the
cache as it was."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.cli import main
from rsvlm_edge.manifest import KV_LAYOUT_SEQUENCE_MAJOR, KV_LAYOUT_SHARED

PROMPT, CHUNK = 23, 5  # 4 full chunks and a partial one


@pytest.fixture(scope="module")
def int8w_dir(fp32_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8w-chunks") / "int8w"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only"])
    assert res.exit_code == 0, res.output
    return out


def prefill(backend: OrtBackend, batch: int):
    """Prompt logits, hidden states (None without a box pointer), the cache, then one decode step's logits."""
    cfg = backend.config
    rng = np.random.default_rng(batch)
    embeds = (0.5 * rng.standard_normal((batch, PROMPT, cfg.hidden_size))).astype(np.float32)
    mask = np.ones((batch, PROMPT + 1), np.float32)
    mask[1:, :3] = 0  # the second row is left-padded
    positions = np.broadcast_to(np.arange(PROMPT, dtype=np.int32), (batch, PROMPT)).copy()
    cache = backend.new_cache(batch, PROMPT + 1, expert=1)
    if backend.has_box_pointer:
        logits, states = backend.forward_hidden(cache, embeds, positions, mask[:, :PROMPT])
    else:
        logits, states = backend.forward(cache, embeds, positions, mask[:, :PROMPT]), None
    assert cache.length == PROMPT
    step = backend.forward(cache, embeds[:, -1:], np.full((batch, 1), PROMPT, np.int32), mask)
    return logits, states, cache, step


@pytest.mark.parametrize("engine", ["fp32", "int8w"])
@pytest.mark.parametrize("batch", [1, 2])
def test_chunked_prefill_equals_one_run(engine, batch, fp32_export, int8w_dir):
    directory = fp32_export if engine == "fp32" else int8w_dir
    whole = OrtBackend.from_dir(directory, threads=1, prefill_chunk=None, preload=False)
    chunked = OrtBackend.from_dir(directory, threads=1, prefill_chunk=CHUNK, preload=False)
    assert whole.kv_layout == (KV_LAYOUT_SEQUENCE_MAJOR if engine == "fp32" else KV_LAYOUT_SHARED)
    a, b = prefill(whole, batch), prefill(chunked, batch)
    spread = float(np.abs(a[0]).max())
    for x, y in ((a[0], b[0]), (a[3], b[3])):  # prompt logits, then the next step's
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4 * spread)
    if a[1] is not None:
        np.testing.assert_allclose(b[1], a[1], rtol=0, atol=1e-4 * float(np.abs(a[1]).max()))
    for key_a, key_b in zip(a[2].state.keys, b[2].state.keys):
        if engine == "fp32":  # (capacity, B, kv_heads, head_dim) -> (B, capacity, ...)
            key_a, key_b = key_a.swapaxes(0, 1), key_b.swapaxes(0, 1)
        for row in range(batch):  # a padded position's keys are never read: compare the attended ones
            first = 3 if row else 0
            x, y = (k[row, first:PROMPT + 1] if engine == "fp32" else k[row, :, first:PROMPT + 1] for k in (key_a, key_b))
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-4 * float(np.abs(x).max()))


def test_a_failed_chunk_leaves_the_cache_length(fp32_export, monkeypatch):
    backend = OrtBackend.from_dir(fp32_export, threads=1, prefill_chunk=CHUNK, preload=False)
    real, calls = backend._decode_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise BackendError("chunk 3 failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "_decode_step", failing)
    cache = backend.new_cache(1, PROMPT, expert=0)
    embeds = np.zeros((1, PROMPT, backend.config.hidden_size), np.float32)
    with pytest.raises(BackendError, match="chunk 3 failed"):
        backend.forward(cache, embeds, np.arange(PROMPT, dtype=np.int32)[None], np.ones((1, PROMPT), np.float32))
    assert cache.length == 0 and len(calls) == 3


def test_prefill_chunk_must_be_positive(fp32_export):
    with pytest.raises(BackendError, match="at least one token"):
        OrtBackend.from_dir(fp32_export, prefill_chunk=0, preload=False)
