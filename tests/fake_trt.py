"""Stand-ins for ``tensorrt`` and cuda-python's runtime, so the TensorRT build and backend code runs on a CPU.

Only what rsvlm-edge calls is modelled, with TensorRT's semantics where they matter to the caller:

* the builder records flags, memory limits and profiles, and its "plan" is a JSON note of them plus the ONNX path;
* an execution context refuses input shapes outside its profile, reads inputs from and writes outputs to the raw
  addresses bound with ``set_tensor_address`` (run through ONNX Runtime on the source graph), so the backend's
  binding, in-place KV cache writes and call splitting are exercised for real;
* "device memory" is host memory (``cudaMalloc`` hands out numpy buffers' addresses, copies are ``memmove``).

It cannot tell whether real TensorRT accepts the graphs or how fast plans run: that needs a GPU
(``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import ctypes
import json
import types
from typing import Any

import numpy as np

BUILDS: list[dict] = []  # every build_serialized_network call: {"onnx", "flags", "profiles", "workspace", ...}


# ----------------------------------------------------------------------------------------------- cuda runtime
def make_cudart(major: int = 9, minor: int = 0) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    memory: dict[int, np.ndarray] = {}
    rt.allocations = memory  # type: ignore[attr-defined]
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,  # type: ignore[attr-defined]
                                              cudaMemcpyDeviceToDevice=3)
    rt.cudaDeviceAttr = types.SimpleNamespace(cudaDevAttrComputeCapabilityMajor="major",  # type: ignore[attr-defined]
                                              cudaDevAttrComputeCapabilityMinor="minor")

    def malloc(nbytes):
        buf = np.zeros(int(nbytes), dtype=np.uint8)
        memory[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def free(ptr):
        memory.pop(int(ptr))
        return (0,)

    def memcpy(dst, src, nbytes, kind, stream):
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (0,)

    rt.cudaMalloc = malloc  # type: ignore[attr-defined]
    rt.cudaFree = free  # type: ignore[attr-defined]
    rt.cudaMemcpyAsync = memcpy  # type: ignore[attr-defined]
    rt.cudaStreamCreate = lambda: (0, 7)  # type: ignore[attr-defined]
    rt.cudaStreamSynchronize = lambda s: (0,)  # type: ignore[attr-defined]
    rt.cudaStreamDestroy = lambda s: (0,)  # type: ignore[attr-defined]
    rt.cudaSetDevice = lambda d: (0,)  # type: ignore[attr-defined]
    rt.cudaDeviceGetAttribute = lambda attr, dev: (0, major if attr == "major" else minor)  # type: ignore[attr-defined]
    rt.cudaGetErrorString = lambda err: (0, b"fake error")  # type: ignore[attr-defined]
    return rt


# ----------------------------------------------------------------------------------------------- builder side
class Logger:
    WARNING = "warning"

    def __init__(self, severity: Any = None):
        self.severity = severity


class _Tensor:
    def __init__(self, name: str):
        self.name = name


class Network:
    def __init__(self, flags: int):
        self.flags, self.inputs, self.onnx = flags, [], None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return _Tensor(self.inputs[i])


class OnnxParser:
    def __init__(self, network: Network, logger: Logger):
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path, load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        self.network.inputs = [i.name for i in model.graph.input if i.name not in inits]
        self.network.onnx = path
        return True

    def get_error(self, i: int) -> str:  # pragma: no cover - parse never fails here
        return ""


class Profile:
    def __init__(self):
        self.shapes: dict[str, list] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class TimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"+"  # grows by one byte per save, so tests see it was loaded and written


class Config:
    def __init__(self):
        self.flags, self.profiles, self.pools, self.timing_cache = [], [], {}, None
        self.int8_calibrator = None
        self.default_device_type = None
        self.DLA_core = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.append(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache

    def set_calibration_profile(self, profile):
        return True


class Builder:
    num_DLA_cores = 0

    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> Network:
        return Network(flags)

    def create_builder_config(self) -> Config:
        return Config()

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: Config) -> bytes:
        note = {"onnx": network.onnx, "network_flags": network.flags, "flags": list(config.flags),
                "profiles": [p.shapes for p in config.profiles], "workspace": config.pools.get("workspace"),
                "calibrator": config.int8_calibrator is not None, "dla_core": config.DLA_core,
                "optimization_level": config.builder_optimization_level,
                "timing_cache": config.timing_cache is not None}
        BUILDS.append(note)
        return json.dumps(note).encode()


class IInt8EntropyCalibrator2:
    def __init__(self):
        pass


# ----------------------------------------------------------------------------------------------- runtime side
def _read(ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _write(ptr: int, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if array.nbytes:
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)


class Context:
    def __init__(self, engine: "Engine"):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
        self.runs = 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return 0 <= index < len(self.engine.profiles)

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.profiles[self.profile][name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(not (a <= d <= b) for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = int(ptr)
        return True

    def _outputs(self) -> dict[str, np.ndarray]:
        feeds = {n: _read(self.addresses[n], self.engine.dtypes[n], self.shapes[n]) for n in self.engine.inputs}
        values = self.engine.session.run(None, feeds)
        return dict(zip(self.engine.outputs, values))

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._outputs()[name].shape)

    def execute_async_v3(self, stream: int) -> bool:
        for name, value in self._outputs().items():
            _write(self.addresses[name], value.astype(self.engine.dtypes[name]))
        self.runs += 1
        return True


class Engine:
    def __init__(self, note: dict):
        import onnxruntime as ort

        self.note = note
        self.profiles = note["profiles"]
        self.session = ort.InferenceSession(note["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        types_ = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
                  "tensor(int64)": np.int64}
        self.dtypes = {i.name: np.dtype(types_[i.type]) for i in self.session.get_inputs() + self.session.get_outputs()}
        self.contexts: list[Context] = []

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i: int) -> str:
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name in self.inputs else "output"

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.dtypes[name]

    def create_execution_context(self) -> Context:
        self.contexts.append(Context(self))
        return self.contexts[-1]


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> Engine:
        return Engine(json.loads(bytes(data)))


def make_tensorrt(version: str = "10.3.0") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    for name, value in {
        "__version__": version, "Logger": Logger, "Builder": Builder, "OnnxParser": OnnxParser, "Runtime": Runtime,
        "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2, "Dims": list, "nptype": np.dtype,
        "NetworkDefinitionCreationFlag": types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1),
        "BuilderFlag": types.SimpleNamespace(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK"),
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE="workspace"),
        "DeviceType": types.SimpleNamespace(DLA="dla", GPU="gpu"),
        "TensorIOMode": types.SimpleNamespace(INPUT="input", OUTPUT="output"),
    }.items():
        setattr(trt, name, value)
    return trt
