"""FP16 export: FP32 kept for norms/softmax/rotary/logits, FP32 IO, small diffs and greedy agreement vs FP32."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.backends.torch_backend import TorchBackend
from rsvlm_edge.export.compare import compare_backends, format_comparison
from rsvlm_edge.export.fp16 import NORM_SCOPE
from rsvlm_edge.export.graph import scope_matches
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.export.trt_check import check_trt
from rsvlm_edge.manifest import Manifest
from rsvlm_edge.modeling import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt16"))


@pytest.fixture(scope="module")
def engine16(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("engines16") / "tiny-fp16", precision="fp16")


def typed(path):
    model = onnx.load(str(path), load_external_data=False)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def elem_types(model):
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def test_fp16_graph_precision_regions(engine16):
    manifest = Manifest.load(engine16)
    for name in ("vision_encoder", "decoder_expert0"):
        comp = manifest.component(name)
        assert comp.precision == "fp16"
        model = typed(engine16 / comp.file)
        types = elem_types(model)
        for vi in list(model.graph.input) + list(model.graph.output):  # IO stays fp32 / int32
            assert vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT32), vi.name
        half = [n for n in model.graph.node if n.op_type == "MatMul" and types[n.output[0]] == TensorProto.FLOAT16]
        assert len(half) > 10  # the bulk of the math is fp16
        for node in model.graph.node:
            out_type = types.get(node.output[0])
            if node.op_type == "Softmax":
                assert out_type == TensorProto.FLOAT, node.name
            if scope_matches(node, NORM_SCOPE) and node.op_type in ("Pow", "ReduceMean", "Sqrt", "Div", "Sub"):
                assert out_type == TensorProto.FLOAT, node.name  # norm internals in fp32
            if node.op_type in ("Cos", "Sin"):
                assert out_type == TensorProto.FLOAT, node.name
            if "lm_head" in node.name and node.op_type == "MatMul":
                assert out_type == TensorProto.FLOAT  # final logits computed in fp32
        assert check_trt(model, comp.file).ok
    assert manifest.component("router").precision == "fp32"
    # fp16 weights halve the expert files; lm_head stays fp32 in the trunk
    experts = manifest.experts
    assert experts.trunk is not None and experts.expert_tensors is not None
    assert all(t.dtype == "float16" for t in experts.expert_tensors.values())
    assert experts.trunk.tensors["lm_head.weight.T"].dtype == "float32"


def test_fp16_vs_fp32_report(checkpoint, engine16):
    report = compare_backends(TorchBackend(load_model(checkpoint)), OrtBackend.from_dir(engine16), prompts=3, steps=6)
    print(format_comparison(report))
    d = report["max_abs_diff"]
    assert d["logits"] < 0.05 and d["visual_tokens"] < 0.05 and d["embedding"] < 1e-3
    assert report["greedy"]["teacher_forced_agreement"] >= 0.8
