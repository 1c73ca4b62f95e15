"""ONNX Runtime-only graph fusions for CPU decode, applied to the weight-only INT8 graphs (already ORT-only).

Why: a batch-1 decode step is ~1 ms of work per layer spread over dozens of tiny nodes, and every node costs
executor overhead. ORT's own optimizer fuses norms and some matmuls but not our attention, so we fuse it here:

* :func:`fuse_rotary`: ``x * cos + cat(-x2, x1) * sin`` (2 Slice, Neg, Concat, 2 Mul, Add per q and per k) becomes
  one ``com.microsoft.RotaryEmbedding`` reading a constant cos/sin table by position id (non-interleaved halves, the
  same convention as :func:`rsvlm_edge.modeling.model.apply_rope`);
* :func:`fuse_attention`: the whole attention of a layer (rotary, KV concat, transposes, QK, softmax, PV) becomes one
  ``com.microsoft.GroupQueryAttention`` that writes K/V into a preallocated cache in place (the decoder's KV layout
  changes; the manifest says so, see :data:`rsvlm_edge.manifest.KV_LAYOUT_SHARED`). The rsunivlm-1b weight-only decoder graph goes from
  1356 to 739 nodes;
* :func:`fuse_skip_rms_norm`: each residual Add and the RMSNorm it feeds become one
  ``com.microsoft.SkipSimplifiedLayerNormalization``.
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


def _tensor_producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


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
    producer = _tensor_producers(graph)
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


# --------------------------------------------------------------------------- attention
#: KV cache layout of a decoder whose attention is one ``GroupQueryAttention`` per layer: per layer K and V buffers of
#: (batch, kv_heads, capacity, head_dim), bound as both the past input and the present output (ORT's shared buffer:
#: the kernel writes this step's K/V at the current length and reads the prefix; nothing is concatenated or copied).
#: (The exported graphs' layout, "sequence-major", is the manifest's default: past (P, B, kv_heads, head_dim) in, this
#: step's (S, B, kv_heads, head_dim) out.) Both names live in :mod:`rsvlm_edge.manifest`, which owns the format.
SEQLENS_K, TOTAL_LENGTH = "attention/seqlens_k", "attention/total_sequence_length"
#: ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of this only ("head_size shall be a
#: multiple of 16"); other decoders keep their exported attention.
GQA_HEAD_MULTIPLE = 16


def _attention_region(graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto], layer: int):
    """(q, k, v, attention bias, output, nodes to remove) of layer ``layer``'s attention, or None when it does not
    have the exported shape: three projections (bias added or not), one Softmax, and the layer's past/new K/V."""
    prefix = f"/layers.{layer}/self_attn/"
    qkv = []
    for p in ("q", "k", "v"):
        name = next((t for t in (f"{prefix}{p}_proj/Add_output_0", f"{prefix}{p}_proj/MatMul_output_0") if t in producer),
                    None)
        if name is None:
            return None
        qkv.append(name)
    o_proj = [n for n in graph.node
              if n.name.startswith(f"{prefix}o_proj/") and n.op_type in ("MatMul", "MatMulNBits", "DynamicQuantizeMatMul")]
    if len(o_proj) != 1:
        return None
    out = o_proj[0].input[0]
    softmax = [n for n in graph.node if n.name.startswith(prefix) and n.op_type == "Softmax"]
    if len(softmax) != 1:
        return None
    node = producer.get(softmax[0].input[0])
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Add":
        return None
    # the score Add's other input is the shared (B, 1, S, P+S) additive mask, made outside the layer
    bias = next((i for i in node.input if not (i in producer and producer[i].name.startswith(prefix))), None)
    if bias is None:
        return None
    past_k, past_v = f"past_key_{layer}", f"past_value_{layer}"
    stop = set(qkv) | {bias, past_k, past_v, POSITIONS_INT64}
    region: dict[int, onnx.NodeProto] = {}
    todo = [out]
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if t in stop or n is None or id(n) in region:
            continue
        region[id(n)] = n
        todo.extend(i for i in n.input if i)
    touched = {i for n in region.values() for i in n.input}
    if not {past_k, past_v} <= touched:
        return None
    made = {o for n in region.values() for o in n.output}
    if not {f"new_key_{layer}", f"new_value_{layer}"} <= made:
        return None
    return (*qkv, bias, out, list(region.values()))


