"""The ONNX Runtime backend: same tokens as the torch reference, KV cache written in place, experts, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.backends.ort_backend import OrtBackend, resolve_providers
from rsvlm_edge.backends.torch_backend import TorchBackend
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-ort"))


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("engines-ort") / "tiny")


def load_tokenizer(directory):
    return Tokenizer.load(directory / "tokenizer.json")


@pytest.fixture(scope="module")
def ort_backend(engine):
    return OrtBackend.from_dir(engine)


@pytest.fixture(scope="module")
def torch_gen(checkpoint):
    return Generator(TorchBackend.from_dir(checkpoint), load_tokenizer(checkpoint))


@pytest.fixture(scope="module")
def ort_gen(ort_backend, engine):
    return Generator(ort_backend, load_tokenizer(engine))


def pixels(seed, bands=3, size=128):
    return np.random.default_rng(seed).normal(size=(bands, size, size)).astype(np.float32)


REQUESTS = [
    Request([pixels(1)], "rgb", "[CAP] Describe the image."),
    Request([pixels(2)], "rgb", "[VG] Locate the ship in the harbour."),
    Request([pixels(3)], "rgb", "[SEG] Segment the water."),
    Request([pixels(4)], "rgb", "What is in the image?"),  # untagged: the router picks the expert
    Request([pixels(5), pixels(6)], "rgb", "[CCD] Describe the changes between the two images."),
    Request([pixels(7, bands=2)], "sar", "[CLS] Classify the scene."),
    Request([pixels(8, bands=12)], "ms", "[DET] Detect all objects."),
]


@pytest.mark.parametrize("index", range(len(REQUESTS)))
def test_greedy_tokens_match_torch(torch_gen, ort_gen, index):
    sampling = SamplingConfig(max_new_tokens=10)
    ref = torch_gen.generate([REQUESTS[index]], sampling)[0]
    got = ort_gen.generate([REQUESTS[index]], sampling)[0]
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert (got.routing.expert, got.routing.source) == (ref.routing.expert, ref.routing.source)
    if ref.routing.probs is not None:
        np.testing.assert_allclose(got.routing.probs, ref.routing.probs, atol=1e-5)


def test_batch_with_left_padding_equals_single_runs(ort_gen):
    reqs = [Request([pixels(11)], "rgb", "[CAP] Describe the image."),
            Request([pixels(12)], "rgb", "[VQA] How many ships are moored along the long pier in the harbour?")]
    sampling = SamplingConfig(max_new_tokens=8)
    batched = ort_gen.generate(reqs, sampling)
    for req, out in zip(reqs, batched):
        assert ort_gen.generate([req], sampling)[0].token_ids == out.token_ids


def test_kv_cache_is_written_in_place(ort_backend, checkpoint):
    import torch

    from rsvlm_edge.modeling import load_model

    cfg = ort_backend.config
    model = load_model(checkpoint)
    cache = ort_backend.new_cache(batch=1, capacity=12, expert=1)
    keys, values = cache.state.keys, cache.state.values
    assert len(keys) == cfg.num_layers and keys[0].shape == (12, 1, cfg.num_kv_heads, cfg.head_dim)
    for buf in keys + values:
        buf.fill(np.nan)  # sentinel: untouched rows stay NaN
    addresses = [b.ctypes.data for b in keys + values]
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(1, 7, cfg.hidden_size)).astype(np.float32)
    mask = np.ones((1, 12), np.float32)
    ort_backend.forward(cache, embeds[:, :5], np.arange(5, dtype=np.int32)[None], mask[:, :5])
    assert cache.length == 5
    assert np.isfinite(keys[0][:5]).all() and np.isnan(keys[0][5:]).all()
    logits = ort_backend.forward(cache, embeds[:, 5:7], np.arange(5, 7, dtype=np.int32)[None], mask[:, :7])
    assert cache.length == 7 and np.isnan(values[-1][7:]).all()
    assert [b.ctypes.data for b in keys + values] == addresses  # same buffers: written in place, never reallocated
    with torch.inference_mode():
        ref_logits, new = model.decode(torch.from_numpy(embeds), torch.arange(7)[None], torch.ones(1, 7),
                                       model.empty_cache(1), 1)
    np.testing.assert_allclose(logits, ref_logits[:, -1].numpy(), atol=1e-4)
    for i, (k, v) in enumerate(new):
        np.testing.assert_allclose(keys[i][:7], k.numpy(), atol=1e-4)
        np.testing.assert_allclose(values[i][:7], v.numpy(), atol=1e-4)


def test_cache_rules(ort_backend):
    cfg = ort_backend.config
    cache = ort_backend.new_cache(batch=2, capacity=4, expert=0)
    embeds = np.zeros((2, 3, cfg.hidden_size), np.float32)
    with pytest.raises(BackendError, match="attention_mask must be"):
        ort_backend.forward(cache, embeds, np.zeros((2, 3), np.int32), np.ones((2, 2), np.float32))
    ort_backend.forward(cache, embeds, np.zeros((2, 3), np.int32), np.ones((2, 3), np.float32))
    with pytest.raises(BackendError, match="KV cache full"):
        ort_backend.forward(cache, embeds, np.zeros((2, 3), np.int32), np.ones((2, 6), np.float32))
    with pytest.raises(BackendError, match="does not exist"):
        ort_backend.new_cache(1, 4, expert=7)
    with pytest.raises(BackendError, match="unknown sensor"):
        ort_backend.encode_images(np.zeros((1, 3, 128, 128), np.float32), "lidar")
    with pytest.raises(BackendError, match=r"must be \(B, 2, 128, 128\)"):
        ort_backend.encode_images(np.zeros((1, 3, 128, 128), np.float32), "sar")


def test_expert_budget_and_stats(engine):
    backend = OrtBackend.from_dir(engine, expert_budget_experts=1, verify="size", threads=1)
    cfg = backend.config
    for expert in (0, 1, 0):
        cache = backend.new_cache(1, 2, expert)
        backend.forward(cache, np.zeros((1, 1, cfg.hidden_size), np.float32), np.zeros((1, 1), np.int32),
                        np.ones((1, 1), np.float32))
    stats = backend.stats()
    assert stats["experts_resident"] == [0] and stats["expert_evictions"] == 2 and stats["experts_loaded"] == 3
    expert_bytes = backend.manifest.experts.expert_bytes
    assert stats["expert_bytes_read"] == 3 * expert_bytes and stats["expert_resident_bytes"] == expert_bytes
    trunk = backend.manifest.experts.trunk
    assert trunk is not None and stats["trunk_bytes_mapped"] == trunk.bytes
    assert stats["expert_load_ms"] > 0
    backend.prefetch_expert(2)  # loads on the cache's worker thread
    backend.expert_cache.get(2)
    assert backend.stats()["experts_resident"] == [2]
    backend.close()


def test_pinned_expert_survives_lru(engine):
    backend = OrtBackend.from_dir(engine, expert_budget_experts=2, pinned_experts=[2], verify="size", threads=1)
    cfg = backend.config
    for expert in (2, 0, 1, 0, 1):
        cache = backend.new_cache(1, 2, expert)
        backend.forward(cache, np.zeros((1, 1, cfg.hidden_size), np.float32), np.zeros((1, 1), np.int32),
                        np.ones((1, 1), np.float32))
        assert 2 in backend.stats()["experts_resident"]
    assert backend.stats()["expert_evictions"] == 3  # 0 and 1 take turns in the one unpinned slot
    backend.close()
    with pytest.raises(BackendError, match="pinned experts"):
        OrtBackend.from_dir(engine, expert_budget_experts=1, pinned_experts=[0, 1], verify="size")
    with pytest.raises(BackendError, match="expert 5"):
        OrtBackend.from_dir(engine, pinned_experts=[5], verify="size")


def test_trunk_is_mapped_once_and_shared(ort_backend):
    loaded = [ort_backend.expert_cache.get(e) for e in range(3)]
    loader = ort_backend.experts
    names = list(loader.trunk) + list(loader.expert_tensors)
    for name in loader.trunk:
        assert np.shares_memory(loader.trunk[name], loader.trunk_map)  # views of the one memory map
    # every expert session received the very same trunk memory (no copies), and its own expert memory
    for name in ("lm_head.weight.T", "layers.0.self_attn.q_proj.weight.T"):
        ptrs = {x.ort_values[names.index(name)].data_ptr() for x in loaded}
        assert ptrs == {loader.trunk[name].ctypes.data}
    name = "layers.0.mlp.up_proj.weight.T"
    assert len({x.ort_values[names.index(name)].data_ptr() for x in loaded}) == 3


def test_errors_are_clear(engine, tmp_path):
    with pytest.raises(BackendError, match="has no manifest.json"):
        OrtBackend.from_dir(tmp_path)
    with pytest.raises(BackendError, match="not available in this onnxruntime"):
        OrtBackend.from_dir(engine, providers=["tensorrt"], verify=False)
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_runs_without_torch(engine):
    """The ort backend and manifest never import torch: run a generation with torch made unimportable."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import numpy as np
        from rsvlm_edge.generation import Generator, Request
        from rsvlm_edge.backends.ort_backend import OrtBackend
        from rsvlm_edge.sampling import SamplingConfig
        from rsvlm_edge.tokenizer import Tokenizer
        backend = OrtBackend.from_dir({str(engine)!r}, threads=1)
        gen = Generator(backend, Tokenizer.load({str(engine / "tokenizer.json")!r}))
        px = np.zeros((3, 128, 128), np.float32)
        out = gen.generate([Request([px], "rgb", "[CAP] Describe.")], SamplingConfig(max_new_tokens=3))[0]
        assert len(out.token_ids) <= 3
        print("ok", backend.stats()["experts_loaded"])
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok 1")


def test_a_with_block_closes_the_backend_also_on_error(engine):
    """Leaving the block releases the resident experts and sessions, whether the body returned or raised."""
    with OrtBackend.from_dir(engine, verify="size", threads=1) as backend:
        backend.expert_cache.get(0)
        backend.embed(np.zeros((1, 1), np.int32))  # opens the embedding session
        assert backend.stats()["experts_resident"] == [0] and backend._sessions
    assert backend.stats()["experts_resident"] == [] and not backend._sessions
    with pytest.raises(ValueError, match="in the block"):
        with OrtBackend.from_dir(engine, verify="size", threads=1) as backend:
            backend.expert_cache.get(1)
            raise ValueError("in the block")
    assert backend.stats()["experts_resident"] == [] and not backend._sessions
