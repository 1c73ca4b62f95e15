"""Device memory and a stream through cuda-python: what the TensorRT backend binds with ``set_tensor_address``.

Kept deliberately small (NVIDIA's own samples moved from pycuda to cuda-python): a growable device buffer,
one stream, and host<->device copies from/into numpy arrays. Copies are asynchronous on the stream; callers
:meth:`Stream.synchronize` before reading a host array a copy writes into.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsvlm_edge.backends.trt_env import cuda_check, load_cudart

#: set_tensor_address wants (at least) this alignment; cudaMalloc returns 256-byte aligned pointers.
ALIGNMENT = 256


class Stream:
    """One CUDA stream; every copy and ``execute_async_v3`` of a backend runs on it, in order."""

    def __init__(self) -> None:
        self.cudart = load_cudart()
        self.handle = cuda_check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        cuda_check(self.cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            cuda_check(self.cudart.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc), freed by :meth:`free`; :meth:`reserve` grows it when needed."""

    def __init__(self, nbytes: int = 0) -> None:
        self.cudart = load_cudart()
        self.ptr = 0
        self.nbytes = 0
        if nbytes:
            self.reserve(nbytes)

    def reserve(self, nbytes: int) -> int:
        """Make the buffer at least ``nbytes`` large (contents are not kept); return its address."""
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(cuda_check(self.cudart.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes:,} bytes)"))
            self.nbytes = int(nbytes)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            cuda_check(self.cudart.cudaFree(self.ptr), "cudaFree")
        self.ptr, self.nbytes = 0, 0


def _kind(cudart: Any, name: str) -> Any:
    return getattr(cudart.cudaMemcpyKind, name)


def copy_to_device(dst: int, array: np.ndarray, stream: Stream) -> None:
    """Queue a host -> device copy of a C-contiguous array (keep ``array`` alive until the stream syncs)."""
    if array.nbytes:
        cuda_check(stream.cudart.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes,
                                                 _kind(stream.cudart, "cudaMemcpyHostToDevice"), stream.handle),
                   "cudaMemcpyAsync host->device")


def copy_to_host(array: np.ndarray, src: int, stream: Stream) -> None:
    """Queue a device -> host copy into a C-contiguous array (valid after ``stream.synchronize()``)."""
    if array.nbytes:
        cuda_check(stream.cudart.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes,
                                                 _kind(stream.cudart, "cudaMemcpyDeviceToHost"), stream.handle),
                   "cudaMemcpyAsync device->host")


def copy_on_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    if nbytes:
        cuda_check(stream.cudart.cudaMemcpyAsync(dst, src, nbytes, _kind(stream.cudart, "cudaMemcpyDeviceToDevice"),
                                                 stream.handle), "cudaMemcpyAsync device->device")
