"""Which CPU kernel computes a weight-only engine's prefill fastest: one decoder layer's products at M tokens.

``python -m rsvlm_edge.bench.prefill_kernels --tokens 1 742 --threads 2``: for each M, one rsunivlm-1b decoder
layer's weight products (q/k/v stacked, o, gate/up stacked, down; ``--hidden``/``--ffn``/``--kv`` for other
shapes) run as

* FP32 ``MatMul`` (the FP32 engine);
* ``MatMulIntegerToFloat`` on a static per-tensor UINT8 activation (what ORT fuses the Q/DQ engine's
  ``DequantizeLinear -> MatMul`` into);
* ``DynamicQuantizeMatMul``: the same integer GEMM on activations quantized per call over their own range (no
  calibration, nothing clipped), per-channel pair-bounded INT8 weights;
* ``MatMulNBits`` at 8 and 4 bits with ``accuracy_level`` 0 (FP32 compute on dequantized blocks) and 4 (INT8
  activations quantized per block at run time, integer dot products): the weight-only engines.

Each is timed in the same process, interleaved, best of ``--reps``; printed with the CPU model and ISA and each
figure's share of ORT's own INT8 GEMM peak (a square ``MatMulInteger``) measured in the same run. The weight-only
engines' kernel is fixed in the graph (``accuracy_level``); this says which level a CPU should be built with.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rsvlm_edge.bench.limits import cpu_session, ort_gemm_gops


def layer_shapes(hidden: int, ffn: int, kv: int) -> list[tuple[int, int]]:
    """(K, N) of one decoder layer's products as the weight-only build stacks them."""
    return [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)]


def _graph(kind: str, k: int, n: int, rng: np.random.Generator):
    from onnx import TensorProto, helper, numpy_helper

    from rsvlm_edge.calibration.weight_only import WeightScheme, quantize_blocks

    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])
    if kind == "fp32":
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                 [numpy_helper.from_array(w, "w")]), False
    if kind == "qdq-u8s8":
        scale = np.abs(w).max(0) / 127
        inits = [numpy_helper.from_array(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), "wq"),
                 numpy_helper.from_array(scale.astype(np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
                 numpy_helper.from_array(np.array(4 / 255, np.float32), "xs"),
                 numpy_helper.from_array(np.array(128, np.uint8), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        return helper.make_graph(nodes, "g", [x], [y], inits), False
    if kind == "dynamic-u8s8":
        from rsvlm_edge.calibration.qdq import quantize_weight

        codes, scale = quantize_weight(w, axis=1)
        inits = [numpy_helper.from_array(codes, "wq"), numpy_helper.from_array(scale, "ws")]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws"], ["y"], domain="com.microsoft")
        return helper.make_graph([node], "g", [x], [y], inits), True
    bits, level = (int(v) for v in kind.removeprefix("nbits").split("-acc"))
    b = quantize_blocks(w, WeightScheme(bits=bits, block_size=32 if bits == 4 else 128, symmetric=bits == 8,
                                        accuracy_level=level))
    inits = [numpy_helper.from_array(b.codes, "c"), numpy_helper.from_array(b.scales, "s")]
    inputs = ["x", "c", "s"]
    if b.zero_points is not None:
        inits.append(numpy_helper.from_array(b.zero_points, "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32 if bits == 4 else 128, accuracy_level=level)
    return helper.make_graph([node], "g", [x], [y], inits), True


def _session(kind: str, k: int, n: int, rng: np.random.Generator, threads: int):
    graph, contrib = _graph(kind, k, n, rng)
    return cpu_session(graph, threads, contrib)


KINDS = ("fp32", "qdq-u8s8", "dynamic-u8s8", "nbits8-acc0", "nbits8-acc4", "nbits4-acc0", "nbits4-acc4")


def main(argv: list[str] | None = None) -> int:
    from rsvlm_edge.machine import cpu_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 742])
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--ffn", type=int, default=4864)
    ap.add_argument("--kv", type=int, default=128, help="kv_heads x head_dim")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    shapes = layer_shapes(args.hidden, args.ffn, args.kv)
    sessions = {kind: [_session(kind, k, n, rng, args.threads) for k, n in shapes] for kind in KINDS}
    peak = ort_gemm_gops("MatMulInteger", 1024, args.threads) or float("nan")
    print(f"machine: {cpu_description()}, {args.threads} threads; ORT INT8 GEMM peak {peak:.0f} GOPS")
    results: dict[str, dict[str, float]] = {}
    for m in args.tokens:
        feeds = [{"x": (rng.standard_normal((m, k))).astype(np.float32)} for k, _ in shapes]
        best = {kind: float("inf") for kind in KINDS}
        for _ in range(args.reps):  # interleaved: every kind sees the same machine state
            for kind in KINDS:
                t0 = time.perf_counter()
                for session, feed in zip(sessions[kind], feeds):
                    session.run(None, feed)
                best[kind] = min(best[kind], time.perf_counter() - t0)
        ops = 2.0 * m * sum(k * n for k, n in shapes)
        results[str(m)] = {kind: best[kind] for kind in KINDS}
        print(f"M={m}: " + ", ".join(f"{kind} {1e3 * t:.2f} ms ({ops / t / 1e9 / peak:.0%})" for kind, t in best.items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_description(), "threads": args.threads, "int8_peak_gops": peak,
                                         "shapes": shapes, "seconds_per_layer": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
