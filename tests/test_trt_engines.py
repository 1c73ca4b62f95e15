"""TensorRT plans without a GPU: presets, profiles, precision rules, calibration caches, the TensorRT manifest and its
compatibility refusal, the clear error when TensorRT is absent, and build -> backend -> tokens through a fake
TensorRT (tests/fake_trt.py) that runs the graphs with ONNX Runtime behind TensorRT's name-based binding API."""

from __future__ import annotations

import sys
import types

import fake_trt
import numpy as np
import pytest

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.backends.trt_env import TrtUnavailableError, load_tensorrt
from rsvlm_edge.backends.trt_shapes import ShapeError, batch_chunks, decoder_steps, read_profiles
from rsvlm_edge.config import rsunivlm_1b_config, tiny_config
from rsvlm_edge.engines import trt_calib
from rsvlm_edge.engines.trt_presets import PRESETS, PresetError, get_preset, uses_dla
from rsvlm_edge.engines.trt_profiles import Limits, ProfileError, component_profiles
from rsvlm_edge.engines.trt_settings import BuildSettingsError, check_graph_precision, check_int8_inputs, plan_settings
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.manifest import Component, EngineCompatError, Manifest, TensorSpec, check_engine_compat


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-trt"))


@pytest.fixture(scope="module")
def onnx_dir(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx-trt") / "tiny")


@pytest.fixture(scope="module")
def onnx_manifest(onnx_dir):
    return Manifest.load(onnx_dir, verify=False)


@pytest.fixture
def fake_env(monkeypatch):
    """Fake tensorrt + cuda runtime installed in sys.modules (what load_tensorrt / load_cudart import)."""
    trt, rt = fake_trt.make_tensorrt("10.3.0"), fake_trt.make_cudart(9, 0)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    fake_trt.BUILDS.clear()
    return trt, rt


# ----------------------------------------------------------------------------------------------- presets
def test_presets():
    assert set(PRESETS) == {"datacenter", "orin-agx", "orin-nx", "orin-nano"}
    gib = 1 << 30
    assert [PRESETS[n].workspace_bytes for n in ("orin-agx", "orin-nx", "orin-nano")] == [4 * gib, 2 * gib, 1 * gib]
    assert PRESETS["orin-nano"].dla_core is None  # Orin Nano has no DLA
    agx = get_preset("orin-agx")
    assert uses_dla(agx, "vision_encoder", "fp16") and uses_dla(agx, "vision_encoder", "int8")
    assert not uses_dla(agx, "vision_encoder", "fp32") and not uses_dla(agx, "decoder_expert0", "fp16")
    assert not uses_dla(get_preset("datacenter"), "vision_encoder", "fp16")
    assert PRESETS["orin-nano"].max_batch <= PRESETS["orin-agx"].max_batch <= PRESETS["datacenter"].max_batch
    with pytest.raises(PresetError, match="orin-agx"):
        get_preset("jetson-tx2")


def test_limits_follow_the_model_and_preset():
    big = rsunivlm_1b_config()
    nano = Limits.of(big, get_preset("orin-nano"))
    assert nano.max_context == 2048  # capped by the preset below the model's 4096
    assert nano.max_prompt == 2 * big.num_visual_tokens + 256  # two images + text
    dc = Limits.of(big, get_preset("datacenter"))
    assert dc.max_context == big.max_position_embeddings
    tiny = tiny_config()
    assert Limits.of(tiny, get_preset("datacenter")).max_context == tiny.max_position_embeddings


# ----------------------------------------------------------------------------------------------- profiles
def test_decoder_profiles(onnx_manifest):
    cfg = onnx_manifest.config()
    preset = get_preset("datacenter")
    lim = Limits.of(cfg, preset)
    prefill, decode = component_profiles(onnx_manifest.component("decoder_expert0"), cfg, preset)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    kv = (cfg.num_kv_heads, cfg.head_dim)
    assert prefill.shapes["inputs_embeds"] == ((1, 1, cfg.hidden_size), (4, lim.opt_prompt, cfg.hidden_size),
                                               (16, lim.max_prompt, cfg.hidden_size))
    assert prefill.shapes["past_key_0"] == ((0, 1) + kv, (0, 4) + kv, (0, 16) + kv)  # empty cache, sequence-major
    assert prefill.shapes["attention_mask"][2] == (16, lim.max_prompt)
    assert decode.shapes["position_ids"] == ((1, 1), (4, 1), (16, 1))
    assert decode.shapes[f"past_value_{cfg.num_layers - 1}"][2] == (lim.max_context - 1, 16) + kv
    assert decode.shapes["attention_mask"] == ((1, 2), (4, lim.opt_past + 1), (16, lim.max_context))
    assert set(prefill.shapes) == {t.name for t in onnx_manifest.component("decoder_expert0").inputs}


def test_other_profiles(onnx_manifest):
    cfg = onnx_manifest.config()
    preset = get_preset("orin-agx")
    (stem,) = component_profiles(onnx_manifest.component("vision_stem_sar"), cfg, preset)
    bands, size = cfg.sensors["sar"], cfg.image_size
    assert stem.shapes["pixels"] == ((1, bands, size, size), (2, bands, size, size), (8, bands, size, size))  # 2 images
    (enc,) = component_profiles(onnx_manifest.component("vision_encoder"), cfg, preset, static_batch=True)
    assert enc.shapes["stem_pixels"][0] == enc.shapes["stem_pixels"][2] == (1, 3, size, size)  # DLA: static
    (emb,) = component_profiles(onnx_manifest.component("embedding"), cfg, preset)
    assert emb.shapes["input_ids"][0] == (1, 1)


def test_unknown_axis_is_an_error():
    comp = Component("odd", "odd.onnx", "fp32", [TensorSpec("x", "float32", ["batch", "frames"])], [], {"odd.onnx": "0"})
    with pytest.raises(ProfileError, match="frames"):
        component_profiles(comp, tiny_config(), get_preset("datacenter"))


# ----------------------------------------------------------------------------------------------- call splitting
def _with_profiles(onnx_manifest, name, preset="datacenter", static=False):
    comp = onnx_manifest.component(name)
    comp = Component.from_dict(name, comp.to_dict())
    comp.extra["profiles"] = [p.to_dict() for p in component_profiles(comp, onnx_manifest.config(), get_preset(preset), static)]
    return comp, read_profiles(comp)


def test_decoder_steps(onnx_manifest):
    comp, profiles = _with_profiles(onnx_manifest, "decoder_expert1", "orin-nano")
    lim = Limits.of(onnx_manifest.config(), get_preset("orin-nano"))
    assert decoder_steps(comp, profiles, 1, 0, 50) == [(0, 50, 0)]  # prefill
    assert decoder_steps(comp, profiles, 1, 50, 1) == [(0, 1, 1)]  # decode
    assert decoder_steps(comp, profiles, 1, 50, 3) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]  # chat turn on a filled cache
    long = decoder_steps(comp, profiles, 1, 0, lim.max_prompt + 2)
    assert long[0] == (0, lim.max_prompt, 0) and [s[1] for s in long[1:]] == [1, 1]
    with pytest.raises(ShapeError, match="cache length"):
        decoder_steps(comp, profiles, 1, lim.max_context, 1)
    with pytest.raises(ShapeError):
        decoder_steps(comp, profiles, 2, 0, 4)  # orin-nano plans run one sequence at a time


