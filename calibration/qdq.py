"""Explicit Q/DQ INT8 rewrite of one ONNX graph (weights per-channel, activations per-tensor, both symmetric).

Why explicit Q/DQ: the same graph runs on ONNX Runtime's CPU INT8 kernels (it fuses ``DQ -> MatMul`` into
``MatMulIntegerToFloat``) and on every TensorRT version (TensorRT 11 only reads INT8 scales from Q/DQ nodes).

What is quantized: the weight and the activation input of ``MatMul`` / ``Gemm`` / ``Conv`` nodes whose second input
is a weight initializer. Activation x activation products (attention scores, softmax x V), norms, softmax, rotary
angles and the residual stream stay FP32; so do nodes ``keep_fp32`` names (e.g. the lm_head). An embedding table
(``Gather`` on a 2-D initializer) is stored INT8 per row and dequantized after the gather (only the looked-up rows).

The rewrite does not touch weight bytes on disk: it returns the new tensors as arrays (with the name of the
original initializer they came from) and the caller decides which external-data file each one goes to, so the
decoder's trunk / expert file split survives quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANT_OPS = ("MatMul", "Gemm", "Conv")
QMAX = 127.0
ACT_DTYPES = {"int8": (TensorProto.INT8, np.int8, 0), "uint8": (TensorProto.UINT8, np.uint8, 128)}


@dataclass
class QuantizedGraph:
    """The rewritten graph plus the weight arrays it references (name -> (array, original initializer name))."""

    model: onnx.ModelProto
    tensors: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)
    weights_quantized: int = 0
    activations_quantized: int = 0
    kept_fp32: list[str] = field(default_factory=list)
    fused: dict[str, int] = field(default_factory=dict)  # ORT fusions applied afterwards (pattern -> count)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8 along ``axis``: returns (int8 values, float32 scales of shape (w.shape[axis],))."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
    scale = (np.maximum(amax, 1e-12) / QMAX).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def activation_scale(amax: float) -> float:
    return float(max(amax, 1e-8) / QMAX)


def weight_axis(node: onnx.NodeProto, dims: list[int]) -> int | None:
    """The output-channel axis of a node's weight, or None when the weight is not a plain 2-D/4-D matrix."""
    if node.op_type == "Conv":
        return 0 if len(dims) >= 3 else None
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: (K, N), weights are stored pre-transposed by the export


