"""Finding TensorRT and the CUDA runtime (cuda-python), and what they report: version, GPU compute capability.

Both are optional (the ``trt`` extra), so every entry point imports them through here and gets one clear
:class:`TrtUnavailableError` with an install hint instead of an ``ImportError`` from deep inside a backend.
A subtlety: the ``tensorrt-stubs`` package installs a ``tensorrt/`` folder holding only ``.pyi`` files, which
Python imports as an empty namespace package; such a module has no ``Builder`` and is treated as absent.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable

from rsvlm_edge.backends.base import BackendError

TRT_HINT = ("install TensorRT and cuda-python for this machine: `pip install rsvlm-edge[trt]` on x86_64 with a CUDA GPU "
            "(NVIDIA's index), or JetPack's python3-libnvinfer on Jetson; or use --backend ort")


class TrtUnavailableError(BackendError):
    """TensorRT, cuda-python or a usable CUDA GPU is missing."""


def load_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TrtUnavailableError` (also for a stubs-only install)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TrtUnavailableError(f"TensorRT is not installed ({exc}); {TRT_HINT}") from None
    if not hasattr(trt, "Builder"):
        raise TrtUnavailableError(f"the tensorrt module at hand has no runtime (only type stubs?); {TRT_HINT}")
    return trt


class LazyModule:
    """Stands in for a module until first use (as polygraphy's ``lazy_import``): importing this package never needs
    TensorRT, and the first attribute access raises :class:`TrtUnavailableError` with the hint if it is missing.
    Modules write ``if TYPE_CHECKING: import tensorrt as trt`` / ``else: trt = LazyModule(load_tensorrt)``, so mypy
    checks every call against the TensorRT stubs."""

    def __init__(self, loader: Callable[[], Any]):
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        return getattr(self._loader(), name)


def load_cudart() -> Any:
    """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (cuda-python >= 12.6) or the older ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise TrtUnavailableError(f"cuda-python is not installed (the TensorRT backend allocates device memory with it); "
                              f"pip install cuda-python; {TRT_HINT}")


def trt_version(trt: ModuleType | Any | None = None) -> str | None:
    """Installed TensorRT version ("10.3.0.26"), or None when TensorRT is absent."""
    if trt is None:
        try:
            trt = load_tensorrt()
        except TrtUnavailableError:
            return None
    return str(trt.__version__)


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


def cuda_check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; raise :class:`TrtUnavailableError` naming the error."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        cudart = load_cudart()
        try:
            text = cudart.cudaGetErrorString(err)[1].decode()
        except Exception:  # noqa: BLE001 - the message is a courtesy
            text = str(err)
        raise TrtUnavailableError(f"{what} failed: {getattr(err, 'name', err)} ({text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def compute_capability(device: int = 0) -> str:
    """"major.minor" of CUDA device ``device`` (e.g. "8.7" on Jetson Orin, "9.0" on H100/H200)."""
    cudart = load_cudart()
    attr = cudart.cudaDeviceAttr
    major = cuda_check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device),
                       "reading the GPU compute capability (is there a CUDA GPU and driver?)")
    minor = cuda_check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device),
                       "reading the GPU compute capability")
    return f"{int(major)}.{int(minor)}"


def device_compute_capability(device: int = 0) -> str | None:
    """Like :func:`compute_capability`, but None when there is no usable GPU (for compatibility messages)."""
    try:
        return compute_capability(device)
    except TrtUnavailableError:
        return None