def test_batch_chunks(onnx_manifest):
    comp, profiles = _with_profiles(onnx_manifest, "vision_encoder", "orin-agx", static=True)
    assert batch_chunks(comp, profiles, 3, {}) == [(0, 1, 0), (1, 2, 0), (2, 3, 0)]
    comp, profiles = _with_profiles(onnx_manifest, "vision_stem_rgb", "orin-nano")
    assert batch_chunks(comp, profiles, 5, {}) == [(0, 2, 0), (2, 4, 0), (4, 5, 0)]  # max 1 request x 2 images


# ----------------------------------------------------------------------------------------------- precision rules
def _comp(name="vision_encoder", precision="fp32"):
    return Component(name, f"{name}.onnx", precision, [], [], {f"{name}.onnx": "0"})


def test_precision_rules_by_version(tmp_path):
    dc, agx = get_preset("datacenter"), get_preset("orin-agx")
    s = plan_settings(_comp(), "fp16", "10.3.0", dc)
    assert (s.strongly_typed, s.flags, s.precision) == (False, ("FP16",), "fp16")
    s = plan_settings(_comp(precision="fp16"), "fp16", "11.0.0", dc)
    assert (s.strongly_typed, s.flags, s.precision) == (True, (), "fp16")  # TRT 11: the graph's types run
    with pytest.raises(BuildSettingsError, match="--precision fp16"):
        check_graph_precision([_comp(precision="fp32")], "fp16", "11.0.0", True)
    check_graph_precision([_comp(precision="fp16"), _comp("router", "fp32")], "fp16", "11.0.0", True)
    s = plan_settings(_comp(), "fp16", "8.6.1", agx)
    assert (s.dla_core, s.flags) == (0, ("FP16", "GPU_FALLBACK"))
    assert plan_settings(_comp(), "fp32", "8.6.1", agx).dla_core is None
    assert plan_settings(_comp("router"), "fp16", "10.3.0", dc).flags == ()  # kept FP32, as the FP16 exporter does
    with pytest.raises(BuildSettingsError, match="no strongly typed"):
        plan_settings(_comp(), "fp16", "8.5.2", dc, strongly_typed=True)
    # INT8: Q/DQ graph, calibration cache, neither
    assert plan_settings(_comp(precision="int8"), "int8", "10.3.0", dc).flags == ("INT8", "FP16")
    cache = trt_calib.write_cache(tmp_path / "c.cache", trt_calib.CalibrationCache("TRT-100300-EntropyCalibration2"))
    s = plan_settings(_comp(), "int8", "10.3.0", dc, calib_cache=cache)
    assert (s.precision, s.calibration_cache) == ("int8", cache)
    with pytest.raises(BuildSettingsError, match="calibration cache"):
        check_int8_inputs([_comp()], "int8", None, False)
    with pytest.raises(BuildSettingsError, match="no INT8 calibrator"):
        plan_settings(_comp(precision="int8"), "int8", "11.0.0", dc, calib_cache=cache)
    with pytest.raises(BuildSettingsError):
        plan_settings(_comp(), "bf16", "10.3.0", dc)