def quantizable_nodes(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] | None = None
                      ) -> list[tuple[onnx.NodeProto, str, str, int]]:
    """(node, activation input, weight initializer, channel axis) for every node the rewrite will quantize."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2:
            continue
        act, weight = node.input[0], node.input[1]
        if weight not in inits or act in inits:
            continue
        axis = weight_axis(node, inits[weight])
        if axis is None or (keep_fp32 is not None and keep_fp32(node)):
            continue
        out.append((node, act, weight, axis))
    return out


def activation_tensors(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] | None = None) -> list[str]:
    """The tensors calibration must measure: activation inputs of the quantized nodes, and Conv outputs (a fully
    Q/DQ-wrapped Conv becomes one integer ``QLinearConv`` in ONNX Runtime); graph order, unique."""
    names = []
    for node, act, _, _ in quantizable_nodes(model, keep_fp32):
        names.append(act)
        if node.op_type == "Conv":
            names.append(node.output[0])
    return list(dict.fromkeys(names))


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def quantize_graph(model: onnx.ModelProto, weights: dict[str, np.ndarray], amax: dict[str, float],
                   keep_fp32: Callable[[onnx.NodeProto], bool] | None = None, act_dtype: str = "int8",
                   quantize_gather: bool = True) -> QuantizedGraph:
    """Rewrite a copy of ``model`` (loaded without external data); ``weights`` holds every external initializer.

    Activations without a calibrated ``amax`` are left FP32 (their node then runs with a dequantized weight).
    Every external initializer of the result is listed in ``QuantizedGraph.tensors``; inline ones stay inline.
    """
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"activation dtype must be one of {', '.join(ACT_DTYPES)}, got {act_dtype!r}")
    onnx_act, np_act, zero = ACT_DTYPES[act_dtype]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    result = QuantizedGraph(model)
    targets = quantizable_nodes(model, keep_fp32)
    quantized_weights = {w for _, _, w, _ in targets}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    act_dq: dict[str, str] = {}
    quantized_biases: set[str] = set()

    external = external_adder(result, new_inits)

    # ---- weights: W -> DequantizeLinear(W_quantized, W_scale, W_zero_point, axis) named W, consumers unchanged
    axes = {w: axis for _, _, w, axis in targets}
    for w, axis in axes.items():
        q, scale = quantize_weight(weights[w], axis)
        external(f"{w}_quantized", q, w)
        external(f"{w}_scale", scale, w)
        new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{w}_zero_point"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"], [w],
                                          name=f"{w}/DequantizeLinear", axis=axis))
        result.weights_quantized += 1

    # ---- embedding tables: Gather(int8 rows) * Gather(row scales)
    gathers = embedding_gathers(graph, weights) if quantize_gather else []
    gathered_tables = quantize_tables(gathers, weights, external, result)

    for node in graph.node:
        if node in gathers:
            new_nodes += dequantized_gather(node)
            continue
        if any(node is t[0] for t in targets):
            act = node.input[0]
            if act in amax:
                if act not in act_dq:
                    s = activation_scale(amax[act])
                    new_inits += [_scalar(f"{act}_act_scale", s, np.float32), _scalar(f"{act}_act_zero_point", zero, np_act)]
                    new_nodes += [
                        helper.make_node("QuantizeLinear", [act, f"{act}_act_scale", f"{act}_act_zero_point"],
                                         [f"{act}_q"], name=f"{act}/QuantizeLinear"),
                        helper.make_node("DequantizeLinear", [f"{act}_q", f"{act}_act_scale", f"{act}_act_zero_point"],
                                         [f"{act}_dq"], name=f"{act}/DequantizeLinear"),
                    ]
                    act_dq[act] = f"{act}_dq"
                    result.activations_quantized += 1
                node.input[0] = act_dq[act]
                out = node.output[0]
                if node.op_type == "Conv" and out in amax:
                    if len(node.input) > 2 and node.input[2] in weights:
                        bias = node.input[2]
                        s_b = (activation_scale(amax[act]) * quantize_weight(weights[node.input[1]], 0)[1]).astype(np.float32)
                        b_q = np.clip(np.rint(np.asarray(weights[bias], np.float32) / s_b), -2**31, 2**31 - 1).astype(np.int32)
                        external(f"{bias}_quantized", b_q, bias)
                        external(f"{bias}_scale", s_b, bias)
                        new_inits.append(numpy_helper.from_array(np.zeros(s_b.shape, np.int32), f"{bias}_zero_point"))
                        new_nodes.append(helper.make_node("DequantizeLinear", [f"{bias}_quantized", f"{bias}_scale",
                                                          f"{bias}_zero_point"], [bias], name=f"{bias}/DequantizeLinear", axis=0))
                        quantized_biases.add(bias)
                    s = activation_scale(amax[out])
                    node.output[0] = f"{out}_float"
                    new_inits += [_scalar(f"{out}_act_scale", s, np.float32), _scalar(f"{out}_act_zero_point", zero, np_act)]
                    new_nodes.append(node)
                    new_nodes += [
                        helper.make_node("QuantizeLinear", [f"{out}_float", f"{out}_act_scale", f"{out}_act_zero_point"],
                                         [f"{out}_q"], name=f"{out}/QuantizeLinear"),
                        helper.make_node("DequantizeLinear", [f"{out}_q", f"{out}_act_scale", f"{out}_act_zero_point"],
                                         [out], name=f"{out}/DequantizeLinear"),
                    ]
                    result.activations_quantized += 1
                    continue
        elif node.op_type in QUANT_OPS:
            result.kept_fp32.append(node.name)
        new_nodes.append(node)

    replace_initializers(graph, new_nodes, new_inits, quantized_weights | gathered_tables | quantized_biases,
                         weights, external)
    _ensure_opset(model, 13)  # per-axis DequantizeLinear
    return result


def external_adder(result: QuantizedGraph, new_inits: list[onnx.TensorProto]
                   ) -> Callable[[str, np.ndarray, str], None]:
    """``external(name, array, origin)``: declare an external initializer in the graph and hand its bytes (and the
    original it came from) to the caller through ``result.tensors``."""
    def external(name: str, array: np.ndarray, origin: str) -> None:
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        new_inits.append(tensor)
        result.tensors[name] = (array, origin)
    return external


def embedding_gathers(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """``Gather`` nodes that look rows up in a 2-D external initializer (the token embedding)."""
    inits = {i.name: i for i in graph.initializer}
    return [node for node in graph.node
            if node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
            and node.input[0] in weights and not any(a.name == "axis" and a.i != 0 for a in node.attribute)]


def quantize_tables(gathers: list[onnx.NodeProto], weights: dict[str, np.ndarray],
                    external: Callable[[str, np.ndarray, str], None], result: QuantizedGraph) -> set[str]:
    """INT8 rows + one scale per row for every gathered table; returns the tables replaced."""
    tables: set[str] = set()
    for node in gathers:
        table = node.input[0]
        if table not in tables:
            q, scale = quantize_weight(weights[table], 0)
            external(f"{table}_quantized", q, table)
            external(f"{table}_scale", scale.reshape(-1, 1), table)
            tables.add(table)
            result.weights_quantized += 1
    return tables


def dequantized_gather(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Gather(int8 rows) * Gather(row scales): only the looked-up rows are dequantized."""
    table, ids, out = node.input[0], node.input[1], node.output[0]
    return [
        helper.make_node("Gather", [f"{table}_quantized", ids], [f"{out}_int8"], name=f"{node.name}/GatherInt8"),
        helper.make_node("Gather", [f"{table}_scale", ids], [f"{out}_scale"], name=f"{node.name}/GatherScale"),
        helper.make_node("Cast", [f"{out}_int8"], [f"{out}_float"], name=f"{node.name}/Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out], name=f"{node.name}/Dequantize"),
    ]


def replace_initializers(graph: onnx.GraphProto, new_nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
                         replaced: set[str], weights: dict[str, np.ndarray],
                         external: Callable[[str, np.ndarray, str], None]) -> None:
    """Drop the replaced FP32 initializers, keep the rest (external ones go back through ``external``), and install
    ``new_nodes`` in topological order."""
    still_used = {i for n in new_nodes for i in n.input}
    kept = []
    for init in graph.initializer:
        if init.name in replaced or init.name not in still_used:
            continue
        if init.data_location == TensorProto.EXTERNAL:
            external(init.name, np.ascontiguousarray(weights[init.name]), init.name)
            continue
        kept.append(init)
    _order_nodes(new_nodes, graph)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]


def _order_nodes(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> None:
    """Topological order (the DQ nodes of weights were appended first; Q/DQ of activations after their producer)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done

    def visit(i: int) -> None:
        stack = [(i, 0)]
        while stack:
            j, k = stack.pop()
            if k == 0:
                if state[j]:
                    continue
                state[j] = 1
            inputs = [x for x in nodes[j].input if x and x in produced_by and x not in available]
            if k < len(inputs):
                stack.append((j, k + 1))
                p = produced_by[inputs[k]]
                if state[p] == 0:
                    stack.append((p, 0))
                continue
            state[j] = 2
            order.append(j)

    for i in range(len(nodes)):
        if not state[i]:
            visit(i)
    nodes[:] = [nodes[i] for i in order]


def _ensure_opset(model: onnx.ModelProto, minimum: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            raise ValueError(f"Q/DQ with per-channel scales needs opset >= {minimum}, the graph has {op.version}")
