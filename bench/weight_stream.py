"""How fast ONNX Runtime's CPU matmul kernels stream weights at batch 1 (the decode case), per weight format.

``python -m rsvlm_edge.bench.weight_stream --threads 2`` runs one graph of ``--layers`` independent ``x @ W`` products
(a (1, K) activation, distinct (K, N) weights, far more bytes than the caches hold) for FP32 ``MatMul``, the static
Q/DQ INT8 the calibrated engines use (fused by ORT into ``MatMulIntegerToFloat``) and weight-only INT8
``MatMulNBits`` (accuracy level 4), and prints weight bytes per second beside the machine's copy bandwidth. It is
the evidence for :mod:`rsvlm_edge.calibration.weight_only`: which INT8 format lets decode approach the bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from rsvlm_edge.bench.limits import cpu_session, memory_bandwidth


def _session(nodes, inits, k: int, outputs: int, threads: int):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "weight_stream", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)],
                              inits)
    return cpu_session(graph, threads, contrib=True)


def _graphs(weights: list[np.ndarray], block_size: int):
    from onnx import helper, numpy_helper

    from rsvlm_edge.calibration.qdq import quantize_weight
    from rsvlm_edge.calibration.weight_only import blockwise_int8

    k, n = weights[0].shape
    fp32 = ([helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(weights))],
            [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)], 4.0)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz")]
    for i, w in enumerate(weights):
        q, s = quantize_weight(w, 1)
        inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s, f"s{i}"),
                  numpy_helper.from_array(np.zeros(n, np.int8), f"z{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"wd{i}"], axis=1),
                  helper.make_node("MatMul", ["xd", f"wd{i}"], [f"y{i}"])]
    qdq = (nodes, inits, 1.0)
    nodes, inits = [], []
    for i, w in enumerate(weights):
        codes, scales = blockwise_int8(w, block_size)
        inits += [numpy_helper.from_array(codes, f"c{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"c{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft", K=k, N=n,
                                      bits=8, block_size=block_size, accuracy_level=4))
    nbits = (nodes, inits, 1.0 + 4.0 / block_size)
    return {"fp32 MatMul": fp32, "int8 Q/DQ (MatMulIntegerToFloat)": qdq, f"int8 MatMulNBits (block {block_size})": nbits}


def measure(k: int = 896, n: int = 4864, layers: int = 24, threads: int = 2, reps: int = 30,
            block_size: int = 128) -> dict:
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((k, n)) * 0.02).astype(np.float32) for _ in range(layers)]
    x = rng.standard_normal((1, k)).astype(np.float32)
    out: dict[str, Any] = {"k": k, "n": n, "layers": layers, "threads": threads,
           "copy_bandwidth_gbs": memory_bandwidth(512 << 20, threads, 5), "formats": {}}
    for name, (nodes, inits, bytes_per_weight) in _graphs(weights, block_size).items():
        session = _session(nodes, inits, k, layers, threads)
        for _ in range(5):
            session.run(None, {"x": x})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        gbs = layers * k * n * bytes_per_weight / seconds / 1e9
        out["formats"][name] = {"ms": seconds * 1e3, "weight_gbs": gbs, "of_bandwidth": gbs / out["copy_bandwidth_gbs"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=896, help="input features (rsunivlm-1b hidden size)")
    parser.add_argument("--n", type=int, default=4864, help="output features (rsunivlm-1b FFN size)")
    parser.add_argument("--layers", type=int, default=24, help="independent weights, to exceed the caches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    result = measure(args.k, args.n, args.layers, args.threads, block_size=args.block_size)
    print(f"copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s (read + write); "
          f"{args.layers} x ({args.k} x {args.n}) weights, batch 1, {args.threads} threads")
    for name, row in result["formats"].items():
        print(f"  {name:36s} {row['ms']:7.2f} ms  {row['weight_gbs']:5.1f} GB/s of weights  "
              f"({row['of_bandwidth']:.0%} of bandwidth)")
    if args.json:
        from rsvlm_edge.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
