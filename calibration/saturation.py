"""Static proof that an INT8 Q/DQ engine dir cannot saturate in any CPU's integer GEMM. Torch-free (numpy + onnx).

Why a proof is needed: ONNX Runtime runs a Q/DQ ``MatMul`` / ``Gemm`` / ``Conv`` as an integer product of a u8
activation and an s8 weight (MLAS ``QGEMM`` / ``SymmQgemm`` / ``ConvSym`` kernels; int8 activations are shifted by
+128 into u8 on x86 and the shift is subtracted afterwards). What each ISA does with the products:

- x86 AVX2 and AVX512 without VNNI (e.g. AMD Zen 2/3, Intel Haswell-Skylake client, Skylake-SP): ``vpmaddubsw``
  multiplies u8 x s8 byte pairs and adds each two adjacent products of the reduction into an int16 with
  saturation, then ``vpmaddwd`` widens to int32 (``MultiplyAccumulateCellU8S8Avx512Core`` in MLAS'
  ``SymQgemmU8KernelAvx512``, the same pattern in the AVX2 kernels). One pair is two weights of the same output
  channel times two activations.
- x86 AVX512-VNNI / AVX-VNNI (``vpdpbusd``), AMX (``tdpbusd``), ARM64 (``sdot`` / ``udot`` / ``smmla``, or widening
  ``umull`` + ``uadalp``) accumulate straight into int32: nothing saturates for any K a model has.

The bound: with u8 activations a_i, a_j in [0, 255] and weights w_i, w_j of one output channel,
``|a_i w_i + a_j w_j| <= 255 * (|w_i| + |w_j|)``. If every two weights of a channel have ``|w_i| + |w_j| <= 128``,
a pair is at most 255 * 128 = 32640 <= 32767 = INT16_MAX, so ``vpmaddubsw`` is exact for every input and every
order in which a kernel packs the reduction; the int32 sum over K (<= 255 * 127 * K) is exact for K < 66,000.
ONNX Runtime's own quantizer answers the same problem with ``reduce_range=True`` (weights in [-64, 64], its docs:
"quantizes weights to 7-bit to reduce the risk of integer saturation on CPUs that typically lack the VNNI
dot-product instruction"); the pair-bounded weights of :func:`~rsvlm_edge.calibration.qdq.quantize_weight` meet the
same bound with a step that is never coarser. The activation side needs no calibration range: QuantizeLinear
saturates to the 8-bit type, so 255 bounds the u8 operand for uint8 and (shifted) int8 activations alike.

:func:`prove_engine_dir` re-derives the bound from the graphs and weight files of a built engine dir, so any
machine (AVX2 or not) can check an engine that will be deployed on another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

U8_MAX = 255
INT16_MAX = 32767
PAIR_SUM_LIMIT = INT16_MAX // U8_MAX  # 128: the largest |w_i| + |w_j| with 255 * (|w_i| + |w_j|) <= 32767
PRODUCT_OPS = ("MatMul", "Gemm", "Conv")


class SaturationError(ValueError):
    """A quantized weight has a pair of values that a non-VNNI x86 kernel would saturate on."""


def pair_bound(max_pair_sum: int) -> dict[str, Any]:
    """The manifest's record of the bound for a largest per-channel pair sum."""
    return {"max_pair_abs_sum": int(max_pair_sum), "u8_activation_max": U8_MAX,
            "max_pair_product": U8_MAX * int(max_pair_sum), "int16_max": INT16_MAX,
            "holds": U8_MAX * int(max_pair_sum) <= INT16_MAX}


def reduction_pair_sums(q: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """Per output of ``node`` (MatMul / Gemm / Conv with weight ``q`` as its second input), the largest |q_i| + |q_j|
    over two weights that the kernel adds into that output: the reduction axis is the op's, not the scale's."""
    q = np.abs(np.asarray(q, np.int32))
    if node.op_type == "Conv":  # (M, C/group, kh, kw): output channel m reduces over the rest
        flat = q.reshape(q.shape[0], -1)
    elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        flat = q  # (N, K)
    else:  # MatMul (..., K, N) and Gemm (K, N): column n reduces over K
        flat = np.moveaxis(q, -2, -1).reshape(-1, q.shape[-2]) if q.ndim >= 2 else q.reshape(1, -1)
    first, second = top_two(flat)
    return first + second


def top_two(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and the second largest value of each row of a 2-D array (0 as the second of a 1-wide row)."""
    top = -np.partition(-np.pad(rows, ((0, 0), (0, 1))), 1, axis=1)[:, :2]
    return top[:, 0], top[:, 1]


def quantized_products(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(product node, int8 initializer) for every MatMul / Gemm / Conv whose weight is ``DequantizeLinear`` of an
    8-bit initializer: the products ONNX Runtime turns into integer kernels."""
    inits = {i.name: i for i in model.graph.initializer}
    dq_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for node in model.graph.node:
        if node.op_type not in PRODUCT_OPS or len(node.input) < 2 or node.input[1] not in dq_of:
            continue
        source = inits.get(dq_of[node.input[1]])
        if source is not None and source.data_type in (TensorProto.INT8, TensorProto.UINT8):
            out.append((node, source.name))
    return out


def graph_pair_sums(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """int8 weight initializer -> its largest reduction pair sum, for every quantized product of ``model``.
    ``arrays`` holds the external initializers (inline ones are read from the graph)."""
    inits = {i.name: i for i in model.graph.initializer}
    sums: dict[str, int] = {}
    for node, weight in quantized_products(model):
        q = arrays[weight] if weight in arrays else numpy_helper.to_array(inits[weight])
        if q.dtype == np.uint8:
            raise SaturationError(f"{weight}: uint8 weights run the U8U8 kernels; the INT8 engines use int8 weights")
        sums[weight] = max(sums.get(weight, 0), int(reduction_pair_sums(q, node).max(initial=0)))
    return sums


def prove_engine_dir(engine_dir: str | Path) -> dict[str, dict[str, Any]]:
    """For every INT8 ONNX component of ``engine_dir``: the bound of :func:`pair_bound` over all its quantized
    products (components without one are left out). Raises :class:`SaturationError` naming the component, the
    weight and its pair sum if any product could saturate."""
    from rsvlm_edge.calibration.collect import external_arrays
    from rsvlm_edge.manifest import Manifest

    manifest = Manifest.load(engine_dir, verify="size")
    proofs: dict[str, dict[str, Any]] = {}
    for name, comp in manifest.components.items():
        if comp.precision != "int8" or not comp.file.endswith(".onnx"):
            continue
        path = manifest.path(comp.file)
        model = onnx.load(str(path), load_external_data=False)
        sums = graph_pair_sums(model, external_arrays(path.parent, model))
        if not sums:
            continue
        worst = max(sums, key=sums.__getitem__)
        if sums[worst] > PAIR_SUM_LIMIT:
            raise SaturationError(f"{name}: weight {worst} has two values with |q_i| + |q_j| = {sums[worst]} in one "
                                  f"output channel; 255 x {sums[worst]} > {INT16_MAX} saturates vpmaddubsw (x86 "
                                  f"without VNNI). Re-run `rsvlm-edge calibrate` to write pair-bounded weights")
        proofs[name] = {**pair_bound(sums[worst]), "weights": len(sums)}
    return proofs

