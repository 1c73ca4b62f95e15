"""Weight-only INT8 rewrite of one ONNX graph for ONNX Runtime's CPU ``MatMulNBits`` kernel (no calibration).

Why: batch-1 decode reads every weight once per token, so it runs at the speed the matmul kernel streams weights.
On CPUs without AMX, ORT's static Q/DQ path (``MatMulIntegerToFloat``) streams INT8 weights slower than its FP32
GEMV does (``bench/weight_stream.py`` measures both), while ``MatMulNBits`` with ``accuracy_level=4`` (the kernel
onnxruntime-genai uses for LLM decode) streams them about as fast as the memory allows, quantizing the activations
to INT8 per block on the fly. Weights are symmetric INT8 per block of ``block_size`` along K, one FP32 scale per
block (finer than per-channel); no activation ranges are needed, so no calibration.

What is rewritten: ``MatMul`` nodes whose second input is a 2-D weight initializer (K, N) become
``com.microsoft.MatMulNBits`` (bits 8); the token embedding is stored INT8 per row as in the Q/DQ path.
Conv, Gemm and activation x activation products stay FP32. ORT-only: TensorRT builds from the FP32 export.

With ``fuse`` (the default), products that read the same activation (q/k/v of a layer, gate/up of an expert) become
one ``MatMulNBits`` over their weights stacked along N, followed by a ``Split``; a bias ``Add`` after every member is
folded into the kernel's bias input. At batch 1 the k/v projections are small (rsunivlm-1b: 896 x 128) and a kernel
call that small is mostly thread hand-off, not weight streaming. Members are stacked only when their weights live
in the same file (all trunk or all one expert), so the expert swap still replaces one file.

INT4 (:class:`WeightScheme` with ``bits=4``): the codes come from onnxruntime's own MatMulNBits quantizer
(``onnxruntime.quantization.matmul_nbits_quantizer``): round-to-nearest per block (its ``DefaultWeightOnlyQuantizer``,
the C++ ``quantize_matmul_4bits`` kernel, symmetric or asymmetric with a 4-bit zero point per block) or HQQ (its
``HQQWeightOnlyQuantizer``: half-quadratic refinement of each block's zero point, a float zero point per block; needs
torch at build time). Each weight is quantized on its own through the quantizer's node-level ``quantize`` on a
one-``MatMul`` graph, so the layout is exactly what the kernel reads, and the rewrite here still decides stacking,
bias folding and which file each tensor goes to.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rsvlm_edge.calibration.qdq import (
    QMAX,
    QuantizedGraph,
    dequantized_gather,
    embedding_gathers,
    external_adder,
    quantize_tables,
    quantize_weight,
    replace_initializers,
)
from rsvlm_edge.engines.ort_fusions import CONTRIB, use_contrib_domain

BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK = 128
ACCURACY_INT8 = 4  # MatMulNBits: quantize A to INT8 per block and use the integer dot-product kernels
ZERO_CODE = 128  # MatMulNBits' implied zero point for 8-bit codes without a zero_points input


def blockwise_int8(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (K, N) -> (codes uint8 (N, K_blocks, block_size), scales float32 (N, K_blocks)); K is zero-padded to a
    whole number of blocks. ``code - 128`` times the block's scale is the weight."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"blockwise INT8 needs a 2-D (K, N) weight, got shape {w.shape}")
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)
    scales = (np.maximum(np.abs(wt).max(-1), 1e-12) / QMAX).astype(np.float32)
    codes = np.clip(np.rint(wt / scales[..., None]), -QMAX, QMAX) + ZERO_CODE
    return codes.astype(np.uint8), scales


METHODS = ("rtn", "hqq")
BITS = (4, 8)
#: The kernel that reads the weights: ``MatMulNBits`` (blockwise codes; activations quantized per block of K at run
#: time) or ``DynamicQuantizeMatMul`` (per-channel pair-bounded INT8 weights; the activation quantized per call over
#: its own range: ORT's integer GEMM, which uses AMX / VNNI / AVX2 and is the faster kernel over hundreds of rows).
KERNELS = ("nbits", "dynamic")


@dataclass(frozen=True)
class WeightScheme:
    """How the weights of ``MatMulNBits`` products are stored: ``bits`` per code, one scale (and, unless
    ``symmetric``, one zero point) per ``block_size`` weights along K, codes chosen by ``method`` ("rtn":
    round to nearest; "hqq": half-quadratic refinement, 4 bits only). ``accuracy_level`` is the kernel's compute
    type (4: activations quantized to INT8 per block at run time, the integer dot-product kernels)."""

    bits: int = 8
    block_size: int = DEFAULT_BLOCK
    symmetric: bool = True
    method: str = "rtn"
    accuracy_level: int = ACCURACY_INT8
    kernel: str = "nbits"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"weight bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"weight kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "dynamic" and not (self.bits == 8 and self.symmetric and self.method == "rtn"):
            raise ValueError("the dynamic kernel reads symmetric per-channel INT8 weights only")
        if self.method == "hqq" and (self.bits != 4 or self.symmetric):
            raise ValueError("HQQ quantizes 4-bit weights with a float zero point per block: asymmetric INT4 only")

    @property
    def ours(self) -> bool:
        """Symmetric round-to-nearest INT8 is :func:`blockwise_int8` (zero point implied, no zero-point input)."""
        return self.bits == 8 and self.symmetric and self.method == "rtn"

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the scheme."""
        if self.kernel == "dynamic":
            return {"bits": 8, "kernel": "DynamicQuantizeMatMul", "weights": "per-channel symmetric, pair-bounded",
                    "activations": "per-tensor UINT8, quantized per call over its own range"}
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric, "method": self.method,
                "accuracy_level": self.accuracy_level,
                "quantizer": "rsvlm_edge blockwise_int8" if self.ours else _ort_quantizer_name()}


