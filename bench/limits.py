"""The machine's own ceilings, measured in the same run as the engines: memory bandwidth (large numpy copy) and
GEMM peak (large matmuls; FP32 with numpy's BLAS and ONNX Runtime's MLAS, INT8 with ORT's MatMulInteger when the
``onnx`` package is there to build the one-node graph). Figures are then reported as fractions of these."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Limits:
    bandwidth_gbs: float  # bytes read + written per second by a large copy, in GB/s
    gemm_fp32_gflops: float  # best of numpy and ORT MatMul
    gemm_int8_gops: float | None  # ORT MatMulInteger (u8 x s8); None when onnx is not installed
    threads: int
    detail: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _best(fn, reps: int) -> float:
    fn()  # warm-up (page faults, thread pool start)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(nbytes: int = 512 << 20, threads: int = 1, reps: int = 3) -> float:
    """GB/s of ``np.copyto`` over buffers far larger than any cache, split over ``threads`` (numpy drops the GIL)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        seconds = _best(lambda: list(pool.map(lambda c: np.copyto(*c), chunks)), reps)
    return 2 * src.nbytes / seconds / 1e9


def numpy_gemm_gflops(n: int = 2048, reps: int = 3) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return 2.0 * n**3 / _best(lambda: np.matmul(a, b, out=out), reps) / 1e9


def cpu_session(graph, threads: int, contrib: bool = False):
    """An ORT CPU session of a hand-built ``onnx`` graph (opset 17, plus com.microsoft for ``contrib`` ops)."""
    import onnxruntime as ort
    from onnx import helper

    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_matmul_session(op: str, n: int, threads: int):
    """A one-node MatMul / MatMulInteger graph (None without the ``onnx`` package)."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    a_type, b_type, y_type = ((TensorProto.FLOAT,) * 3 if op == "MatMul"
                              else (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32))
    graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("A", a_type, [n, n]),
                               helper.make_tensor_value_info("B", b_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])])
    return cpu_session(graph, threads)


def ort_gemm_gops(op: str, n: int = 2048, threads: int = 1, reps: int = 3) -> float | None:
    session = _ort_matmul_session(op, n, threads)
    if session is None:
        return None
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray]
    if op == "MatMul":
        feeds = {"A": rng.standard_normal((n, n), dtype=np.float32), "B": rng.standard_normal((n, n), dtype=np.float32)}
    else:
        feeds = {"A": rng.integers(0, 255, (n, n), dtype=np.uint8), "B": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return 2.0 * n**3 / _best(lambda: session.run(None, feeds), reps) / 1e9


def bandwidth_sample(threads: int | None = None, quick: bool = False) -> float:
    """One copy-bandwidth figure (GB/s) as :func:`measure_limits` takes it: best of 5 copies of 512 MB, or of 2 of
    64 MB with ``quick``."""
    nbytes, reps = (64 << 20, 2) if quick else (512 << 20, 5)  # best of 5: robust to a busy machine
    return memory_bandwidth(nbytes, threads or os.cpu_count() or 1, reps)


def measure_limits(threads: int | None = None, quick: bool = False) -> Limits:
    """``quick`` shrinks the buffers (tests); figures then come out optimistic (caches help)."""
    threads = threads or os.cpu_count() or 1
    nbytes, n, reps = (64 << 20, 768, 2) if quick else (512 << 20, 2048, 5)
    bandwidth = bandwidth_sample(threads, quick)
    fp32 = {"numpy": numpy_gemm_gflops(n, reps), "ort": ort_gemm_gops("MatMul", n, threads, reps)}
    int8 = ort_gemm_gops("MatMulInteger", n, threads, reps)
    detail = {"copy_bytes": nbytes, "gemm_n": n, "gemm_fp32_gflops_by_library": fp32}
    return Limits(bandwidth, max(v for v in fp32.values() if v is not None), int8, threads, detail)
