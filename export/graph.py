"""ONNX graph surgery after ``torch.onnx.export``: weights with provenance, folding, norm decomposition.

The exporter is run with parameters as *graph inputs* (``export_params=False, keep_initializers_as_inputs=True``,
no constant folding), so nothing is deduplicated, renamed or transposed behind our back. :func:`lift_weights` turns
those inputs back into initializers whose data is *not* in the proto: every weight is a :class:`WeightRef` naming
the model parameter it comes from and the layout transform applied to it. That provenance is what lets the
decoder be exported once and re-targeted to each expert, and what decides which initializers live in the shared
trunk file and which in an expert's file. Then:

* :func:`fold_weight_transposes` bakes ``Transpose(weight)`` (how ``nn.Linear`` exports on 3-D inputs) into the
  stored layout, so no runtime (ORT's constant folding included) ever makes a second, transposed copy of a shared
  weight;
* :func:`fold_constants` evaluates weight-free constant subgraphs (shape arithmetic, RoPE frequencies) with the
  ONNX reference evaluator and replaces ``Constant`` nodes by initializers;
* :func:`decompose_layer_norm` rewrites ``LayerNormalization`` (opset 17; TensorRT 8.5's parser lacks it) into
  ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, named inside the norm's scope so the FP16 pass keeps it in FP32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Folding never creates a constant larger than this many elements (weights are never folded here anyway).
MAX_FOLD_ELEMENTS = 1 << 20

NP_TO_ONNX = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
              np.dtype("int32"): TensorProto.INT32, np.dtype("int64"): TensorProto.INT64,
              np.dtype("int8"): TensorProto.INT8, np.dtype("uint8"): TensorProto.UINT8, np.dtype("bool"): TensorProto.BOOL}
ONNX_TO_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT32: "int32",
                TensorProto.INT64: "int64", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool"}
NAME_TO_ONNX = {v: k for k, v in ONNX_TO_NAME.items()}


@dataclass
class WeightRef:
    """An initializer whose bytes come from a model parameter: ``transform(param).astype(dtype)``."""

    source: str  # parameter name in the RSVLM state dict (e.g. "layers.0.self_attn.q_proj.weight")
    shape: tuple[int, ...]  # shape after the transform
    perm: tuple[int, ...] | None = None  # transpose applied to the parameter
    dtype: str = "float32"  # stored dtype ("float32" / "float16")

    @property
    def transform(self) -> str | None:
        """How the stored tensor derives from the parameter, as the manifest's tensor layouts record it."""
        return f"transpose{list(self.perm)}" if self.perm else None


@dataclass
class Graph:
    """A weightless ONNX model plus the weights its initializers stand for."""

    model: onnx.ModelProto
    weights: dict[str, WeightRef] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @property
    def opset(self) -> int:
        return next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))


# ----------------------------------------------------------------------------------------------- helpers
def placeholder(name: str, dims: Iterable[int], data_type: int) -> TensorProto:
    """An initializer with type and shape but no bytes (the bytes are attached when the graph is written)."""
    t = TensorProto(name=name, data_type=data_type)
    t.dims.extend(int(d) for d in dims)
    return t


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------------------------------------- passes
def lift_weights(model: onnx.ModelProto, param_sources: dict[str, str], param_shapes: dict[str, tuple[int, ...]],
                 param_dtypes: dict[str, str] | None = None) -> Graph:
    """Graph inputs named like parameters -> weightless initializers with provenance.

    ``param_sources`` maps the exporter's input names (the wrapper's parameter names) to RSVLM state-dict names.
    """
    graph = model.graph
    embedded = sorted({i.name for i in graph.initializer} & set(param_sources))
    if embedded:
        raise ValueError(f"parameters were exported as initializers ({embedded[:3]}...): export them as graph inputs "
                         f"(export_params=False, keep_initializers_as_inputs=True) so their provenance is kept")
    weights: dict[str, WeightRef] = {}
    keep = []
    for inp in graph.input:
        if inp.name in param_sources:
            dtype = (param_dtypes or {}).get(inp.name, "float32")
            shape = tuple(param_shapes[inp.name])
            graph.initializer.append(placeholder(inp.name, shape, NAME_TO_ONNX[dtype]))
            weights[inp.name] = WeightRef(source=param_sources[inp.name], shape=shape, dtype=dtype)
        else:
            keep.append(inp)
    del graph.input[:]
    graph.input.extend(keep)
    return Graph(model, weights)