@dataclass
class BlockCodes:
    """One weight as ``MatMulNBits`` reads it: ``codes`` uint8 (N, K_blocks, block_size * bits / 8), ``scales``
    float32 (N, K_blocks), ``zero_points`` None (symmetric), packed uint8 (N, ceil(K_blocks * bits / 8)) or float32
    (N, K_blocks) (HQQ)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


def _ort_quantizer_name() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} matmul_nbits_quantizer"


def _ort_quantizer(scheme: WeightScheme) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)  # it logs every node at INFO
    if scheme.method == "hqq":
        return mnq.HQQWeightOnlyQuantizer(mnq.HQQWeightOnlyQuantConfig(block_size=scheme.block_size, bits=scheme.bits))
    return mnq.DefaultWeightOnlyQuantizer(mnq.DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=scheme.symmetric, bits=scheme.bits))


def ort_block_quant(w: np.ndarray, scheme: WeightScheme) -> BlockCodes:
    """``w`` (K, N) quantized by onnxruntime's MatMulNBits quantizer: one ``MatMul`` graph goes through its
    node-level ``quantize`` and the initializers of the ``MatMulNBits`` it returns are read back."""
    w = np.array(w, dtype=np.float32)  # a private, writable copy (HQQ hands it to torch)
    if w.ndim != 2:
        raise ValueError(f"blockwise quantization needs a 2-D (K, N) weight, got shape {w.shape}")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="w")], "one",
                              [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    with warnings.catch_warnings():  # HQQ wraps the (read-only) initializer array in a torch tensor; it only reads it
        warnings.simplefilter("ignore", UserWarning)
        nodes = _ort_quantizer(scheme).quantize(graph.node[0], [graph])
    if len(nodes) != 1 or nodes[0].op_type != "MatMulNBits":
        raise ValueError(f"onnxruntime's quantizer returned {[n.op_type for n in nodes]} for a {w.shape} weight, "
                         f"not one MatMulNBits")
    inits = {i.name: i for i in graph.initializer}
    arrays = [numpy_helper.to_array(inits[name]) for name in nodes[0].input[1:4]]
    n = w.shape[1]
    zero_points = arrays[2].reshape(n, -1) if len(arrays) > 2 else None
    return BlockCodes(arrays[0].reshape(n, -1, arrays[0].shape[-1]), arrays[1].reshape(n, -1).astype(np.float32),
                      zero_points)


def quantize_blocks(w: np.ndarray, scheme: WeightScheme) -> BlockCodes:
    """``w`` (K, N) in ``scheme``'s storage."""
    if scheme.ours:
        return BlockCodes(*blockwise_int8(w, scheme.block_size), None)
    return ort_block_quant(w, scheme)