def fuse_attention(model: onnx.ModelProto, num_heads: int, kv_heads: int, head_dim: int, num_layers: int,
                   theta: float, max_positions: int) -> int:
    """Replace every layer's attention (rotary, KV concat, transposes, the two matmuls and softmax) by one
    ``com.microsoft.GroupQueryAttention`` over a shared KV buffer (:data:`rsvlm_edge.manifest.KV_LAYOUT_SHARED`), fed the packed q/k/v
    of the stacked projection when there is one.

    All layers or none: returns the number fused (0 leaves ``model`` as it was). The graph's past inputs become the
    (B, kv_heads, capacity, head_dim) buffers and its ``new_key_i``/``new_value_i`` outputs become
    ``present_key_i``/``present_value_i`` on the same buffers. Padding stays in the additive mask. Rotary moves into
    the kernel, which rotates by cache index rather than by ``position_ids``: the same attention, because RoPE scores
    depend only on position differences and the generation loop's positions are the cache index minus a constant per
    row (a left-padded row's pad count), so the fused graph no longer reads ``position_ids``.
    """
    if head_dim % GQA_HEAD_MULTIPLE:
        return 0  # the kernel refuses such heads at run time; the unfused attention serves them
    graph = model.graph
    producer = _tensor_producers(graph)
    regions = [_attention_region(graph, producer, i) for i in range(num_layers)]
    if not num_layers or any(r is None for r in regions):
        return 0
    removed: set[int] = set()
    for r in regions:
        assert r is not None
        removed |= {id(n) for n in r[5]}
    new_kv = {f"new_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")}
    remade = {r[4] for r in regions if r is not None}  # each layer's attention output, produced again by its GQA
    read_outside = {i for n in graph.node if id(n) not in removed for i in n.input} | {o.name for o in graph.output}
    for t in read_outside - remade - new_kv:  # nothing else a region makes may be read outside the regions
        if t in producer and id(producer[t]) in removed:
            return 0
    if not any(i.name == "attention_mask" for i in graph.input):
        return 0

    i64 = lambda name, values: numpy_helper.from_array(np.asarray(values, np.int64), name)  # noqa: E731
    consts = [i64("attention/idx0", 0), i64("attention/idx1", 1), i64("attention/one", 1), i64("attention/axes0", [0])]
    # once per step: total_sequence_length = the mask's width, seqlens_k = that minus one for every row
    shared = [
        helper.make_node("Shape", ["attention_mask"], ["attention/mask_shape"], name="attention/Shape"),
        helper.make_node("Gather", ["attention/mask_shape", "attention/idx1"], ["attention/total64"], name="attention/Total",
                         axis=0),
        helper.make_node("Cast", ["attention/total64"], [TOTAL_LENGTH], name="attention/TotalCast", to=TensorProto.INT32),
        helper.make_node("Sub", ["attention/total64", "attention/one"], ["attention/last64"], name="attention/Last"),
        helper.make_node("Cast", ["attention/last64"], ["attention/last"], name="attention/LastCast", to=TensorProto.INT32),
        helper.make_node("Gather", ["attention/mask_shape", "attention/idx0"], ["attention/batch"], name="attention/Batch",
                         axis=0),
        helper.make_node("Unsqueeze", ["attention/batch", "attention/axes0"], ["attention/batch_1d"],
                         name="attention/BatchShape"),
        helper.make_node("Expand", ["attention/last", "attention/batch_1d"], [SEQLENS_K], name="attention/SeqlensK"),
    ]
    order = {id(n): pos for pos, n in enumerate(graph.node)}
    place: dict[int, onnx.NodeProto] = {}  # each GQA goes where its region's last node stood (its inputs exist by then)
    for layer, r in enumerate(regions):
        assert r is not None
        q, k, v, bias, out, region = r
        split = producer.get(q)
        if split is not None and split.op_type == "Split" and list(split.output) == [q, k, v]:
            qkv = [split.input[0], "", ""]  # the stacked projection, packed (B, S, (heads + 2 kv_heads) * head_dim)
        else:
            qkv = [q, k, v]
        place[max(order[id(n)] for n in region)] = helper.make_node(
            "GroupQueryAttention",
            [*qkv, f"past_key_{layer}", f"past_value_{layer}", SEQLENS_K, TOTAL_LENGTH, COS_CACHE, SIN_CACHE, "", bias],
            [out, f"present_key_{layer}", f"present_value_{layer}"],
            name=f"/layers.{layer}/self_attn/GroupQueryAttention", domain=CONTRIB, num_heads=num_heads,
            kv_num_heads=kv_heads, scale=float(1.0 / np.sqrt(head_dim)), do_rotary=1, rotary_interleaved=0)
    nodes = list(shared)
    for pos, n in enumerate(graph.node):
        if id(n) not in removed:
            nodes.append(n)
        if pos in place:
            nodes.append(place[pos])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    if not any(i.name == COS_CACHE for i in graph.initializer):
        cos, sin = rope_tables(head_dim, theta, max_positions)
        graph.initializer.extend([numpy_helper.from_array(cos, COS_CACHE), numpy_helper.from_array(sin, SIN_CACHE)])
    cache_shape: list[str | int] = ["batch", kv_heads, "capacity", head_dim]
    for inp in graph.input:
        if inp.name.startswith(("past_key_", "past_value_")):
            inp.CopyFrom(helper.make_tensor_value_info(inp.name, inp.type.tensor_type.elem_type, cache_shape))
    outputs = []
    for o in graph.output:
        if o.name in new_kv:
            kind, layer_s = o.name[len("new_"):].rsplit("_", 1)
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{layer_s}", o.type.tensor_type.elem_type,
                                                         cache_shape))
        else:
            outputs.append(o)
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.value_info[:]
    _prune_dead(graph)
    use_contrib_domain(model)
    return num_layers


