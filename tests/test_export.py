"""ONNX export of a random-init tiny model: parity with PyTorch, graph validity, TensorRT rules, decoder layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from rsvlm_edge.export.checks import check_graph_file, parity_decoder, parity_simple
from rsvlm_edge.export.components import component_specs
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.export.trt_check import check_trt, op_lists
from rsvlm_edge.manifest import Manifest, ManifestError, dumps
from rsvlm_edge.modeling import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture(scope="module")
def manifest(engine):
    return Manifest.load(engine)


def test_directory_layout(engine, manifest, model):
    cfg = model.cfg
    expected = {f"vision_stem_{s}" for s in cfg.sensors} | {"vision_encoder", "embedding", "router"} | {
        f"decoder_expert{e}" for e in range(cfg.num_experts)}
    assert set(manifest.components) == expected
    for name in ("manifest.json", "config.json", "tokenizer.json", "decoder_trunk.bin"):
        assert (engine / name).is_file()
    assert manifest.tokenizer["file"] == "tokenizer.json"
    assert manifest.config() == cfg
    assert not list(engine.parent.glob(".*partial*"))  # the staging directory is gone
    dec = manifest.component("decoder_expert1")
    assert dec.external_data == ["decoder_trunk.bin", "decoder_expert1.bin"]
    assert [t.name for t in dec.inputs[:3]] == ["inputs_embeds", "position_ids", "attention_mask"]
    assert dec.input("past_key_0").shape == ["past_seq", "batch", cfg.num_kv_heads, cfg.head_dim]
    assert dec.input("position_ids").dtype == "int32"
    assert [t.name for t in dec.outputs[:3]] == ["logits", "new_key_0", "new_value_0"]
    assert dec.outputs[0].shape == ["batch", cfg.vocab_size]
    assert dec.outputs[1].shape == ["seq", "batch", cfg.num_kv_heads, cfg.head_dim]
    assert manifest.component("embedding").inputs[0].dtype == "int32"
    assert manifest.component("vision_encoder").outputs[0].shape == ["batch", cfg.num_visual_tokens, cfg.hidden_size]


@pytest.mark.parametrize("name", ["vision_stem_rgb", "vision_stem_sar", "vision_stem_ms", "vision_encoder", "embedding", "router"])
def test_component_parity(engine, model, manifest, name):
    spec = next(s for s in component_specs(model) if s.name == name)
    res = parity_simple(engine / manifest.component(name).file, spec.module, spec.sample, [t["name"] for t in spec.inputs])
    assert res["max_abs_diff"] <= TOL, res


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_decoder_prefill_and_decode_steps_match(engine, model, expert):
    res = parity_decoder(engine / f"decoder_expert{expert}.onnx", model, expert, steps=3)
    assert res["logits"] <= TOL and res["kv"] <= TOL, res


def test_decoder_zero_length_past_and_batch_sizes(engine, model):
    import onnxruntime as ort

    cfg = model.cfg
    sess = ort.InferenceSession(str(engine / "decoder_expert2.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 1), (3, 7)]:
        feeds = {"inputs_embeds": np.random.default_rng(0).normal(size=(batch, seq, cfg.hidden_size)).astype(np.float32),
                 "position_ids": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                 "attention_mask": np.ones((batch, seq), np.float32)}
        for i in range(cfg.num_layers):
            for kv in ("key", "value"):
                feeds[f"past_{kv}_{i}"] = np.zeros((0, batch, cfg.num_kv_heads, cfg.head_dim), np.float32)
        out = sess.run(None, feeds)
        with torch.inference_mode():
            ref, _ = model.decode(torch.from_numpy(feeds["inputs_embeds"]), torch.from_numpy(feeds["position_ids"]).long(),
                                  torch.from_numpy(feeds["attention_mask"]), model.empty_cache(batch), 2)
        assert out[0].shape == (batch, cfg.vocab_size) and out[1].shape == (seq, batch, cfg.num_kv_heads, cfg.head_dim)
        assert np.abs(out[0] - ref[:, -1].numpy()).max() <= TOL


def test_graphs_are_valid_and_trt_friendly(engine, manifest):
    for comp in manifest.components.values():
        report = check_graph_file(engine / comp.file)  # checker, strict shape inference, opset, TRT ops + INT64
        assert report["opset"] >= 17
        model = onnx.load(str(engine / comp.file), load_external_data=False)
        trt = check_trt(model, comp.file)
        assert trt.ok, trt.format()
        assert set(trt.versions) == {"8.5", "10.3", "11"}
        for vi in list(model.graph.input) + list(model.graph.output):
            assert vi.type.tensor_type.elem_type != onnx.TensorProto.INT64, (comp.file, vi.name)
        assert "LayerNormalization" not in trt.ops  # decomposed (TensorRT 8.5 lacks it)


def test_no_runtime_transform_of_weights(engine, manifest):
    """Weights are consumed as stored: no Transpose/Cast of an initializer that a runtime would fold into a copy."""
    for comp in manifest.components.values():
        model = onnx.load(str(engine / comp.file), load_external_data=False)
        external = {i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        for node in model.graph.node:
            if node.op_type in ("Transpose", "Cast", "Reshape"):
                assert node.input[0] not in external, (comp.file, node.name)


def test_trunk_shared_at_identical_offsets_and_experts_differ(engine, manifest):
    def external(path):
        model = onnx.load(str(path), load_external_data=False)
        return model, {i.name: {e.key: e.value for e in i.external_data} for i in model.graph.initializer
                       if i.data_location == onnx.TensorProto.EXTERNAL}

    graphs = [external(engine / f"decoder_expert{e}.onnx") for e in range(3)]
    (m0, ext0) = graphs[0]
    trunk = {n for n, x in ext0.items() if x["location"] == "decoder_trunk.bin"}
    expert = {n for n, x in ext0.items() if x["location"] == "decoder_expert0.bin"}
    assert trunk and expert and trunk | expert == set(ext0)
    assert any(n.startswith("lm_head") for n in trunk) and any("self_attn" in n for n in trunk)
    assert all(".mlp." in n for n in expert)
    for e, (m, ext) in enumerate(graphs):
        assert set(ext) == set(ext0)
        for n in trunk:
            assert ext[n] == ext0[n]  # same file, offset and length in every expert graph
        for n in expert:
            assert ext[n] == {**ext0[n], "location": f"decoder_expert{e}.bin"}
        # identical structure: equal once the expert file name is normalised
        for init in m.graph.initializer:
            for entry in init.external_data:
                if entry.value == f"decoder_expert{e}.bin":
                    entry.value = "decoder_expert0.bin"
        m.graph.name = m0.graph.name
        assert m.graph.SerializeToString() == m0.graph.SerializeToString()
    layout = manifest.experts
    assert layout.trunk is not None and layout.expert_tensors is not None
    assert layout.trunk.file == "decoder_trunk.bin"
    assert set(layout.trunk.tensors) == trunk and set(layout.expert_tensors) == expert
    assert {n: ext0[n]["offset"] for n in trunk} == {n: str(t.offset) for n, t in layout.trunk.tensors.items()}
    t = layout.expert_tensors["layers.0.mlp.gate_proj.weight.T"]
    assert t.source == "layers.0.experts.{e}.gate_proj.weight" and t.transform == "transpose[1, 0]"
    blobs = [(engine / f"decoder_expert{e}.bin").read_bytes() for e in range(3)]
    assert len({len(b) for b in blobs}) == 1 and len(set(blobs)) == 3
    shas = [manifest.component(f"decoder_expert{e}").sha256[f"decoder_expert{e}.bin"] for e in range(3)]
    assert len(set(shas)) == 3


def test_the_expert_layout_reads_back_to_the_bytes_the_exporter_wrote(engine, manifest):
    """ExpertLayout is what the exporter writes and what runtimes read: loading and re-serialising the section
    gives the same JSON, key order included."""
    written = json.loads((engine / "manifest.json").read_text())
    assert dumps(Manifest.load(engine, verify=False).to_dict()["experts"]) == dumps(written["experts"])
    assert Manifest.load(engine, verify=False).to_dict() == written


def test_expert_bytes_come_from_the_right_expert(engine, model, manifest):
    layout = manifest.experts.expert_tensors["layers.1.mlp.down_proj.weight.T"]
    for e in range(3):
        blob = np.fromfile(engine / f"decoder_expert{e}.bin", dtype=np.uint8)
        stored = np.ndarray(layout.shape, dtype=layout.dtype, buffer=blob, offset=layout.offset)
        np.testing.assert_array_equal(stored, model.layers[1].experts[e].down_proj.weight.detach().numpy().T)


def test_verification_catches_tampering(engine, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(engine, copy)
    Manifest.load(copy)
    path = copy / "decoder_expert1.bin"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="decoder_expert1.bin fails its sha256 check"):
        Manifest.load(copy)
    (copy / "vision_encoder.bin").unlink()
    with pytest.raises(ManifestError, match="vision_encoder.bin is missing"):
        Manifest.load(copy, verify="size")


def test_manifest_json_is_readable(engine):
    data = json.loads((engine / "manifest.json").read_text())
    comp = data["components"]["router"]
    assert comp["precision"] == "fp32" and comp["kind"] == "router" and comp["opset"] == 17
    assert set(comp["bytes"]) == set(comp["sha256"]) == {"router.onnx", "router.bin"}
    assert data["export"]["opset"] == 17 and data["export"]["precision"] == "fp32"


def test_trt_op_lists_have_sources():
    lists = op_lists()["versions"]
    assert set(lists) == {"8.5", "10.3", "11"}
    for v in lists.values():
        assert v["source"]["url"].startswith("https://") and v["supported"]
    assert "LayerNormalization" not in lists["8.5"]["supported"] and "LayerNormalization" in lists["10.3"]["supported"]
    assert not lists["8.5"]["native_int64"] and lists["11"]["native_int64"]


def test_trt_checker_flags_problems():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g"], ["ln"], axis=-1),
        helper.make_node("Cast", ["ln"], ["as_int"], to=TensorProto.INT64),  # data cast to INT64 ...
        helper.make_node("ReduceSum", ["as_int"], ["summed"], keepdims=1),  # ... feeding a non-index op
        helper.make_node("Cast", ["summed"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ln", "back"], ["y"]),
        helper.make_node("Gather", ["x", "ids"], ["unused"]),  # INT64 indices are fine
    ]
    graph = helper.make_graph(nodes, "g", [x, ids], [y], [helper.make_tensor("g", TensorProto.FLOAT, [4], [1.0] * 4)])
    report = check_trt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "bad")
    assert report.io_int64 == ["ids (input)"] and not report.ok
    v85, v103 = report.versions["8.5"], report.versions["10.3"]
    assert v85.unsupported_ops == ["LayerNormalization"] and v103.unsupported_ops == []
    assert len(v85.int64) == 1 and "data cast to INT64 'as_int' feeds ReduceSum" in v85.int64[0]
    assert v103.int64 == []
    assert "unsupported ops: LayerNormalization" in report.format()


@pytest.fixture(scope="module")
def rgb_only_engine(tmp_path_factory):
    """A model as RSUniVLM is built (no stems, no feature norm, no router, tied lm_head), exported with checks on."""
    from rsvlm_edge.config import ModelConfig

    cfg = ModelConfig(sensors={"rgb": 3}, vision_stems=False, vision_feature_norm=False, router=False,
                      cnn_branch=False, vision_feature_layers=[-1], tie_word_embeddings=True).validate()
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("rgb-ckpt"), cfg)
    return checkpoint, export_checkpoint(checkpoint, tmp_path_factory.mktemp("engines") / "rgb", check=True)


def test_models_without_stems_or_router_export_neither(rgb_only_engine):
    """No stem or router graphs; the encoder takes the preprocessed RGB as ``pixels``; the export's own checks
    (ONNX Runtime vs PyTorch, TensorRT op rules) passed on every graph; the tied lm_head reads the embedding."""
    from rsvlm_edge.backends.base import BackendError
    from rsvlm_edge.backends.ort_backend import OrtBackend

    checkpoint, engine = rgb_only_engine
    manifest = Manifest.load(engine)
    assert set(manifest.components) == {"vision_encoder", "embedding"} | {f"decoder_expert{e}" for e in range(3)}
    assert [(t.name, t.shape) for t in manifest.component("vision_encoder").inputs] == [
        ("pixels", ["batch", 3, manifest.config().image_size, manifest.config().image_size])]
    checks = manifest.extra["export"]["checks"]
    assert set(checks) == set(manifest.components) and all(c["parity"] for c in checks.values())
    model = load_model(checkpoint)
    backend = OrtBackend.from_dir(engine)
    try:
        pixels = np.random.default_rng(0).normal(size=(2, 3, model.cfg.image_size, model.cfg.image_size))
        with torch.no_grad():
            want = model.encode_images(torch.from_numpy(pixels.astype(np.float32)), "rgb").numpy()
        np.testing.assert_allclose(backend.encode_images(pixels, "rgb"), want, atol=TOL, rtol=0)
        with pytest.raises(BackendError, match="unknown sensor 'sar'; this model takes only rgb"):
            backend.encode_images(pixels[:, :2], "sar")
        with pytest.raises(BackendError, match="no instruction router"):
            backend.route(np.zeros((1, 2, model.cfg.hidden_size), np.float32), np.ones((1, 2), np.float32))
    finally:
        backend.close()


def test_stem_and_router_components_are_refused_where_the_model_has_none(rgb_only_engine, tmp_path):
    from rsvlm_edge.export.exporter import ExportError, select_specs

    checkpoint, engine = rgb_only_engine
    with pytest.raises(ExportError, match="has no router, stems component"):
        select_specs(load_model(checkpoint), ("router", "stems"))
    copy = tmp_path / "copy"
    shutil.copytree(engine, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["components"]["vision_stem_rgb"] = dict(data["components"]["embedding"])
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="lists vision_stem_rgb, but its model_config has vision_stems = false"):
        Manifest.load(copy)
    data["components"].pop("vision_stem_rgb")
    data["model_config"]["vision_stems"] = True
    data["model_config"]["sensors"] = {"rgb": 3}
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="does not take 'stem_pixels'"):
        Manifest.load(copy)


def test_random_init_tokenizer_has_the_templates_control_tokens(tmp_path):
    """A random-init rsunivlm-1b export (benchmarks) gets a tokenizer its qwen_1_5 template can load."""
    from rsvlm_edge.config import preset
    from rsvlm_edge.export.sources import random_init_tokenizer
    from rsvlm_edge.pipeline import load_tokenizer

    cfg = preset("rsunivlm-1b")
    random_init_tokenizer(cfg, 0, tmp_path)
    tokenizer = load_tokenizer(tmp_path, cfg.prompt_template)
    assert tokenizer.end_id == tokenizer.token_id("<|im_end|>") and tokenizer.vocab_size <= cfg.vocab_size