def dequantize_blockwise(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The (K, N) FP32 weight ``codes``/``scales`` stand for (tests, error reports)."""
    n = codes.shape[0]
    w = (codes.astype(np.float32) - ZERO_CODE) * scales[..., None]
    return w.reshape(n, -1)[:, :k].T.copy()


#: Weights with more elements than this are quantized as column slices of at most this many, one kernel each. ONNX
#: Runtime reads a weight and packs it side by side while a session is created, so the largest weight sets the
#: load-time peak above the resident set (rsunivlm-1b's lm_head has 136M elements; with slices the peak is 14 MiB
#: above it: `python -m rsvlm_edge.bench.rss`, docs/benchmarks.md "Memory"); at batch 1 a slice of 16M elements
#: still keeps every thread busy.
SLICE_ELEMENTS = 1 << 24


def column_slices(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[lo, hi) column ranges of a (K, N) weight, each at most :data:`SLICE_ELEMENTS` elements (one range if the whole
    weight is)."""
    k, n = int(shape[0]), int(shape[1])
    parts = min(n, -(-k * n // SLICE_ELEMENTS))  # as few slices as the bound allows, of near-equal width
    width = -(-n // max(parts, 1))
    return [(lo, min(n, lo + width)) for lo in range(0, n, width)]


def weight_matmuls(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] | None = None
                   ) -> list[onnx.NodeProto]:
    """``MatMul`` nodes with a 2-D weight initializer as B (and a computed A) that the rewrite turns into
    ``MatMulNBits``."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in dims
            and node.input[0] not in dims and len(dims[node.input[1]]) == 2
            and not (keep_fp32 is not None and keep_fp32(node))]


@dataclass
class _Member:
    node: onnx.NodeProto
    bias_add: onnx.NodeProto | None  # the ``Add`` of a 1-D bias right after the product, folded when all have one
    bias: str | None

    @property
    def weight(self) -> str:
        return self.node.input[1]


def _bias_add(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], weights: dict[str, np.ndarray],
              n: int) -> tuple[onnx.NodeProto, str] | None:
    readers = consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    other = [i for i in add.input if i != node.output[0]]
    if len(other) != 1 or other[0] not in weights or np.shape(weights[other[0]]) != (n,):
        return None
    return add, other[0]


def shared_input_groups(targets: list[onnx.NodeProto], weights: dict[str, np.ndarray],
                        consumers: dict[str, list[onnx.NodeProto]],
                        file_of: Callable[[str], str]) -> list[list[_Member]]:
    """Target products that read the same activation with the same K and weights in one file, in graph order."""
    by_input: dict[tuple[str, int, str], list[onnx.NodeProto]] = {}
    for node in targets:
        w = node.input[1]
        by_input.setdefault((node.input[0], int(np.shape(weights[w])[0]), file_of(w)), []).append(node)
    groups = []
    for nodes in by_input.values():
        if len(nodes) < 2 or len({n.input[1] for n in nodes}) < len(nodes):
            continue
        biases = [_bias_add(n, consumers, weights, int(np.shape(weights[n.input[1]])[1])) for n in nodes]
        fold = all(b is not None for b in biases)
        groups.append([_Member(n, b[0] if fold and b else None, b[1] if fold and b else None)
                       for n, b in zip(nodes, biases)])
    return groups


def quantize_weight_only(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                         keep_fp32: Callable[[onnx.NodeProto], bool] | None = None,
                         block_size: int = DEFAULT_BLOCK, accuracy_level: int = ACCURACY_INT8,
                         fuse: bool = True, file_of: Callable[[str], str] | None = None,
                         scheme: WeightScheme | None = None,
                         head: tuple[Callable[[onnx.NodeProto], bool], WeightScheme] | None = None) -> QuantizedGraph:
    """Rewrite a copy of ``model`` (loaded without external data); ``weights`` holds every external initializer.
    ``scheme`` (default: symmetric INT8 per ``block_size`` at ``accuracy_level``) says how weights are stored.
    Same contract as :func:`rsvlm_edge.calibration.qdq.quantize_graph`: the result's ``tensors`` lists every external
    initializer with the name of the original it came from, so the caller keeps the trunk / expert file split (a
    stacked weight names its first member). ``file_of(weight name)`` names the file a weight is stored in; only
    weights of one file are stacked (default: every weight in one file). ``head`` = (is the lm_head, its scheme): the
    output projection stored apart, e.g. INT8 in an INT4 decoder (llama.cpp's Q4 mixes keep theirs at 6 bits too): it
    picks every answer token among near-ties, and 4-bit codes there flip captions' word choices
    (docs/benchmarks.md, "Accuracy against FP32")."""
    scheme = scheme or WeightScheme(block_size=block_size, accuracy_level=accuracy_level)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    result = QuantizedGraph(model)
    targets = weight_matmuls(model, keep_fp32)
    target_ids = {id(n) for n in targets}
    for node in targets:
        if node.input[1] not in weights:
            raise ValueError(f"{node.name}: weight {node.input[1]} is stored inline; weight-only INT8 expects external "
                             f"weights")
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    groups = shared_input_groups(targets, weights, consumers, file_of or (lambda name: "")) if fuse else []
    grouped = {id(m.node): g for g in groups for m in g}
    folded = {id(m.bias_add) for g in groups for m in g if m.bias_add is not None}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []

    external = external_adder(result, new_inits)

    def matmul(a: str, w: str, origin: str, arrays: list[np.ndarray], outputs: list[str], name: str,
               bias: str | None = None, scheme: WeightScheme = scheme):
        if scheme.kernel == "dynamic":
            dynamic_matmul(a, w, origin, arrays, outputs, name, bias)
            return
        blocks = [quantize_blocks(x, scheme) for x in arrays]  # stacked along N: codes, scales, zero points by row
        external(f"{w}_quantized", np.concatenate([b.codes for b in blocks]), origin)
        result.code_bits[f"{w}_quantized"] = scheme.bits
        external(f"{w}_scale", np.concatenate([b.scales for b in blocks]), origin)
        zero_points = ""
        if blocks[0].zero_points is not None:
            zero_points = f"{w}_zero_points"
            external(zero_points, np.concatenate([b.zero_points for b in blocks if b.zero_points is not None]), origin)
        k, n = int(np.shape(arrays[0])[0]), sum(int(np.shape(x)[1]) for x in arrays)
        inputs = [a, f"{w}_quantized", f"{w}_scale", zero_points, "", bias or ""]
        while not inputs[-1]:
            inputs.pop()
        new_nodes.append(helper.make_node("MatMulNBits", inputs, outputs, name=f"{name}/MatMulNBits", domain=CONTRIB,
                                          K=k, N=n, bits=scheme.bits, block_size=scheme.block_size,
                                          accuracy_level=scheme.accuracy_level))
        result.weights_quantized += len(arrays)

    def dynamic_matmul(a: str, w: str, origin: str, arrays: list[np.ndarray], outputs: list[str], name: str,
                       bias: str | None = None):
        # pair-bounded (qdq.quantize_weight): u8 x s8 pairs cannot saturate x86 kernels without VNNI
        codes, scale = quantize_weight(np.concatenate([np.asarray(x, np.float32) for x in arrays], axis=1), axis=1)
        external(f"{w}_quantized", codes, origin)
        external(f"{w}_scale", scale, origin)
        inputs = [a, f"{w}_quantized", f"{w}_scale", "", bias or ""]
        while not inputs[-1]:
            inputs.pop()
        new_nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, outputs, name=f"{name}/DynamicQuantizeMatMul",
                                          domain=CONTRIB))
        result.weights_quantized += len(arrays)

    quantized: set[str] = set()
    gathers = embedding_gathers(graph, weights)
    tables = quantize_tables(gathers, weights, external, result)
    for node in graph.node:
        if node in gathers:
            new_nodes += dequantized_gather(node)
        elif id(node) in grouped:
            group = grouped[id(node)]
            if node is not group[0].node:
                continue  # emitted with the group's first member
            first = group[0]
            stacked = f"{first.weight}_stacked{len(group)}"
            bias = None
            if first.bias is not None:
                bias = f"{stacked}_bias"
                biases = [weights[m.bias] for m in group if m.bias is not None]  # all of them: folded only when all have one
                external(bias, np.concatenate(biases).astype(np.float32), first.bias)
            outputs = [m.bias_add.output[0] if m.bias_add is not None else m.node.output[0] for m in group]
            matmul(node.input[0], stacked, first.weight, [weights[m.weight] for m in group], [f"{stacked}_out"],
                   node.name, bias)
            sizes = np.asarray([np.shape(weights[m.weight])[1] for m in group], np.int64)
            new_inits.append(numpy_helper.from_array(sizes, f"{stacked}_split"))
            new_nodes.append(helper.make_node("Split", [f"{stacked}_out", f"{stacked}_split"], outputs,
                                              name=f"{node.name}/Split", axis=-1))
            quantized.update(m.weight for m in group)
            quantized.update(m.bias for m in group if m.bias is not None)
            result.fused["stacked_matmuls"] = result.fused.get("stacked_matmuls", 0) + 1
        elif id(node) in folded:
            continue
        elif id(node) in target_ids:
            w = node.input[1]
            own = head[1] if head is not None and head[0](node) else scheme
            parts = column_slices(np.shape(weights[w]))
            if len(parts) == 1:
                matmul(node.input[0], w, w, [weights[w]], list(node.output), node.name, scheme=own)
            else:  # one product per slice of N, concatenated: see SLICE_ELEMENTS
                outs = [f"{w}_part{i}_out" for i in range(len(parts))]
                for i, (lo, hi) in enumerate(parts):
                    matmul(node.input[0], f"{w}_part{i}", w, [weights[w][:, lo:hi]], [outs[i]], f"{node.name}_part{i}",
                           scheme=own)
                new_nodes.append(helper.make_node("Concat", outs, list(node.output), name=f"{node.name}/Concat",
                                                  axis=-1))
                result.fused["column_slices"] = result.fused.get("column_slices", 0) + len(parts)
            quantized.add(w)
        else:
            if node.op_type in ("MatMul", "Gemm", "Conv"):
                result.kept_fp32.append(node.name)
            new_nodes.append(node)
    replace_initializers(graph, new_nodes, new_inits, quantized | tables, weights, external)
    use_contrib_domain(model)
    return result