# ----------------------------------------------------------------------------------------------- calibration cache
def test_calibration_cache_round_trip(tmp_path):
    assert trt_calib.encode_scale(1.0) == "3f800000"
    assert trt_calib.decode_scale("3c010204") == pytest.approx(1 / 127)  # amax 1.0 over 127 steps
    assert trt_calib.header_for("8.6.1") == "TRT-8601-EntropyCalibration2"
    assert trt_calib.header_for("8.5.2.2") == "TRT-8502-EntropyCalibration2"
    assert trt_calib.header_for("10.3.0") == "TRT-100300-EntropyCalibration2"
    cache = trt_calib.CalibrationCache(trt_calib.header_for("10.3.0"),
                                       {"input_ids": 0.5, "/decoder/layers.0/attn/Add:0": 1 / 127})
    path = trt_calib.write_cache(tmp_path / "model.cache", cache)
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2" and "input_ids: 3f000000" in text
    back = trt_calib.read_cache(path)
    assert back.algorithm == "EntropyCalibration2" and back.version_tag == "100300"
    assert back.scales["/decoder/layers.0/attn/Add:0"] == pytest.approx(1 / 127)  # names may contain ':'
    for bad, match in (("", "first line"), ("nonsense\n", "first line"), ("TRT-8601-EntropyCalibration2\nx: 12\n", "line 2"),
                       ("TRT-8601-EntropyCalibration2\nnoscale\n", "line 2"), ("TRT-8601-EntropyCalibration2\nx: zzzzzzzz\n", "hex")):
        with pytest.raises(trt_calib.CalibrationCacheError, match=match):
            trt_calib.parse_cache(bad)
    folder = tmp_path / "caches"
    folder.mkdir()
    trt_calib.write_cache(folder / "vision_encoder.cache", cache)
    assert trt_calib.cache_for_component(folder, "vision_encoder") == folder / "vision_encoder.cache"
    assert trt_calib.cache_for_component(folder, "router") is None
    assert trt_calib.cache_for_component(path, "router") == path
    with pytest.raises(trt_calib.CalibrationCacheError, match="not found"):
        trt_calib.cache_for_component(tmp_path / "missing.cache", "router")


# ----------------------------------------------------------------------------------------------- TensorRT absent
def test_clear_error_without_tensorrt(monkeypatch, onnx_dir, tmp_path):
    from rsvlm_edge.engines.trt_build import build_trt_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(TrtUnavailableError, match="pip install"):
        load_tensorrt()
    with pytest.raises(TrtUnavailableError, match="not installed"):
        build_trt_engines(onnx_dir, tmp_path / "plans")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs alone gives
    with pytest.raises(BackendError, match="only type stubs"):
        load_tensorrt()


def test_trt_backend_refuses_onnx_dirs(onnx_dir):
    from rsvlm_edge.pipeline import load_backend

    with pytest.raises(BackendError, match="not TensorRT plans"):
        load_backend(onnx_dir, "trt")


