"""Explicit Q/DQ INT8 rewrite of one ONNX graph (weights per-channel, activations per-tensor, both symmetric).

Weights of integer products are "pair-bounded" INT8 (:func:`quantize_weight`): within one output channel any two
``|q|`` sum to at most 128, so ONNX Runtime's x86 kernels without VNNI cannot saturate (the proof and the ISAs are in
:mod:`rsvlm_edge.calibration.saturation`); the values stay plain symmetric INT8 with zero point 0, which TensorRT
reads like any other Q/DQ weight.

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
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rsvlm_edge.calibration.saturation import PAIR_SUM_LIMIT, pair_bound, reduction_pair_sums, top_two

QUANT_OPS = ("MatMul", "Gemm", "Conv")
QMAX = 127.0
WEIGHT_SCHEME = ("s8 per-channel symmetric, pair-bounded: any two |q| of one output channel sum to <= 128 "
                 "(scale = max(a1 + a2, 128 * a1 / 127) / 128, a1 >= a2 the two largest |w| of the channel)")
TABLE_SCHEME = "s8 per-row symmetric (dequantized after the Gather; no integer product)"
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
    scheme: dict[str, Any] = field(default_factory=dict)  # the manifest's int8_scheme (Q/DQ graphs only)
    code_bits: dict[str, int] = field(default_factory=dict)  # codes whose bits differ from the graph's (an INT8 lm_head)


def _channels_last(w: np.ndarray, axis: int) -> np.ndarray:
    """|w| as (channels, everything a channel reduces over)."""
    return np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)


def quantize_rows(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-range symmetric per-channel INT8 along ``axis`` (|q| <= 127): for tables that are only looked up and
    dequantized, never fed to an integer product. Returns (int8 values, float32 scales of shape (w.shape[axis],))."""
    w = np.asarray(w, dtype=np.float32)
    amax = _channels_last(w, axis).max(axis=1)
    return _round(w, axis, (np.maximum(amax, 1e-12) / QMAX).astype(np.float32))


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair-bounded symmetric per-channel INT8 along ``axis`` (the output channel) for integer products.

    Per channel, with a1 >= a2 its two largest |w|: scale = max(a1 + a2, 128 * a1 / 127) / 128, so |q| <= 127 and
    the two largest |q| round to a sum of 128 at most; then every pair in the channel sums to <= 128. Against ORT's
    ``reduce_range`` (7-bit, scale = a1 / 64) the step is never coarser, and finer by (a1 - a2) / 2a1 where one weight
    stands out; with a2 = a1 both are 7-bit. A channel that float rounding pushes to 129 gets a slightly larger scale.
    Returns (int8 values, float32 scales of shape (w.shape[axis],))."""
    w = np.asarray(w, dtype=np.float32)
    a1, a2 = top_two(_channels_last(w, axis))
    scale = (np.maximum(np.maximum(a1 + a2, a1 * (PAIR_SUM_LIMIT / QMAX)), 1e-12) / PAIR_SUM_LIMIT).astype(np.float32)
    while True:
        q, scale = _round(w, axis, scale)
        over = pair_sums(q, axis) > PAIR_SUM_LIMIT
        if not over.any():
            return q, scale
        scale = np.where(over, scale * np.float32(1 + 2 ** -12), scale).astype(np.float32)


def pair_sums(q: np.ndarray, axis: int) -> np.ndarray:
    """Per output channel (``axis``), the largest |q_i| + |q_j| over two different weights of the channel: the
    largest pair any kernel can add, whatever order it packs the reduction in."""
    a1, a2 = top_two(_channels_last(np.asarray(q, np.int32), axis))
    return a1 + a2


def _round(w: np.ndarray, axis: int, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.rint(w / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8), scale


def activation_scale(amax: float) -> float:
    return float(max(amax, 1e-8) / QMAX)


Target = tuple[onnx.NodeProto, str, str, int]  # (node, activation input, weight initializer, channel axis)


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
                      ) -> list[Target]:
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


def make_qdq(tensor: str, out: str, scale: str, zero_point: str) -> list[onnx.NodeProto]:
    """Fake quantization of one activation (8-bit per-tensor)::

        tensor ─Q(scale, zero_point)─▶ <out>_q ─DQ(scale, zero_point)─▶ out
    """
    return [helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [f"{out}_q"], name=f"{out}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{out}_q", scale, zero_point], [out], name=f"{out}/DequantizeLinear")]


def make_dq(name: str, axis: int) -> onnx.NodeProto:
    """A stored tensor, dequantized under the original initializer's name so its consumers are unchanged::

        <name>_quantized ─DQ(<name>_scale, <name>_zero_point, axis)─▶ name
    """
    return helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"], [name],
                            name=f"{name}/DequantizeLinear", axis=axis)


class QdqBuilder:
    """The rewritten graph's nodes and initializers, added one subgraph at a time by the ``make_*`` methods.

    Nodes go to ``nodes`` in the order the rewrite meets them (``replace_initializers`` sorts them topologically);
    external tensors are declared in ``inits`` and their arrays handed to the caller through ``result.tensors``.
    """

    def __init__(self, result: QuantizedGraph, weights: dict[str, np.ndarray], amax: dict[str, float],
                 act_dtype: str) -> None:
        if act_dtype not in ACT_DTYPES:
            raise ValueError(f"activation dtype must be one of {', '.join(ACT_DTYPES)}, got {act_dtype!r}")
        _, self.act_type, self.act_zero = ACT_DTYPES[act_dtype]
        self.result, self.weights, self.amax = result, weights, amax
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.external = external_adder(result, self.inits)
        self.weight_scales: dict[str, np.ndarray] = {}  # weight initializer -> its per-channel scales
        self.biases: set[str] = set()  # Conv biases stored as int32
        self.act_dq: dict[str, str] = {}  # activation -> its dequantized copy, shared by every product reading it

    def make_act_qparams(self, tensor: str) -> tuple[str, str]:
        """Scale (amax / 127) and zero point of a calibrated activation, as scalar initializers."""
        self.inits += [_scalar(f"{tensor}_act_scale", activation_scale(self.amax[tensor]), np.float32),
                       _scalar(f"{tensor}_act_zero_point", self.act_zero, self.act_type)]
        self.result.activations_quantized += 1
        return f"{tensor}_act_scale", f"{tensor}_act_zero_point"

    def make_initializer_dq(self, name: str, q: np.ndarray, scale: np.ndarray, axis: int) -> None:
        """Replace the FP32 initializer ``name`` (zero point 0, dtype of ``q``)::

            <name>_quantized ─DQ(<name>_scale, <name>_zero_point, axis)─▶ name
        """
        self.external(f"{name}_quantized", q, name)
        self.external(f"{name}_scale", scale, name)
        self.inits.append(numpy_helper.from_array(np.zeros(scale.shape, q.dtype), f"{name}_zero_point"))
        self.nodes.append(make_dq(name, axis))

    def make_weight_dq(self, weight: str, axis: int) -> None:
        """A pair-bounded INT8 weight (once per initializer, whichever products share it)::

            W_quantized (s8) ─DQ(W_scale per channel)─▶ W
        """
        if weight in self.weight_scales:
            return
        q, self.weight_scales[weight] = quantize_weight(self.weights[weight], axis)
        self.make_initializer_dq(weight, q, self.weight_scales[weight], axis)
        self.result.weights_quantized += 1

    def make_bias_dq(self, bias: str, act: str, weight: str) -> None:
        """An int32 Conv bias on the scale of the product it is added to, as ``QLinearConv`` expects::

            b_quantized (s32, scale = s_act * s_W) ─DQ─▶ b
        """
        scale = (activation_scale(self.amax[act]) * self.weight_scales[weight]).astype(np.float32)
        q = np.clip(np.rint(np.asarray(self.weights[bias], np.float32) / scale), -2**31, 2**31 - 1).astype(np.int32)
        self.make_initializer_dq(bias, q, scale, 0)
        self.biases.add(bias)

    def make_input_qdq(self, act: str) -> str:
        """The dequantized copy of a calibrated activation (made on first use, then shared)::

            act ─Q─▶ act_dq_q ─DQ─▶ act_dq
        """
        if act not in self.act_dq:
            self.nodes += make_qdq(act, f"{act}_dq", *self.make_act_qparams(act))
            self.act_dq[act] = f"{act}_dq"
        return self.act_dq[act]

    def make_output_qdq(self, node: onnx.NodeProto) -> None:
        """Q/DQ on a node's output, under the output's name so its consumers are unchanged::

            node ─▶ out_float ─Q─▶ out_q ─DQ─▶ out
        """
        out = node.output[0]
        node.output[0] = f"{out}_float"
        self.nodes.append(node)
        self.nodes += make_qdq(f"{out}_float", out, *self.make_act_qparams(out))

    def make_quantized_product(self, node: onnx.NodeProto, act: str, weight: str) -> None:
        """A MatMul / Gemm / Conv reading dequantized operands; ORT fuses ``DQ ─▶ MatMul`` into
        ``MatMulIntegerToFloat``, and a Conv with Q/DQ on input, weight, bias and output into ``QLinearConv``::

            act ─Q─▶ ─DQ─▶ act_dq ─┐
            W_quantized ───DQ─▶ W ─┼─▶ node ─▶ out
            b_quantized ───DQ─▶ b ─┘   (a Conv with a calibrated output: node ─▶ out_float ─Q─▶ ─DQ─▶ out)
        """
        node.input[0] = self.make_input_qdq(act)
        if node.op_type != "Conv" or node.output[0] not in self.amax:
            self.nodes.append(node)
            return
        if len(node.input) > 2 and node.input[2] in self.weights:  # the bias is still an FP32 initializer
            self.make_bias_dq(node.input[2], act, weight)
        self.make_output_qdq(node)


def quantize_graph(model: onnx.ModelProto, weights: dict[str, np.ndarray], amax: dict[str, float],
                   keep_fp32: Callable[[onnx.NodeProto], bool] | None = None, act_dtype: str = "int8",
                   quantize_gather: bool = True) -> QuantizedGraph:
    """Rewrite a copy of ``model`` (loaded without external data); ``weights`` holds every external initializer.

    Activations without a calibrated ``amax`` are left FP32 (their node then runs with a dequantized weight).
    Every external initializer of the result is listed in ``QuantizedGraph.tensors``; inline ones stay inline.
    ``QuantizedGraph.scheme`` records the weight / activation scheme and the saturation bound of its weights.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    result = QuantizedGraph(model)
    build = QdqBuilder(result, weights, amax, act_dtype)
    # nodes by their first output (unique in a graph): the products to quantize, the embedding lookups
    targets = {target[0].output[0]: target for target in quantizable_nodes(model, keep_fp32)}
    gathers = {node.output[0]: node for node in embedding_gathers(model.graph, weights)} if quantize_gather else {}

    # weights: W_quantized ─DQ─▶ W, and the largest pair sum a kernel adds (the saturation bound)
    pair_sum = 0
    for node, _, weight, axis in targets.values():
        build.make_weight_dq(weight, axis)
        q = result.tensors[f"{weight}_quantized"][0]
        pair_sum = max(pair_sum, int(reduction_pair_sums(q, node).max(initial=0)))
    # embedding tables: INT8 rows and row scales, gathered then multiplied
    tables = quantize_tables(list(gathers.values()), weights, build.external, result)

    # every node in graph order: its own subgraph, or unchanged
    for node in model.graph.node:
        key = node.output[0] if node.output else ""
        if node.op_type == "Gather" and key in gathers:
            build.nodes += dequantized_gather(node)
        elif key not in targets:
            if node.op_type in QUANT_OPS:
                result.kept_fp32.append(node.name)
            build.nodes.append(node)
        elif targets[key][1] in amax:
            build.make_quantized_product(node, targets[key][1], targets[key][2])
        else:  # no calibrated range: FP32 activation, dequantized weight
            build.nodes.append(node)

    replace_initializers(model.graph, build.nodes, build.inits, set(build.weight_scales) | tables | build.biases,
                         weights, build.external)
    _ensure_opset(model, 13)  # per-axis DequantizeLinear
    result.scheme = qdq_scheme(pair_sum if build.weight_scales else None, bool(tables),
                               act_dtype if result.activations_quantized else None)
    return result


def qdq_scheme(pair_sum: int | None, tables: bool, act_dtype: str | None) -> dict[str, Any]:
    """The manifest's ``int8_scheme``: only the parts the graph uses (``None`` / False for the others)."""
    scheme: dict[str, Any] = {}
    if pair_sum is not None:
        scheme |= {"weights": WEIGHT_SCHEME, "pair_bound": pair_bound(pair_sum)}
    if tables:
        scheme["tables"] = TABLE_SCHEME
    if act_dtype is not None:
        zero = ACT_DTYPES[act_dtype][2]
        scheme["activations"] = f"{act_dtype} per-tensor symmetric (scale amax/127, zero point {zero})"
    return scheme


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
            q, scale = quantize_rows(weights[table], 0)
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
