"""The Q/DQ rewrite's graph shape on a small hand-made graph: which subgraph each node gets, how many of each op, and
that every quantized product reads its operands through DequantizeLinear (so ORT fuses it into an integer kernel)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rsvlm_edge.calibration.qdq import quantize_graph


def external_init(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer declared as external data, as the exported graphs load with ``load_external_data=False``."""
    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


@pytest.fixture(scope="module")
def graph_and_weights():
    """x feeds two MatMuls (one shared Q/DQ); h1 feeds a Gemm; h2 has no range (weight-only DQ); lm_head stays FP32;
    a Conv with bias and a calibrated output (integer QLinearConv); a Gather on an embedding table."""
    rng = np.random.default_rng(0)
    weights = {
        "W1": rng.normal(size=(4, 4)), "W2": rng.normal(size=(4, 4)), "W3": rng.normal(size=(4, 4)),
        "W4": rng.normal(size=(4, 4)), "Wlm": rng.normal(size=(4, 6)), "Wc": rng.normal(size=(3, 2, 3, 3)),
        "bc": rng.normal(size=(3,)), "table": rng.normal(size=(10, 4)),
    }
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("MatMul", ["x", "W2"], ["h2"], name="mm2"),
        helper.make_node("Gemm", ["h1", "W3"], ["h3"], name="gemm", transB=1),
        helper.make_node("MatMul", ["h2", "W4"], ["h4"], name="mm4"),
        helper.make_node("Add", ["h3", "h4"], ["h5"], name="add"),
        helper.make_node("MatMul", ["h5", "Wlm"], ["logits"], name="lm_head"),
        helper.make_node("Conv", ["img", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", f32, [1, 4]), helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("img", f32, [1, 2, 5, 5])],
        [helper.make_tensor_value_info(n, f32, shape)
         for n, shape in (("emb", [3, 4]), ("logits", [1, 6]), ("c", [1, 3, 5, 5]))],
        [external_init(k, v) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    amax = {"x": 3.0, "h1": 6.0, "img": 1.0, "c": 8.0}
    return model, weights, amax


@pytest.fixture(scope="module")
def rewritten(graph_and_weights):
    model, weights, amax = graph_and_weights
    return quantize_graph(model, weights, amax, keep_fp32=lambda node: node.name == "lm_head")


def test_each_subgraph_gets_its_nodes(rewritten):
    ops = collections.Counter(n.op_type for n in rewritten.model.graph.node)
    # Q/DQ for x (shared by mm1 and mm2), h1, img and c; DQ for W1..W4, Wc and the Conv bias
    assert ops == {"QuantizeLinear": 4, "DequantizeLinear": 4 + 5 + 1, "MatMul": 4, "Gemm": 1, "Conv": 1, "Add": 1,
                   "Gather": 2, "Cast": 1, "Mul": 1}
    assert rewritten.weights_quantized == 5 + 1  # five products and the table
    assert rewritten.activations_quantized == 4
    assert rewritten.kept_fp32 == ["lm_head"]
    assert set(rewritten.scheme) == {"weights", "pair_bound", "tables", "activations"}


def test_quantized_products_read_dequantized_operands(rewritten):
    graph = rewritten.model.graph
    producer = {o: n for n in graph.node for o in n.output}
    by_name = {n.name: n for n in graph.node}
    for name, dq_inputs in {"mm1": 2, "mm2": 2, "gemm": 2, "conv": 3, "mm4": 1}.items():
        node = by_name[name]
        from_dq = [i for i in node.input if i in producer and producer[i].op_type == "DequantizeLinear"]
        assert len(from_dq) == dq_inputs, (name, list(node.input))
    assert by_name["mm1"].input[0] == by_name["mm2"].input[0] == "x_dq"  # one Q/DQ per activation
    assert by_name["mm4"].input[0] == "h2"  # no range: the activation stays FP32
    assert by_name["lm_head"].input[1] == "Wlm"  # kept FP32: its weight is the original initializer
    # the Conv output is Q/DQ'd too, under its original name, so consumers are unchanged
    assert by_name["conv"].output[0] == "c_float" and producer["c"].op_type == "DequantizeLinear"
    assert {t.name for t in graph.initializer} >= {"x_act_scale", "x_act_zero_point", "W1_zero_point", "bc_zero_point"}
    for tensor in ("W1_quantized", "W1_scale", "bc_quantized", "table_quantized", "table_scale", "Wlm"):
        assert tensor in rewritten.tensors


def test_rewritten_graph_is_valid_and_close_to_fp32(graph_and_weights, rewritten):
    model, weights, _ = graph_and_weights

    def inline(m: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> bytes:
        m = onnx.ModelProto.FromString(m.SerializeToString())
        inits = [numpy_helper.from_array(np.asarray(arrays[t.name]), t.name) if t.data_location == TensorProto.EXTERNAL
                 else t for t in m.graph.initializer]
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)
        onnx.checker.check_model(m, full_check=True)
        return m.SerializeToString()

    feeds = {"x": np.array([[0.5, -1.0, 2.0, 0.25]], np.float32), "ids": np.array([1, 7, 3], np.int64),
             "img": np.random.default_rng(1).uniform(-1, 1, (1, 2, 5, 5)).astype(np.float32)}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(inline(model, weights), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    q = ort.InferenceSession(inline(rewritten.model, {k: v[0] for k, v in rewritten.tensors.items()}), so,
                             providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(ref, q):
        # INT8 steps are 1/127 of a range; a few of them stacked stay well inside 10% of the output's magnitude
        assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()
