"""FP16 conversion of an exported graph, with FP32 kept where FP16 loses accuracy. IO types stay FP32.

What stays FP32 (a node-level decision; Casts are inserted at region borders, one per tensor and direction):

* normalisation internals: every node inside a module scope whose name contains ``norm`` (RMSNorm's
  Cast/Pow/ReduceMean/Add/Sqrt/Div/Mul and the decomposed LayerNorm's), so mean/variance never overflow or
  underflow. Only the final multiply by the norm weight (and LayerNorm's bias add) runs in FP16 on an FP16-cast
  normalised value, as in an FP16 PyTorch model; that is also the mixed-precision pattern ONNX Runtime's norm
  fusions expect (with FP32 weights there its LayerNormFusion builds a node with mixed input types);
* ``Softmax`` (attention probabilities; the reference computes them in FP32 too);
* the rotary-angle computation (every ancestor of ``Cos``/``Sin``): positions up to the context length times
  inverse frequencies need FP32 mantissas, only the resulting cos/sin are cast down;
* nodes that produce no floating-point output (comparisons on the attention mask ...);
* whatever ``keep_fp32`` adds (the decoder keeps ``lm_head`` FP32 by default so the final logits are FP32 end to end).

Weights consumed only by FP16 nodes are stored as FP16 (their :class:`~rsvlm_edge.export.graph.WeightRef` dtype
changes; the bytes are converted when the data files are written); weights read by FP32 nodes stay FP32.
This is the "FP16 ONNX with FP32 kept for norms/softmax" that TensorRT 11's strongly typed networks need.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rsvlm_edge.export.graph import Graph, scope_matches

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
NORM_SCOPE = re.compile(r".*norm.*", re.IGNORECASE)
FP32_OPS = {"Softmax", "LogSoftmax"}
TYPE_AGNOSTIC = {"Shape", "Size"}  # their input type does not matter
#: (op, input index) pairs that ONNX types independently of the data (always float32).
FIXED_FP32_INPUTS = {("Resize", 2)}


def rotary_nodes(nodes: list[onnx.NodeProto]) -> set[int]:
    """Indices (into ``nodes``) of Cos/Sin nodes and all their ancestors."""
    prod = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    todo = [i for i, n in enumerate(nodes) if n.op_type in ("Cos", "Sin")]
    seen: set[int] = set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(prod[x] for x in nodes[i].input if x in prod)
    return seen


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def convert_to_fp16(g: Graph, keep_fp32: Callable[[onnx.NodeProto], bool] | None = None) -> dict[str, int]:
    """Convert ``g`` in place; returns counts (fp16/fp32 nodes, casts inserted, weights converted)."""
    graph = g.graph
    types = tensor_types(g.model)
    nodes = list(graph.node)  # one wrapper object per node for the whole pass
    rotary = rotary_nodes(nodes)

    def is_float(name: str) -> bool:
        return types.get(name) in FLOATS

    def precision(index: int, node: onnx.NodeProto) -> int:
        if not any(is_float(o) for o in node.output if o):
            return TensorProto.FLOAT
        if scope_matches(node, NORM_SCOPE) and not (node.op_type in ("Mul", "Add") and any(n in g.weights for n in node.input)):
            return TensorProto.FLOAT  # norm core; its affine weight/bias step runs in FP16 (as in an FP16 PyTorch model)
        if node.op_type in FP32_OPS or index in rotary:
            return TensorProto.FLOAT
        if keep_fp32 is not None and keep_fp32(node):
            return TensorProto.FLOAT
        return TensorProto.FLOAT16

    prec = [precision(i, n) for i, n in enumerate(nodes)]
    # ---- initializers: FP16 when every consumer computes in FP16
    wanted: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        if node.op_type in TYPE_AGNOSTIC or node.op_type == "Cast":
            continue
        for idx, name in enumerate(node.input):
            if name and is_float(name):
                want = TensorProto.FLOAT if (node.op_type, idx) in FIXED_FP32_INPUTS else prec[i]
                wanted.setdefault(name, set()).add(want)
    cur: dict[str, int] = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    converted = 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            cur[init.name] = init.data_type
            continue
        if wanted.get(init.name) == {TensorProto.FLOAT16}:
            if init.name in g.weights:
                g.weights[init.name].dtype = "float16"
                init.data_type = TensorProto.FLOAT16
            else:
                value = numpy_helper.to_array(init).astype(np.float16)
                init.CopyFrom(numpy_helper.from_array(value, init.name))
            converted += 1
            cur[init.name] = TensorProto.FLOAT16
        else:
            cur[init.name] = TensorProto.FLOAT

    # ---- nodes, in order, with casts at region borders
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}_to_{'fp16' if to == TensorProto.FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}/Cast", to=to))
            casts[key] = out
            cur[out] = to
        return casts[key]

    counts = {"fp16_nodes": 0, "fp32_nodes": 0}
    for i, node in enumerate(nodes):
        p = prec[i]
        floaty = any(is_float(n) for n in list(node.input) + list(node.output) if n)
        if floaty:
            counts["fp16_nodes" if p == TensorProto.FLOAT16 else "fp32_nodes"] += 1
        if node.op_type not in TYPE_AGNOSTIC and node.op_type != "Cast":
            for idx, name in enumerate(node.input):
                if not name or cur.get(name) not in FLOATS:
                    continue
                want = TensorProto.FLOAT if (node.op_type, idx) in FIXED_FP32_INPUTS else p
                if cur[name] != want:
                    node.input[idx] = cast(name, want)
        if node.op_type == "Cast" and helper.get_attribute_value(next(a for a in node.attribute if a.name == "to")) in FLOATS:
            for a in node.attribute:
                if a.name == "to":
                    a.i = p
        if node.op_type == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in FLOATS:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(
                        np.float16 if p == TensorProto.FLOAT16 else np.float32)))
        for out in node.output:
            if out:
                cur[out] = p if is_float(out) else types.get(out, TensorProto.UNDEFINED)
        new_nodes.append(node)

    # ---- graph outputs keep their FP32 type
    renames: dict[str, str] = {}
    for out in graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT and cur.get(out.name) == TensorProto.FLOAT16:
            renames[out.name] = f"{out.name}_fp16"
    if renames:
        for node in new_nodes:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
            for i, name in enumerate(node.output):
                if name in renames:
                    node.output[i] = renames[name]
        for orig, tmp in renames.items():
            new_nodes.append(helper.make_node("Cast", [tmp], [orig], name=f"{orig}/CastToFp32", to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    counts.update(casts=len(casts) + len(renames), converted_initializers=converted)
    return counts
