"""ONNX Runtime-only graph fusions for CPU decode, applied to the weight-only INT8 graphs (already ORT-only).

Why: a batch-1 decode step is ~1 ms of work per layer spread over dozens of tiny nodes, and every node costs
executor overhead. ORT's own optimizer fuses norms and some matmuls but not our rotary pattern, so we fuse it here:
``x * cos + cat(-x2, x1) * sin`` (2 Slice, Neg, Concat, 2 Mul, Add per q and per k) becomes one
``com.microsoft.RotaryEmbedding`` reading a constant cos/sin table by position id (non-interleaved halves, the same
convention as :func:`rsvlm_edge.modeling.model.apply_rope`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTRIB = "com.microsoft"
POSITIONS = "position_ids"
POSITIONS_INT64 = "position_ids/int64"
COS_CACHE, SIN_CACHE = "rotary/cos_cache", "rotary/sin_cache"


def use_contrib_domain(model: onnx.ModelProto) -> None:
    """Declare ORT's contrib operator domain once (MatMulNBits, RotaryEmbedding live there)."""
    if not any(op.domain == CONTRIB for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))


def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_positions, head_dim / 2) cos and sin, computed in float32 the way the PyTorch model computes them."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _rotary_match(add: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> tuple[str, list[onnx.NodeProto]] | None:
    """(rotated input X, the nodes to remove) when ``add`` ends ``X * cos + cat(-X[half:], X[:half]) * sin``."""
    muls = [producer.get(i) for i in add.input]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for cos_mul, sin_mul in (muls, muls[::-1]):
        assert cos_mul is not None and sin_mul is not None
        cat = next((producer[i] for i in sin_mul.input if i in producer and producer[i].op_type == "Concat"), None)
        sin = next((producer[i] for i in sin_mul.input if i in producer and producer[i].op_type == "Sin"), None)
        if cat is None or sin is None or len(cat.input) != 2:
            continue
        axis = next((a.i for a in cat.attribute if a.name == "axis"), None)
        neg, second = producer.get(cat.input[0]), producer.get(cat.input[1])
        if axis not in (-1, 3) or neg is None or neg.op_type != "Neg" or second is None or second.op_type != "Slice":
            continue
        first = producer.get(neg.input[0])
        if first is None or first.op_type != "Slice" or first.input[0] != second.input[0]:
            continue
        x = first.input[0]
        others = [i for i in cos_mul.input if i != x]
        if len(others) != 1 or x not in cos_mul.input or getattr(producer.get(others[0]), "op_type", None) != "Cos":
            continue
        return x, [add, cos_mul, sin_mul, cat, neg, first, second]
    return None


def _prune_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the old cos/sin chain) and the inline initializers left unused."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used or i.data_location == TensorProto.EXTERNAL]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def fuse_rotary(model: onnx.ModelProto, head_dim: int, theta: float, max_positions: int) -> int:
    """Fuse every rotary pattern of ``model`` in place; returns how many were fused (0 leaves the graph as it was)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    matches = []
    for node in graph.node:
        if node.op_type == "Add":
            found = _rotary_match(node, producer)
            # every intermediate must feed only the pattern, or removing it would break another reader
            if found and all(consumers.get(o, 0) == 1 for n in found[1][1:] for o in n.output):
                matches.append((node, *found))
    if not matches:
        return 0
    if not any(i.name == POSITIONS and i.type.tensor_type.elem_type in (TensorProto.INT32, TensorProto.INT64)
               for i in graph.input):
        raise ValueError(f"rotary fusion needs an integer graph input {POSITIONS!r}")
    removed = {id(n) for _, _, nodes in matches for n in nodes}
    fused = {id(add): helper.make_node("RotaryEmbedding", [x, POSITIONS_INT64, COS_CACHE, SIN_CACHE], [add.output[0]],
                                       name=f"{add.name}/RotaryEmbedding", domain=CONTRIB, interleaved=0)
             for add, x, _ in matches}
    nodes = [helper.make_node("Cast", [POSITIONS], [POSITIONS_INT64], name="position_ids/Cast", to=TensorProto.INT64)]
    for n in graph.node:
        if id(n) in fused:
            nodes.append(fused[id(n)])
        elif id(n) not in removed:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    cos, sin = rope_tables(head_dim, theta, max_positions)
    graph.initializer.extend([numpy_helper.from_array(cos, COS_CACHE), numpy_helper.from_array(sin, SIN_CACHE)])
    _prune_dead(graph)
    use_contrib_domain(model)
    return len(matches)
