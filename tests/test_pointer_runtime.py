"""The box pointer after training: export (decoder hidden_states + the box_pointer component), the torch / ort / fake
TensorRT backends, and the generation loop writing [VG] answers from the pointer (alone, batched and in a chat)."""

from __future__ import annotations

import dataclasses
import sys

import fake_trt
import numpy as np
import pytest

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.config import tiny_config
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.formats import format_box, parse_box
from rsvlm_edge.generation import ChatSession, Generator, Request
from rsvlm_edge.manifest import HIDDEN_STATES, POINTER_COMPONENT, Manifest
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import Turn
from rsvlm_edge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = dataclasses.replace(tiny_config(), box_pointer=True, token_pos_embed=True).validate()
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-pointer"), cfg)


@pytest.fixture(scope="module")
def onnx_dir(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx-pointer") / "tiny", check=True)


@pytest.fixture(scope="module")
def tok(onnx_dir):
    return Tokenizer.load(onnx_dir / "tokenizer.json")


def tile(seed: int, bands: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(bands, 128, 128)).astype(np.float32)


def test_export_adds_hidden_states_and_the_pointer(onnx_dir):
    m = Manifest.load(onnx_dir)
    pointer = m.component(POINTER_COMPONENT)
    assert pointer.extra["kind"] == "box_pointer" and pointer.extra["grid"] == 8
    assert [(t.name, t.shape) for t in pointer.inputs] == [("query", ["batch", 256]), ("patches", ["batch", 64, 256])]
    assert [(t.name, t.shape) for t in pointer.outputs] == [("scores", ["batch", 64]), ("boxes", ["batch", 64, 4])]
    for name in m.experts.decoders:
        out = m.component(name).outputs[-1]
        assert (out.name, out.shape) == (HIDDEN_STATES, ["batch", "seq", 256])
        parity = m.extra["export"]["checks"][name]["parity"]
        assert parity["hidden_max_abs_diff"] < 1e-4
    assert m.extra["export"]["checks"][POINTER_COMPONENT]["parity"]["max_abs_diff"] < 1e-5


def test_backends_agree_on_hidden_states_and_boxes(checkpoint, onnx_dir):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.torch_backend import TorchBackend

    backends = [TorchBackend.from_dir(checkpoint), OrtBackend.from_dir(onnx_dir)]
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(2, 6, 256)).astype(np.float32)
    positions = np.tile(np.arange(6, dtype=np.int32), (2, 1))
    mask = np.ones((2, 6), np.float32)
    mask[0, :2] = 0  # left padding
    patches = rng.normal(size=(2, 64, 256)).astype(np.float32)
    got = []
    for backend in backends:
        assert backend.has_box_pointer
        cache = backend.new_cache(2, 8, 1)
        logits, hidden = backend.forward_hidden(cache, embeds, positions, mask)
        plain = backend.forward(backend.new_cache(2, 8, 1), embeds, positions, mask)
        np.testing.assert_allclose(logits, plain, atol=1e-5)  # the same step, with one more output
        assert hidden.shape == (2, 6, 256) and cache.length == 6
        scores, boxes = backend.point(hidden[:, -1], patches)
        assert scores.shape == (2, 64) and boxes.shape == (2, 64, 4)
        got.append((logits, hidden, scores, boxes))
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_models_without_a_pointer_refuse_pointing():
    from rsvlm_edge.backends.torch_backend import TorchBackend
    from rsvlm_edge.modeling import build_model

    backend = TorchBackend(build_model(tiny_config()))
    assert not backend.has_box_pointer
    with pytest.raises(BackendError, match="no box pointer"):
        backend.point(np.zeros((1, 256), np.float32), np.zeros((1, 64, 256), np.float32))
    with pytest.raises(BackendError, match="hidden states"):
        backend.forward_hidden(backend.new_cache(1, 4, 0), np.zeros((1, 1, 256), np.float32),
                               np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32))