def fold_weight_transposes(g: Graph) -> None:
    """``Transpose(W)`` -> a weight stored transposed (``<name>.T`` for 2-D); the original stays only if still used."""
    graph = g.graph
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in g.weights:
            kept.append(node)
            continue
        ref = g.weights[node.input[0]]
        perm = tuple(attr(node, "perm") or reversed(range(len(ref.shape))))
        base = ref.perm or tuple(range(len(ref.shape)))
        composed = tuple(base[p] for p in perm)
        name = f"{node.input[0]}.T" if len(perm) == 2 else f"{node.input[0]}.perm{''.join(map(str, perm))}"
        if name not in g.weights:
            shape = tuple(ref.shape[p] for p in perm)
            g.weights[name] = WeightRef(source=ref.source, shape=shape, perm=composed, dtype=ref.dtype)
            graph.initializer.append(placeholder(name, shape, NAME_TO_ONNX[ref.dtype]))
        if node.output[0] in {o.name for o in graph.output}:
            raise ValueError(f"graph output {node.output[0]!r} is a transposed weight")
        renamed[node.output[0]] = name
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    prune(g)


def _eval_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list:
    from onnx.reference import ReferenceEvaluator

    names = [n for n in node.input if n]
    values = [np.asarray(v) for n, v in zip(node.input, inputs) if n]
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(n, NP_TO_ONNX.get(v.dtype, TensorProto.FLOAT), v.shape) for n, v in zip(names, values)],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return list(ReferenceEvaluator(model).run(None, dict(zip(names, values))))


