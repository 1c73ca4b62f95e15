"""The static-shape pass: constant Reshape/Slice shapes, dead shape chains pruned, numerics unchanged."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rsvlm_edge.config import preset
from rsvlm_edge.export import exporter, static_shapes
from rsvlm_edge.export.components import component_specs
from rsvlm_edge.export.graph import Graph
from rsvlm_edge.modeling import build_model


@pytest.mark.parametrize("in_shape,out_shape,expected", [
    (["batch", "seq", 256], ["batch", "seq", 4, 64], [0, 0, 4, 64]),
    (["batch", 4, "seq", 64], ["batch", 2, "2*seq", 64], [0, 2, -1, 64]),
    (["batch", 2, "2*seq", "total"], ["batch", 4, "seq", "total"], [0, 4, -1, 0]),
    (["batch", "seq", 4, 64], ["batch", "seq", 256], [0, 0, 256]),
    (["a", "b"], ["b", "a"], None),  # two dims that are neither constant nor copied: stays dynamic
])
def test_reshape_target(in_shape, out_shape, expected):
    assert static_shapes.reshape_target(in_shape, out_shape) == expected


def _decoder_graph(monkeypatch, enabled: bool) -> Graph:
    if not enabled:
        monkeypatch.setattr(exporter, "static_shapes", lambda g: 0)
    model = build_model(preset("tiny"))
    spec = next(s for s in component_specs(model) if s.name == "decoder_expert0")
    return exporter.build_graph(spec, model, 17)


def test_decoder_loses_its_shape_chains(monkeypatch):
    dynamic = _decoder_graph(monkeypatch, enabled=False)
    monkeypatch.undo()
    static = _decoder_graph(monkeypatch, enabled=True)
    before = collections.Counter(n.op_type for n in dynamic.graph.node)
    after = collections.Counter(n.op_type for n in static.graph.node)
    assert sum(after.values()) < 0.75 * sum(before.values())
    assert after["Shape"] < before["Shape"] and after["Concat"] < before["Concat"]
    assert after["MatMul"] == before["MatMul"]  # only shape arithmetic went
    inits = {t.name for t in static.graph.initializer}
    reshapes = [n for n in static.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(n.input[1] in inits for n in reshapes)  # every reshape now has a constant shape
    assert set(static.weights) == set(dynamic.weights)


def test_inference_failure_leaves_the_graph(monkeypatch):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    g = Graph(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
    before = g.model.SerializeToString()

    def boom(probe):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(static_shapes, "_infer", boom)
    assert static_shapes.static_shapes(g) == 0
    assert g.model.SerializeToString() == before


def test_rewritten_graph_runs_like_the_original():
    """A view(b, s, h, d) chain: same output from the static graph, at two batch sizes."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["b"]), helper.make_node("Gather", ["shape", "i1"], ["s"]),
        helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]), helper.make_node("Unsqueeze", ["s", "ax"], ["su"]),
        helper.make_node("Concat", ["bu", "su", "hd"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(np.int64(0), "i0"), onnx.numpy_helper.from_array(np.int64(1), "i1"),
             onnx.numpy_helper.from_array(np.array([0], np.int64), "ax"),
             onnx.numpy_helper.from_array(np.array([2, 4], np.int64), "hd")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    g = Graph(model)
    assert static_shapes.static_shapes(g) == 1
    assert [n.op_type for n in g.graph.node] == ["Reshape"]
    sess = ort.InferenceSession(g.model.SerializeToString())
    for batch in (1, 3):
        data = np.arange(batch * 5 * 8, dtype=np.float32).reshape(batch, 5, 8)
        np.testing.assert_array_equal(sess.run(None, {"x": data})[0], data.reshape(batch, 5, 2, 4))
