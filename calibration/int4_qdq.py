"""INT4 weight-only Q/DQ rewrite of one ONNX graph, for TensorRT >= 10 (blockwise ``DequantizeLinear``, opset 21).

TensorRT imports INT4 weights only as weight-only quantization through explicit Q/DQ: a constant INT4 weight
(K, N) with one scale per ``block_size`` rows along K (``DequantizeLinear`` with ``axis=0`` and ``block_size``,
ONNX opset 21) feeding a ``MatMul``; zero points must be zero, so the codes are symmetric. Activations stay in
floating point. The codes come from onnxruntime's MatMulNBits quantizer in its QDQ format (the same
round-to-nearest blocks as the ``MatMulNBits`` engines), so both runtimes read one quantizer's output.

Diagram, per weight product::

    w_int4 (K, N) ─┐
    scales (K/B, N)┴─ DequantizeLinear(axis=0, block_size=B) ─▶ w ─┐
    x ─────────────────────────────────────────────────────────────┴─ MatMul ─▶ y

The graph is first converted to opset 21 (``onnx.version_converter``; e.g. ``ReduceMean`` takes its axes as an
input from opset 18), then rewritten. As in :mod:`~rsvlm_edge.calibration.qdq`, the new tensors are returned as
arrays with the initializer they came from, so the writer keeps the trunk / expert file split; an INT4 tensor is
returned as its packed bytes (two codes per byte, (K * N + 1) // 2 of them), which is what its external data holds.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from rsvlm_edge.calibration.qdq import QuantizedGraph
from rsvlm_edge.calibration.weight_only import DEFAULT_BLOCK, weight_matmuls

OPSET = 21  # blockwise DequantizeLinear and the INT4 type
IR_VERSION = 10  # INT4 tensors


def int4_qdq_codes(w: np.ndarray, block_size: int) -> tuple[onnx.TensorProto, np.ndarray]:
    """``w`` (K, N) -> (its INT4 initializer (K, N) holding the packed codes, FP32 scales (K / block, N)) from
    onnxruntime's quantizer (symmetric, round to nearest)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    w = np.asarray(w, dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="w")], "one",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    quantizer = mnq.DefaultWeightOnlyQuantizer(mnq.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=4, quant_format=QuantFormat.QDQ))
    nodes = quantizer.quantize(graph.node[0], [graph])
    dq = nodes[0]
    if dq.op_type != "DequantizeLinear" or len(dq.input) != 2:
        raise ValueError(f"onnxruntime's quantizer returned {[n.op_type for n in nodes]}, not a symmetric "
                         f"DequantizeLinear -> MatMul")
    inits = {i.name: i for i in graph.initializer}
    return inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)


def quantize_int4_qdq(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                      keep_fp32: Callable[[onnx.NodeProto], bool] | None = None,
                      block_size: int = DEFAULT_BLOCK) -> QuantizedGraph:
    """Rewrite a copy of ``model`` (loaded without external data; ``weights`` holds every external initializer):
    each ``MatMul`` with a 2-D weight initializer reads it through an INT4 blockwise ``DequantizeLinear``."""
    model = version_converter.convert_version(model, OPSET)
    model.ir_version = max(model.ir_version, IR_VERSION)
    graph = model.graph
    result = QuantizedGraph(model)
    quantized: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    targets = {n.output[0] for n in weight_matmuls(model, keep_fp32)}  # by output name: it is unique
    for node in graph.node:
        if node.op_type != "MatMul" or node.output[0] not in targets:
            if node.op_type in ("MatMul", "Gemm", "Conv"):
                result.kept_fp32.append(node.name)
            new_nodes.append(node)
            continue
        w = node.input[1]
        if w not in weights:
            raise ValueError(f"{node.name}: weight {w} is stored inline; the INT4 rewrite expects external weights")
        codes, scales = int4_qdq_codes(weights[w], block_size)
        q_name, s_name = f"{w}_int4", f"{w}_int4_scale"
        placeholder = TensorProto(name=q_name, data_type=codes.data_type, dims=list(codes.dims))
        placeholder.data_location = TensorProto.EXTERNAL
        new_inits.append(placeholder)
        result.tensors[q_name] = (np.frombuffer(codes.raw_data, np.uint8).copy(), w)
        scale_init = TensorProto(name=s_name, data_type=TensorProto.FLOAT, dims=list(scales.shape))
        scale_init.data_location = TensorProto.EXTERNAL
        new_inits.append(scale_init)
        result.tensors[s_name] = (scales, w)
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [f"{w}_dq"], name=f"{node.name}/DQ",
                                          axis=0, block_size=block_size))
        new_nodes.append(helper.make_node("MatMul", [node.input[0], f"{w}_dq"], list(node.output), name=node.name))
        quantized.add(w)
        result.weights_quantized += 1
    kept = [i for i in graph.initializer if i.name not in quantized]
    for init in kept:  # every other external weight is written again by the caller, unchanged
        if init.data_location == TensorProto.EXTERNAL and init.name in weights:
            result.tensors[init.name] = (np.asarray(weights[init.name]), init.name)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return result
