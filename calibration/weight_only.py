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
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from rsvlm_edge.calibration.qdq import (
    QMAX,
    QuantizedGraph,
    dequantized_gather,
    embedding_gathers,
    external_adder,
    quantize_tables,
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


def dequantize_blockwise(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The (K, N) FP32 weight ``codes``/``scales`` stand for (tests, error reports)."""
    n = codes.shape[0]
    w = (codes.astype(np.float32) - ZERO_CODE) * scales[..., None]
    return w.reshape(n, -1)[:, :k].T.copy()


def weight_matmuls(model: onnx.ModelProto, keep_fp32: Callable[[onnx.NodeProto], bool] | None = None
                   ) -> list[onnx.NodeProto]:
    """``MatMul`` nodes with a 2-D weight initializer as B (and a computed A) that the rewrite turns into
    ``MatMulNBits``."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in dims
            and node.input[0] not in dims and len(dims[node.input[1]]) == 2
            and not (keep_fp32 is not None and keep_fp32(node))]


def quantize_weight_only(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                         keep_fp32: Callable[[onnx.NodeProto], bool] | None = None,
                         block_size: int = DEFAULT_BLOCK, accuracy_level: int = ACCURACY_INT8) -> QuantizedGraph:
    """Rewrite a copy of ``model`` (loaded without external data); ``weights`` holds every external initializer.
    Same contract as :func:`rsvlm_edge.calibration.qdq.quantize_graph`: the result's ``tensors`` lists every external
    initializer with the name of the original it came from, so the caller keeps the trunk / expert file split."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    result = QuantizedGraph(model)
    targets = weight_matmuls(model, keep_fp32)
    target_ids = {id(n) for n in targets}
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []

    external = external_adder(result, new_inits)

    quantized: dict[str, tuple[int, int]] = {}
    for node in targets:
        w = node.input[1]
        if w not in quantized:
            if w not in weights:
                raise ValueError(f"{node.name}: weight {w} is stored inline; weight-only INT8 expects external weights")
            codes, scales = blockwise_int8(weights[w], block_size)
            external(f"{w}_quantized", codes, w)
            external(f"{w}_scale", scales, w)
            k, n = np.shape(weights[w])
            quantized[w] = (int(k), int(n))
            result.weights_quantized += 1
    gathers = embedding_gathers(graph, weights)
    tables = quantize_tables(gathers, weights, external, result)

    for node in graph.node:
        if node in gathers:
            new_nodes += dequantized_gather(node)
        elif id(node) in target_ids:
            w = node.input[1]
            k, n = quantized[w]
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], f"{w}_quantized", f"{w}_scale"], list(node.output),
                name=f"{node.name}/MatMulNBits", domain=CONTRIB, K=k, N=n, bits=8, block_size=block_size,
                accuracy_level=accuracy_level))
        else:
            if node.op_type in ("MatMul", "Gemm", "Conv"):
                result.kept_fp32.append(node.name)
            new_nodes.append(node)
    replace_initializers(graph, new_nodes, new_inits, set(quantized) | tables, weights, external)
    use_contrib_domain(model)
    return result