# ----------------------------------------------------------------------------------------------- fake TensorRT: build + run
@pytest.fixture
def plans(fake_env, onnx_dir, tmp_path):
    from rsvlm_edge.engines.trt_build import build_trt_engines

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"seed")
    out = build_trt_engines(onnx_dir, tmp_path / "plans", preset="orin-nx", precision="fp16", timing_cache=cache,
                            log=lambda msg: None)
    assert cache.read_bytes() == b"seed+"  # loaded, shared and saved
    return out


def test_build_writes_a_tensorrt_manifest(plans, onnx_manifest):
    m = Manifest.load(plans)  # every plan's sha256 verifies
    assert m.engine["kind"] == "tensorrt" and m.engine["trt_version"] == "10.3.0" and m.engine["compute_capability"] == "9.0"
    assert set(m.components) == set(onnx_manifest.components)
    dec = m.component("decoder_expert2")
    assert dec.file == "decoder_expert2.plan" and dec.precision == "fp16" and dec.external_data == []
    assert [p["name"] for p in dec.extra["profiles"]] == ["prefill", "decode"]
    assert [t.name for t in dec.inputs] == [t.name for t in onnx_manifest.component("decoder_expert2").inputs]
    assert m.experts.components == onnx_manifest.experts.components and m.experts.trunk is None
    assert (plans / "tokenizer.json").is_file()
    builds = {b["onnx"].rsplit("/", 1)[-1]: b for b in fake_trt.BUILDS}
    assert builds["decoder_expert0.onnx"]["flags"] == ["FP16"] and builds["decoder_expert0.onnx"]["workspace"] == 2 << 30
    assert builds["router.onnx"]["flags"] == [] and m.component("router").precision == "fp32"
    assert builds["decoder_expert0.onnx"]["network_flags"] == 0  # TRT 10: explicit batch implied, weakly typed
    assert all(b["timing_cache"] for b in fake_trt.BUILDS)
    # orin-nx asks for the DLA, which this "GPU" lacks: the vision encoder falls back to the GPU with dynamic batch
    assert builds["vision_encoder.onnx"]["dla_core"] is None and "GPU_FALLBACK" not in builds["vision_encoder.onnx"]["flags"]


def test_build_on_tensorrt_11_needs_fp16_graphs(fake_env, onnx_dir, tmp_path):
    from rsvlm_edge.engines.trt_build import build_trt_engines

    sys.modules["tensorrt"].__version__ = "11.0.0"
    with pytest.raises(BuildSettingsError, match="--precision fp16"):
        build_trt_engines(onnx_dir, tmp_path / "plans", precision="fp16", log=lambda msg: None)
    with pytest.raises(Exception, match="10.3 was asked for"):
        build_trt_engines(onnx_dir, tmp_path / "plans", trt_version="10.3", log=lambda msg: None)


def test_mismatched_plans_are_refused(plans, monkeypatch):
    from rsvlm_edge.backends.trt_backend import TrtBackend

    m = Manifest.load(plans, verify=False)
    with pytest.raises(EngineCompatError, match="built with TensorRT 10.3.0"):
        check_engine_compat(m, "10.4.0", "9.0")
    with pytest.raises(EngineCompatError, match="compute capability 9.0"):
        check_engine_compat(m, "10.3.0.26", "8.7")
    sys.modules["tensorrt"].__version__ = "8.6.1"
    with pytest.raises(BackendError, match="TensorRT 8.6.1"):
        TrtBackend.from_dir(plans)
    sys.modules["tensorrt"].__version__ = "10.3.0"
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_trt.make_cudart(8, 7))  # a Jetson Orin
    with pytest.raises(BackendError, match="built for GPU compute capability 9.0"):
        TrtBackend.from_dir(plans)


