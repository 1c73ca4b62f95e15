"""TensorRT-friendliness of ONNX graphs, checked without a GPU or TensorRT installed.

For each TensorRT version in ``data/trt_supported_ops.json`` (8.5 = JetPack 5, 10.3 = JetPack 6, 11.x) it reports:

* operators the version's ONNX parser does not import natively (from onnx-tensorrt's ``docs/operators.md``;
  sources, branches and commits are recorded in the JSON);
* an opset above the highest one that version documents;
* INT64 problems. What is checked:

  - **every version**: no INT64 graph inputs/outputs. TensorRT 8.x has no INT64 bindings, and TensorRT >= 9
    requires INT64 bindings for INT64 IO, so INT32 IO is the only interface that works everywhere;
  - **TensorRT 8.5** (no INT64 type; the parser casts INT64 down to INT32): an INT64 tensor may only flow into
    index/shape consumers the parser handles in INT32 (Shape, Gather, Slice, Reshape, Concat, Unsqueeze, Range,
    integer arithmetic and comparisons, Where, Cast ...). INT64 consumed by anything else (MatMul, reductions,
    Pow, CumSum ...), in particular a ``Cast(to=INT64)`` of data feeding non-index ops, is reported;
  - **TensorRT 8.5**: INT64 constants outside the INT32 range (they would be clamped), except the
    INT64_MAX/INT64_MIN "to the end" sentinels of Slice starts/ends, which the parser clamps correctly.

``python -m rsvlm_edge.export.trt_check MODEL.onnx|ENGINE_DIR`` prints the report.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

#: Consumers that take INT64 index/shape tensors in TensorRT 8.5 (computed there as INT32).
INDEX_OPS = {
    "Abs", "Add", "Cast", "Concat", "ConstantOfShape", "Div", "Equal", "Expand", "Flatten", "Gather", "GatherElements",
    "GatherND", "Greater", "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad",
    "Range", "Reshape", "Resize", "ScatterElements", "ScatterND", "Shape", "Sign", "Size", "Slice", "Split", "Squeeze",
    "Sub", "Sum", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
}
#: Index/shape operands of other ops (axes, K, pads, repeats ...): INT64 there is demoted to INT32 by the parser.
INDEX_INPUTS = {
    **{op: {1} for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                          "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "CumSum", "OneHot")},
    "Pad": {1, 3}, "Resize": {3}, "Trilu": {1}, "Compress": {1},
}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@lru_cache(maxsize=1)
def op_lists() -> dict:
    """The contents of ``data/trt_supported_ops.json``."""
    text = resources.files("rsvlm_edge.export").joinpath("data/trt_supported_ops.json").read_text()
    return json.loads(text)


@dataclass
class VersionReport:
    version: str
    label: str
    unsupported_ops: list[str] = field(default_factory=list)
    opset_ok: bool = True
    int64: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unsupported_ops and self.opset_ok and not self.int64


@dataclass
class TrtReport:
    name: str
    opset: int
    ops: dict[str, int]
    io_int64: list[str]
    versions: dict[str, VersionReport]

    @property
    def ok(self) -> bool:
        return not self.io_int64 and all(v.ok for v in self.versions.values())

    def to_dict(self) -> dict:
        return {"opset": self.opset, "ok": self.ok, "ops": self.ops, "io_int64": self.io_int64,
                "versions": {k: {"ok": v.ok, "unsupported_ops": v.unsupported_ops, "opset_ok": v.opset_ok, "int64": v.int64}
                             for k, v in self.versions.items()}}

    def format(self) -> str:
        lines = [f"{self.name}: opset {self.opset}, {sum(self.ops.values())} nodes, ops: {', '.join(sorted(self.ops))}"]
        lines += [f"  INT64 graph IO: {msg}" for msg in self.io_int64]
        for rep in self.versions.values():
            status = "ok" if rep.ok else "PROBLEMS"
            lines.append(f"  {rep.label}: {status}")
            if rep.unsupported_ops:
                lines.append(f"    unsupported ops: {', '.join(rep.unsupported_ops)}")
            if not rep.opset_ok:
                lines.append(f"    opset {self.opset} is above the highest documented for this version")
            lines += [f"    {msg}" for msg in rep.int64]
        return "\n".join(lines)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def int64_findings_trt8(model: onnx.ModelProto, types: dict[str, int] | None = None) -> list[str]:
    """INT64 uses that TensorRT 8.5's INT64->INT32 demotion cannot handle (see the module docstring)."""
    graph = model.graph
    types = types if types is not None else _types(model)
    findings = []
    for node in graph.node:
        for idx, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.INT64:
                continue
            if node.op_type not in INDEX_OPS and idx not in INDEX_INPUTS.get(node.op_type, ()):
                what = "INT64 tensor"
                for prod in graph.node:
                    if name in prod.output and prod.op_type == "Cast":
                        what = "data cast to INT64"
                findings.append(f"{what} {name!r} feeds {node.op_type} {node.name!r} (input {idx}), which TensorRT 8.5 "
                                f"does not run on INT32")
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))

    def big(values: np.ndarray) -> bool:
        return values.size > 0 and (values.min() < INT32_MIN or values.max() > INT32_MAX)

    consts = [(i.name, numpy_helper.to_array(i)) for i in graph.initializer if i.data_type == TensorProto.INT64]
    consts += [(n.output[0], numpy_helper.to_array(a.t)) for n in graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value" and a.t.data_type == TensorProto.INT64]
    for name, values in consts:
        if not big(values):
            continue
        uses = consumers.get(name, [])
        if uses and all(n.op_type == "Slice" and idx in (1, 2) for n, idx in uses):
            continue  # "slice to the end" sentinels: clamped correctly
        findings.append(f"INT64 constant {name!r} holds values outside the INT32 range; TensorRT 8.5 would clamp them")
    return findings


def check_trt(model: onnx.ModelProto, name: str = "model", versions: list[str] | None = None) -> TrtReport:
    """Report per TensorRT version (all in the JSON by default)."""
    lists = op_lists()["versions"]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)
    types = _types(model)
    io = [f"{vi.name} ({'input' if vi in model.graph.input else 'output'})"
          for vi in list(model.graph.input) + list(model.graph.output) if vi.type.tensor_type.elem_type == TensorProto.INT64]
    trt8 = None
    reports = {}
    for version in versions or list(lists):
        data = lists[version]
        supported = set(data["supported"])
        rep = VersionReport(version, data["label"], unsupported_ops=sorted(op for op in ops if op not in supported),
                            opset_ok=opset <= data["max_opset"])
        if not data["native_int64"]:
            trt8 = trt8 if trt8 is not None else int64_findings_trt8(model, types)
            rep.int64 = list(trt8)
        reports[version] = rep
    return TrtReport(name, opset, dict(sorted(ops.items())), io, reports)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        paths += sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    ok = True
    for path in paths:
        report = check_trt(onnx.load(str(path), load_external_data=False), path.name)
        print(report.format())
        ok &= report.ok
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