# --------------------------------------------------------------------------- residual + RMSNorm
def _scalar(graph_inits: dict[str, onnx.TensorProto], name: str) -> float | None:
    init = graph_inits.get(name)
    if init is None:
        return None
    value = numpy_helper.to_array(init)
    return float(value) if value.size == 1 else None


def _rms_norm_chain(cast: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                    inits: dict[str, onnx.TensorProto]) -> tuple[list[onnx.NodeProto], str, float, str] | None:
    """(nodes from ``cast`` to the weight Mul, the weight, epsilon, the output) of the exported RMSNorm
    ``w * cast(x * 1 / sqrt(mean(x ** 2) + eps))`` on ``x = cast``'s output, or None."""
    def only(tensor: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    x = cast.output[0]
    pow_ = next((n for n in consumers.get(x, []) if n.op_type == "Pow"), None)
    if pow_ is None or _scalar(inits, pow_.input[1]) != 2.0:
        return None
    mean = only(pow_.output[0], "ReduceMean")
    add = mean and only(mean.output[0], "Add")
    sqrt = add and only(add.output[0], "Sqrt")
    div = sqrt and only(sqrt.output[0], "Div")
    mul = div and only(div.output[0], "Mul")
    cast_back = mul and only(mul.output[0], "Cast")
    scale = cast_back and only(cast_back.output[0], "Mul")
    if not (mean and add and sqrt and div and mul and cast_back and scale):
        return None
    eps = _scalar(inits, next((i for i in add.input if i != mean.output[0]), ""))
    weight = next((i for i in scale.input if i != cast_back.output[0]), None)
    if (eps is None or _scalar(inits, div.input[0]) != 1.0 or x not in mul.input or weight not in inits
            or weight is None):
        return None
    return [cast, pow_, mean, add, sqrt, div, mul, cast_back, scale], weight, eps, scale.output[0]


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Fuse each residual ``Add`` that feeds an RMSNorm into one ``com.microsoft.SkipSimplifiedLayerNormalization``
    (its 4th output is the sum, for the next residual). ONNX Runtime fuses the norm alone into
    ``SimplifiedLayerNormalization`` but leaves the Add beside it: one node fewer per norm and per decode step.
    Returns how many were fused."""
    graph = model.graph
    producer = _tensor_producers(graph)
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    replace: dict[int, onnx.NodeProto | None] = {}
    for cast in graph.node:
        if cast.op_type != "Cast" or cast.input[0] in outputs:
            continue
        residual = producer.get(cast.input[0])
        # a residual sum: an Add of two activations (node outputs or graph inputs), read only by the norm's Cast
        if (residual is None or residual.op_type != "Add" or len(consumers.get(cast.input[0], [])) != 1
                or any(i in inits or i not in producer and i not in inputs for i in residual.input)):
            continue
        found = _rms_norm_chain(cast, consumers, inits)
        if found is None or id(residual) in replace:
            continue
        chain, weight, eps, out = found
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [residual.input[0], residual.input[1], weight],
                                 [out, "", "", cast.output[0]], name=f"{residual.name}/SkipSimplifiedLayerNorm",
                                 domain=CONTRIB, epsilon=eps)
        replace[id(residual)] = fused
        replace.update({id(n): None for n in chain})
    if not replace:
        return 0
    nodes = []
    for n in graph.node:
        if id(n) not in replace:
            nodes.append(n)
        elif replace[id(n)] is not None:
            nodes.append(replace[id(n)])
    del graph.node[:]
    graph.node.extend(nodes)
    _prune_dead(graph)
    use_contrib_domain(model)
    return sum(1 for v in replace.values() if v is not None)
