"""Replace traced shape arithmetic by constant shapes, so a decode step runs ~40% fewer kernels.

``torch.onnx.export`` turns every ``x.view(b, s, h, d)`` and ``x[..., : x.shape[-1] // 2]`` into a chain of
``Shape -> Gather -> Unsqueeze -> Concat`` (or ``Div -> Slice``) nodes feeding ``Reshape``/``Slice``. ONNX Runtime
cannot fold them (the batch and sequence dims are dynamic), so rsunivlm-1b's decoder ran ~1,000 such kernels per
token, several microseconds each: at batch 1 that is a large share of a memory-bound step.

Symbolic shape inference (the ``onnxruntime.tools`` one, which tracks shape *values* through that arithmetic)
tells us what each shape tensor holds, e.g. ``[batch, seq, 14, 64]``. A ``Reshape`` whose every target dim is a
constant, the same symbol as the input dim at that position (ONNX ``0`` = copy it) or the one remaining unknown
(``-1``) gets a constant shape; a ``Slice`` whose starts/ends/axes/steps are known integers gets constant inputs.
The shape chains are then dead and pruned. Nothing else changes, so numerics are bit-identical; a graph the
inference cannot handle is left as it was. Inference runs with ``auto_merge``: where an elementwise op broadcasts two
different symbols against each other it takes them to be equal, which is the decoder's contract (the attention
mask's ``total_seq`` is ``past_seq + seq``); the export's parity checks run every graph at several shapes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rsvlm_edge.export.graph import Graph, prune

log = logging.getLogger(__name__)


def _probe(g: Graph) -> onnx.ModelProto:
    """A copy whose weight placeholders (no bytes) are graph inputs: inference needs their shapes only."""
    probe = onnx.ModelProto()
    probe.CopyFrom(g.model)
    graph = probe.graph
    weights = [t for t in graph.initializer if t.name in g.weights or t.data_location == onnx.TensorProto.EXTERNAL]
    names = {t.name for t in weights}
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights)
    return probe


def _infer(probe: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(shape-tensor values, symbolic shapes) of every tensor symbolic inference reaches."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    ssi = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
    ssi._preprocess(probe)  # noqa: SLF001 - the public entry point discards the shape values we need
    while ssi.run_:
        ssi._infer_impl()  # noqa: SLF001
    shapes = {}
    graph = ssi.out_mp_.graph
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):  # inferred shapes win
        if not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_param if d.dim_param else (int(d.dim_value) if d.HasField("dim_value") else None)
                           for d in dims]
    return dict(ssi.sympy_data_), shapes


def _as_int(value: Any) -> int | None:
    if isinstance(value, (int, np.integer)):
        return int(value)
    if getattr(value, "is_Integer", False):
        return int(value)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def _values(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return list(value.reshape(-1))
    return list(value) if isinstance(value, (list, tuple)) else [value]


def reshape_target(in_shape: list[Any], out_shape: list[Any]) -> list[int] | None:
    """The constant ONNX ``Reshape`` shape giving ``out_shape`` from ``in_shape`` (symbolic dims), or None."""
    target, unknown = [], 0
    for i, dim in enumerate(out_shape):
        as_int = _as_int(dim)
        if as_int is not None and as_int > 0:
            target.append(as_int)
        elif dim is not None and i < len(in_shape) and in_shape[i] is not None and str(in_shape[i]) == str(dim):
            target.append(0)  # copy the input dim
        else:
            target.append(-1)
            unknown += 1
    return target if unknown <= 1 else None


def static_shapes(g: Graph) -> int:
    """Give Reshape/Slice nodes constant shape inputs where their values are known; returns nodes rewired."""
    try:
        values, shapes = _infer(_probe(g))
    except Exception as exc:  # noqa: BLE001 - inference is an optimisation: never fail an export over it
        log.warning("%s: symbolic shape inference failed (%s); shapes left dynamic", g.graph.name, exc)
        return 0
    consts: list[onnx.TensorProto] = []
    rewired = 0

    def constant(node: onnx.NodeProto, slot: int, data: list[int]) -> None:
        name = f"{node.name or node.output[0]}/static_input{slot}"
        consts.append(numpy_helper.from_array(np.asarray(data, dtype=np.int64), name))
        node.input[slot] = name

    known = {t.name for t in g.graph.initializer if t.name not in g.weights}
    for node in g.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] not in known:
            in_shape, out_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
            if in_shape is None or out_shape is None:
                continue
            target = reshape_target(in_shape, out_shape)
            if target is not None:
                constant(node, 1, target)
                rewired += 1
        elif node.op_type == "Slice":
            changed = False
            for slot in range(1, len(node.input)):
                name = node.input[slot]
                if not name or name in known:
                    continue
                known_values = _values(values.get(name))
                ints = [_as_int(v) for v in known_values] if known_values is not None else []
                if ints and all(v is not None for v in ints):
                    constant(node, slot, ints)  # type: ignore[arg-type]
                    changed = True
            rewired += changed
    g.graph.initializer.extend(consts)
    prune(g)
    return rewired