def test_trt_backend_matches_ort(plans, onnx_dir):
    """Same tokens as ONNX Runtime on the same graphs: binding, in-place KV writes and call splitting are right."""
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.trt_backend import TrtBackend
    from rsvlm_edge.generation import Generator, Request
    from rsvlm_edge.sampling import SamplingConfig
    from rsvlm_edge.tokenizer import Tokenizer

    tok = Tokenizer.load(onnx_dir / "tokenizer.json")
    trt_backend = TrtBackend.from_dir(plans, expert_budget_experts=1)
    ort_backend = OrtBackend.from_dir(onnx_dir)
    rng = np.random.default_rng(0)
    requests = [Request([rng.normal(size=(3, 128, 128)).astype(np.float32)], "rgb", "[CAP] Describe the image."),
                Request([rng.normal(size=(2, 128, 128)).astype(np.float32)], "sar", "What is in the image?")]
    sampling = SamplingConfig(max_new_tokens=6)
    for request in requests:
        want = Generator(ort_backend, tok).generate([request], sampling)[0]
        got = Generator(trt_backend, tok).generate([request], sampling)[0]
        assert got.token_ids == want.token_ids
    # a chat-style append (past > 0, seq > 1) runs token by token and still matches a single ORT call
    ids = tok.encode("[VQA] Is there a ship?")[:5]
    emb = trt_backend.embed(np.array([ids], np.int32))
    caches = [b.new_cache(1, 16, 0) for b in (trt_backend, ort_backend)]
    outs = []
    for backend, cache in zip((trt_backend, ort_backend), caches):
        backend.forward(cache, emb[:, :2], np.arange(2, dtype=np.int32)[None], np.ones((1, 2), np.float32))
        outs.append(backend.forward(cache, emb[:, 2:], np.arange(2, 5, dtype=np.int32)[None], np.ones((1, 5), np.float32)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert trt_backend.stats()["trt_version"] == "10.3.0" and trt_backend.expert_cache.resident() == [0]
    trt_backend.close()
    ort_backend.close()


def test_unaligned_kv_rows_go_through_scratch(plans, onnx_dir, monkeypatch):
    """Rows of new K/V that start off TensorRT's alignment are written aside and copied in place on the device."""
    from rsvlm_edge.backends import trt_backend as module
    from rsvlm_edge.backends.ort_backend import OrtBackend

    monkeypatch.setattr(module, "ALIGNMENT", 1 << 20)  # every non-zero offset is now "unaligned"
    trt_backend, ort_backend = module.TrtBackend.from_dir(plans), OrtBackend.from_dir(onnx_dir)
    emb = trt_backend.embed(np.array([[5, 6, 7, 8, 9]], np.int32))
    outs = []
    for backend in (trt_backend, ort_backend):
        cache = backend.new_cache(1, 8, 1)
        backend.forward(cache, emb[:, :3], np.arange(3, dtype=np.int32)[None], np.ones((1, 3), np.float32))
        backend.forward(cache, emb[:, 3:4], np.array([[3]], np.int32), np.ones((1, 4), np.float32))  # K/V via scratch
        outs.append(backend.forward(cache, emb[:, 4:], np.array([[4]], np.int32), np.ones((1, 5), np.float32)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert trt_backend._scratch  # the scratch path ran
    trt_backend.close()
    ort_backend.close()


def test_cli_infer_with_trt_backend(plans, sample_png):
    """What scripts/gpu_check.sh runs on a GPU: `rsvlm-edge infer --backend trt` (here on the fake TensorRT)."""
    import json

    from click.testing import CliRunner

    from rsvlm_edge.cli import main

    result = CliRunner().invoke(main, ["infer", str(plans), str(sample_png), "--task", "cap", "--backend", "trt", "--json",
                                       "--expert-budget", "1", "--threads", "1", "--max-new-tokens", "4"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])
    assert answer["task"] == "[CAP]" and answer["expert"] == "image"


def test_dla_vision_encoder_runs_in_static_batches(fake_env, onnx_dir, tmp_path, monkeypatch):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.trt_backend import TrtBackend
    from rsvlm_edge.engines.trt_build import build_trt_engines

    monkeypatch.setattr(fake_trt.Builder, "num_DLA_cores", 2)  # an AGX Orin
    out = build_trt_engines(onnx_dir, tmp_path / "agx", preset="orin-agx", precision="fp16",
                            components=["vision_stem_rgb", "vision_encoder"], log=lambda msg: None)
    enc = next(b for b in fake_trt.BUILDS if b["onnx"].endswith("vision_encoder.onnx"))
    assert enc["dla_core"] == 0 and enc["flags"] == ["FP16", "GPU_FALLBACK"]
    assert Manifest.load(out).component("vision_encoder").extra["dla_core"] == 0
    pixels = np.random.default_rng(3).normal(size=(3, 3, 128, 128)).astype(np.float32)
    backend = TrtBackend.from_dir(out)
    got = backend.encode_images(pixels, "rgb")  # three images through a batch-1 plan
    want = OrtBackend.from_dir(onnx_dir).encode_images(pixels, "rgb")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert backend._engines["vision_encoder"].contexts[0].runs == 3
