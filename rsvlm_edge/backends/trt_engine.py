"""One deserialized TensorRT plan: an execution context per optimization profile, name-based IO (TensorRT >= 8.5).

A profile can serve one context at a time, so each profile gets its own context (made once; switching is then
free). Calls bind device addresses by tensor name (``set_input_shape`` / ``set_tensor_address``) and enqueue with
``execute_async_v3`` on the backend's stream. :meth:`TrtEngine.run_host` is the numpy-in/numpy-out path the small
components use; the decoder binds its KV cache buffers directly (see :mod:`~rsvlm_edge.backends.trt_backend`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.backends.cuda_mem import DeviceBuffer, Stream, copy_to_device, copy_to_host
from rsvlm_edge.backends.trt_env import LazyModule, load_tensorrt
from rsvlm_edge.backends.trt_shapes import ProfileRange, read_profiles
from rsvlm_edge.manifest import Component

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = LazyModule(load_tensorrt)


class TrtEngine:
    def __init__(self, logger: trt.ILogger, plan: Path, component: Component, stream: Stream):
        self.component, self.stream = component, stream
        self.runtime = trt.Runtime(logger)  # kept: it must outlive its engines on older TensorRT versions
        engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} cannot deserialize {plan} (built by another version or "
                               f"for another GPU?); rebuild the plans on this device")
        self.engine: trt.ICudaEngine | None = engine
        self.nbytes = plan.stat().st_size
        self.profiles: list[ProfileRange] = read_profiles(component)
        if engine.num_optimization_profiles != len(self.profiles):
            raise BackendError(f"{plan} has {engine.num_optimization_profiles} optimization profiles but the manifest "
                               f"records {len(self.profiles)}; rebuild the plans")
        self.contexts: list[trt.IExecutionContext] = []
        for index in range(len(self.profiles)):
            context = engine.create_execution_context()
            if context is None:
                raise BackendError(f"cannot create a TensorRT execution context for {component.name} (out of GPU memory?)")
            if not context.set_optimization_profile_async(index, int(stream)):
                raise BackendError(f"cannot select optimization profile {index} of {component.name}")
            self.contexts.append(context)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers: dict[str, DeviceBuffer] = {}

    # ------------------------------------------------------------------ binding
    def bind(self, profile: int, inputs: dict[str, tuple[int, tuple[int, ...]]], outputs: dict[str, int]) -> trt.IExecutionContext:
        """Set every input's shape and address and every output's address in ``profile``'s context."""
        context = self.contexts[profile]
        for name, (ptr, shape) in inputs.items():
            if not context.set_input_shape(name, shape):
                raise BackendError(f"{self.component.name}: shape {shape} of {name} is outside optimization profile "
                                   f"{self.profiles[profile].name}")
            context.set_tensor_address(name, ptr)
        for name, ptr in outputs.items():
            context.set_tensor_address(name, ptr)
        return context

    def output_shape(self, profile: int, name: str) -> tuple[int, ...]:
        """An output's shape once the inputs' shapes are set (TensorRT infers it)."""
        dims = self.contexts[profile].get_tensor_shape(name)
        return tuple(int(dims[i]) for i in range(len(dims)))

    def execute(self, profile: int) -> None:
        if not self.contexts[profile].execute_async_v3(int(self.stream)):
            raise BackendError(f"TensorRT failed to run {self.component.name} (see the TensorRT log)")

    def buffer(self, name: str, nbytes: int) -> int:
        """A growable device buffer per tensor name (reused across calls)."""
        return self.buffers.setdefault(name, DeviceBuffer()).reserve(nbytes)

    # ------------------------------------------------------------------ numpy path
    def run_host(self, profile: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy ``feeds`` in, run ``profile``, copy every output out (synchronous)."""
        arrays = {n: np.ascontiguousarray(a, dtype=self.dtypes[n]) for n, a in feeds.items()}
        inputs = {}
        for name, array in arrays.items():
            ptr = self.buffer(name, array.nbytes)
            copy_to_device(ptr, array, self.stream)
            inputs[name] = (ptr, tuple(array.shape))
        self.bind(profile, inputs, {})
        results, outputs = {}, {}
        for name in self.outputs:
            results[name] = np.empty(self.output_shape(profile, name), dtype=self.dtypes[name])
            outputs[name] = self.buffer(name, results[name].nbytes)
        self.bind(profile, {}, outputs)
        self.execute(profile)
        for name, array in results.items():
            copy_to_host(array, outputs[name], self.stream)
        self.stream.synchronize()
        return results

    def close(self) -> None:
        self.stream.synchronize()
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()
        self.contexts.clear()
        self.engine = None