def fold_constants(g: Graph, skip_ops: Iterable[str] = ()) -> int:
    """Evaluate nodes whose inputs are all constants (never weights); ``Constant`` nodes become initializers."""
    graph, opset = g.graph, g.opset
    consts: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if init.name not in g.weights:
            consts[init.name] = numpy_helper.to_array(init)
    skip = set(skip_ops) | {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
    folded = 0
    new_nodes = []
    for node in graph.node:
        ins = [n for n in node.input if n]
        if node.op_type not in skip and all(n in consts for n in ins) and node.domain in ("", "ai.onnx"):
            try:
                outs = _eval_node(node, [consts.get(n) if n else None for n in node.input], opset)
            except Exception:  # noqa: BLE001 - an op the reference evaluator cannot run stays in the graph
                outs = None
            if outs is not None and all(np.asarray(o).size <= MAX_FOLD_ELEMENTS for o in outs):
                for name, value in zip([o for o in node.output if o], outs):
                    consts[name] = np.asarray(value)
                    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
                folded += 1
                continue
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    prune(g)
    return folded


def decompose_layer_norm(g: Graph) -> int:
    """LayerNormalization (last axis) -> primitive ops that every TensorRT version's parser imports."""
    graph, opset = g.graph, g.opset
    count = 0
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "LayerNormalization":
            new_nodes.append(node)
            continue
        axis = attr(node, "axis", -1)
        if axis != -1:
            raise NotImplementedError(f"LayerNormalization over axis {axis} ({node.name}) is not decomposed")
        if len([o for o in node.output if o]) > 1:
            raise NotImplementedError(f"LayerNormalization {node.name} uses its mean/inv-std outputs")
        eps = float(attr(node, "epsilon", 1e-5))
        base = node.name or f"LayerNormalization_{count}"
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        def t(suffix: str, base: str = base) -> str:
            return f"{base}/{suffix}_output_0"

        consts: dict[str, np.ndarray] = {t("axes"): np.array([-1], dtype=np.int64), t("two"): np.array(2.0, dtype=np.float32),
                  t("eps"): np.array(eps, dtype=np.float32)}
        for name, value in consts.items():
            graph.initializer.append(numpy_helper.from_array(value, name))

        def reduce_mean(inp: str, out: str, suffix: str, base: str = base, axes: str = t("axes")) -> onnx.NodeProto:
            if opset >= 18:
                return helper.make_node("ReduceMean", [inp, axes], [out], name=f"{base}/{suffix}", keepdims=1)
            return helper.make_node("ReduceMean", [inp], [out], name=f"{base}/{suffix}", axes=[-1], keepdims=1)

        y, normed = node.output[0], t("Div")
        new_nodes += [
            reduce_mean(x, t("Mean"), "Mean"),
            helper.make_node("Sub", [x, t("Mean")], [t("Sub")], name=f"{base}/Sub"),
            helper.make_node("Pow", [t("Sub"), t("two")], [t("Pow")], name=f"{base}/Pow"),
            reduce_mean(t("Pow"), t("Var"), "Var"),
            helper.make_node("Add", [t("Var"), t("eps")], [t("AddEps")], name=f"{base}/AddEps"),
            helper.make_node("Sqrt", [t("AddEps")], [t("Sqrt")], name=f"{base}/Sqrt"),
            helper.make_node("Div", [t("Sub"), t("Sqrt")], [normed], name=f"{base}/Div"),
            helper.make_node("Mul", [normed, scale], [t("Mul") if bias else y], name=f"{base}/Mul"),
        ]
        if bias:
            new_nodes.append(helper.make_node("Add", [t("Mul"), bias], [y], name=f"{base}/AddBias"))
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def rename_weights(g: Graph, rename: Callable[[str], str]) -> None:
    """Give weights readable, exporter-independent names (e.g. drop the wrapper's module prefix)."""
    mapping = {old: rename(old) for old in g.weights}
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("weight renaming is not one-to-one")
    taken = {i.name for i in g.graph.initializer} - set(mapping)
    clash = taken & set(mapping.values())
    if clash:
        raise ValueError(f"renamed weights clash with other initializers: {sorted(clash)[:3]}")
    for init in g.graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for node in g.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    g.weights = {mapping[k]: v for k, v in g.weights.items()}


def prune(g: Graph) -> None:
    """Drop nodes whose outputs nobody uses, then initializers (weights included) that nothing reads."""
    graph = g.graph
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    g.weights = {k: v for k, v in g.weights.items() if k in needed}


def set_io(g: Graph, inputs: list[dict], outputs: list[dict]) -> None:
    """Overwrite graph input/output value infos with the declared names, dtypes and (symbolic) shapes, in order."""
    graph = g.graph
    by_name = {i.name: i for i in graph.input}
    missing = [t["name"] for t in inputs if t["name"] not in by_name]
    extra = sorted(set(by_name) - {t["name"] for t in inputs})
    if missing or extra:
        raise ValueError(f"exported graph inputs differ from the spec: missing {missing}, unexpected {extra}")
    out_names = {o.name for o in graph.output}
    if out_names != {t["name"] for t in outputs}:
        raise ValueError(f"exported graph outputs {sorted(out_names)} differ from the spec")

    def info(t):
        return helper.make_tensor_value_info(t["name"], NAME_TO_ONNX[t["dtype"]], t["shape"])

    del graph.input[:]
    graph.input.extend(info(t) for t in inputs)
    del graph.output[:]
    graph.output.extend(info(t) for t in outputs)
    del graph.value_info[:]


def scope_matches(node: onnx.NodeProto, pattern: re.Pattern) -> bool:
    """True when a path component of the node's scoped name (``/layers.0/input_layernorm/Pow``) matches."""
    return any(pattern.fullmatch(part) for part in node.name.split("/") if part)