def test_vg_answers_come_from_the_pointer(checkpoint, onnx_dir, tok):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.torch_backend import TorchBackend

    requests = [Request([tile(0)], "rgb", "[VG] the plane"), Request([tile(1)], "rgb", "[CAP] Describe the image."),
                Request([tile(2, 2)], "sar", "[VG] the ship on the left side")]
    sampling = SamplingConfig(max_new_tokens=12)
    backend = OrtBackend.from_dir(onnx_dir)
    gen = Generator(backend, tok)
    batched = gen.generate(requests, sampling)
    assert batched[1].pointer is None  # other tasks are sampled
    for request, out in zip(requests, batched):
        alone = gen.generate([request], sampling)[0]
        assert alone.token_ids == out.token_ids  # batching and left padding do not move the pointer
        if out.pointer is None:
            continue
        assert out.text == format_box(out.pointer.box) and parse_box(out.text)
        assert out.token_ids == tok.encode(out.text) and out.finish_reason == "stop"
        assert out.timings["decode_steps"] == len(out.token_ids)  # the answer went through the decoder (KV cache)
        assert 0 <= out.pointer.patch < 64 and 0 < out.pointer.probability <= 1
    reference = Generator(TorchBackend.from_dir(checkpoint), tok).generate(requests, sampling)
    assert [r.text for r in reference][::2] == [b.text for b in batched][::2]


def test_chat_points_from_the_kept_patch_states(onnx_dir, tok):
    from rsvlm_edge.backends.ort_backend import OrtBackend

    gen = Generator(OrtBackend.from_dir(onnx_dir), tok)
    chat = ChatSession(gen, [tile(3)], "rgb")
    first = chat.ask("[VG] the plane")
    second = chat.ask("[VG] the storage tank")
    assert chat.counters["reprefills"] == 0 and chat.counters["reused_tokens"] > 0  # the cache was reused
    assert first.pointer is not None and second.pointer is not None
    fresh = gen.generate([Request([tile(3)], "rgb", "[VG] the storage tank", history=[Turn("[VG] the plane", first.text)])])[0]
    assert second.text == fresh.text and second.pointer.patch == fresh.pointer.patch


def test_int8_builds_keep_the_pointer_in_fp32(onnx_dir, tok, tmp_path):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.engines.ort_build import build_ort

    out = tmp_path / "int8w"
    m = build_ort(onnx_dir, out, precision="int8", scheme="weight-only")
    assert m.component(POINTER_COMPONENT).precision == "fp32"
    for name in m.experts.decoders:
        assert m.component(name).extra["kv_layout"] == "bnsh-shared"  # the attention fusion still applies
        assert m.component(name).outputs[-1].name == HIDDEN_STATES
    requests = [Request([tile(4)], "rgb", "[VG] the plane")]
    want = Generator(OrtBackend.from_dir(onnx_dir), tok).generate(requests)[0]
    got = Generator(OrtBackend.from_dir(out), tok).generate(requests)[0]
    assert got.pointer is not None and want.pointer is not None
    assert np.abs(np.array(got.pointer.box) - np.array(want.pointer.box)).max() < 3.0


def test_trt_backend_points_like_ort(onnx_dir, tok, tmp_path, monkeypatch):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.trt_backend import TrtBackend
    from rsvlm_edge.engines.trt_build import build_trt_engines

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.make_tensorrt("10.3.0"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_trt.make_cudart(9, 0))
    fake_trt.BUILDS.clear()
    plans = build_trt_engines(onnx_dir, tmp_path / "plans", preset="orin-nx", precision="fp16", log=lambda msg: None)
    trt_backend = TrtBackend.from_dir(plans)
    assert trt_backend.has_box_pointer
    requests = [Request([tile(5)], "rgb", "[VG] the plane"), Request([tile(6)], "rgb", "[VG] the ship")]
    want = Generator(OrtBackend.from_dir(onnx_dir), tok).generate(requests)
    got = Generator(trt_backend, tok).generate(requests)
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.pointer is not None for g in got)
    trt_backend.close()


def test_cli_infer_reports_the_pointed_box(onnx_dir, sample_png):
    import json

    from click.testing import CliRunner

    from rsvlm_edge.cli import main

    res = CliRunner().invoke(main, ["infer", str(onnx_dir), str(sample_png), "--task", "vg", "--prompt", "the plane",
                                    "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["task"] == "[VG]" and "parse_error" not in out and len(out["boxes_px"]) == 1
    assert 0 <= out["pointer"]["patch"] < 64 and 0 < out["pointer"]["probability"] <= 1
    res = CliRunner().invoke(main, ["infer", str(onnx_dir), str(sample_png), "--task", "vg", "--verbose"],
                             catch_exceptions=False)
    assert res.exit_code == 0 and "box from the box pointer: patch" in res.output, res.output
