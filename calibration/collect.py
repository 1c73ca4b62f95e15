"""Collect activation ranges of an FP32 engine dir by running real requests through the ORT backend.

Step 1 (record): the generator runs each calibration request (tile + instruction, the expert forced) through a
recording wrapper around :class:`~rsvlm_edge.backends.ort_backend.OrtBackend`; it keeps the exact feeds of the
vision encoder (stem outputs, or the RGB of models without stems) and of every decoder call (prefill and the
first decode steps, with their KV cache).
Step 2 (measure): each component's graph, with the tensors to quantize added as outputs, runs on those feeds
(``amax`` pass, then a histogram pass for percentile / entropy). The augmented graph is loaded from bytes and
its weights are fed as memory-mapped initializers, so no weight is copied or parsed into a protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from rsvlm_edge.calibration.qdq import activation_tensors
from rsvlm_edge.calibration.ranges import RangeObserver
from rsvlm_edge.manifest import KV_LAYOUT_SHARED, Manifest, encoder_input

Feeds = dict[str, np.ndarray]


@dataclass
class Recording:
    """Feeds per component name, in call order."""

    feeds: dict[str, list[Feeds]] = field(default_factory=dict)

    def add(self, component: str, feeds: Feeds) -> None:
        self.feeds.setdefault(component, []).append(feeds)


class RecordingBackend:
    """Delegates to an OrtBackend and records component feeds (first ``decode_steps`` decode calls per cache)."""

    def __init__(self, inner, recording: Recording, decode_steps: int = 4):
        self.inner, self.recording, self.decode_steps = inner, recording, decode_steps
        self.config = inner.config
        self._calls: dict[int, int] = {}

    def reset(self) -> None:
        """Start counting decode steps afresh (call before each request)."""
        self._calls.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_images(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        encoder_pixels = np.ascontiguousarray(pixels, np.float32)
        if self.config.vision_stems:  # models without stems feed the preprocessed RGB to the encoder itself
            encoder_pixels = self.inner._session(f"vision_stem_{sensor}").run(None, {"pixels": encoder_pixels})[0]
        self.recording.add("vision_encoder", {encoder_input(self.config): encoder_pixels})
        return self.inner.encode_images(pixels, sensor)

    def forward(self, cache, embeds, position_ids, attention_mask):
        calls = self._calls.get(id(cache), 0)
        if calls <= self.decode_steps:
            start = cache.length
            feeds: Feeds = {"inputs_embeds": np.array(embeds, np.float32), "position_ids": np.array(position_ids, np.int32),
                            "attention_mask": np.array(attention_mask, np.float32)}
            for i, (k, v) in enumerate(zip(cache.state.keys, cache.state.values)):
                if cache.state.layout == KV_LAYOUT_SHARED:  # (B, kv, capacity, hd) -> the exported (P, B, kv, hd)
                    k, v = k[:, :, :start].transpose(2, 0, 1, 3), v[:, :, :start].transpose(2, 0, 1, 3)
                feeds[f"past_key_{i}"] = np.array(k[:start])
                feeds[f"past_value_{i}"] = np.array(v[:start])
            self.recording.add(self.inner.experts.components[cache.expert], feeds)
        self._calls[id(cache)] = calls + 1
        return self.inner.forward(cache, embeds, position_ids, attention_mask)


def record(engine_dir: str | Path, requests: list, decode_steps: int = 4, threads: int | None = None,
           progress: Callable[[int], None] | None = None) -> Recording:
    """Run ``requests`` greedily (``decode_steps`` new tokens) and return the recorded feeds."""
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.generation import Generator
    from rsvlm_edge.pipeline import load_tokenizer
    from rsvlm_edge.sampling import SamplingConfig

    recording = Recording()
    backend = OrtBackend.from_dir(engine_dir, threads=threads, verify="size")
    try:
        recorder = RecordingBackend(backend, recording, decode_steps)
        gen = Generator(recorder, load_tokenizer(engine_dir, backend.config.prompt_template))  # type: ignore[arg-type]
        sampling = SamplingConfig(max_new_tokens=decode_steps + 1, ignore_stop=True)
        for request in requests:
            recorder.reset()
            gen.generate([request], sampling)
            if progress:
                progress(1)
    finally:
        backend.close()
    return recording


def external_arrays(directory: Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Zero-copy (memory-mapped) arrays of every external initializer of ``model``, its files in ``directory`` (the
    model file's folder: ONNX resolves external data locations against it)."""
    maps: dict[str, np.memmap] = {}
    out = {}
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        location = info["location"]
        if location not in maps:
            path = Path(directory) / location
            if not path.resolve().is_relative_to(Path(directory).resolve()):
                raise ValueError(f"{init.name}: its data file {location!r} lies outside {directory}")
            maps[location] = np.memmap(path, dtype=np.uint8, mode="r")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        count = int(np.prod(init.dims, dtype=np.int64))
        offset = int(info.get("offset", 0))
        out[init.name] = np.ndarray(tuple(init.dims), dtype=dtype, buffer=maps[location], offset=offset)
        if offset + count * dtype.itemsize > maps[location].size:
            raise ValueError(f"{init.name} lies beyond the end of {location} (truncated file?)")
    return out


def session_with_outputs(manifest: Manifest, component: str, tensors: list[str], threads: int | None):
    """A session of ``component`` whose outputs are ``tensors``; weights are fed from memory-mapped files."""
    import onnxruntime as ort

    comp = manifest.component(component)
    path = manifest.path(comp.file)
    model = onnx.load(str(path), load_external_data=False)
    arrays = external_arrays(path.parent, model)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # measure the tensors as named
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
    for name, value in zip(arrays, values):
        so.add_initializer(name, value)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(manifest.directory))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session, values


def measure(engine_dir: str | Path, recording: Recording, method: str, keep_fp32: Callable | None = None,
            threads: int | None = None, percentile: float = 99.99,
            progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """component -> {tensor: amax} for every recorded component, ``method`` one of entropy / percentile / minmax."""
    manifest = Manifest.load(engine_dir, verify=False)
    table: dict[str, dict[str, float]] = {}
    for component, feeds in sorted(recording.feeds.items()):
        comp = manifest.component(component)
        model = onnx.load(str(manifest.path(comp.file)), load_external_data=False)
        tensors = activation_tensors(model, keep_fp32)
        if not tensors:
            continue
        session, _values = session_with_outputs(manifest, component, tensors, threads)
        names = {i.name for i in session.get_inputs()}
        observer = RangeObserver()
        passes = [observer.observe_max] if method == "minmax" else [observer.observe_max, observer.observe_hist]
        for observe in passes:
            for feed in feeds:
                outs = session.run(tensors, {k: v for k, v in feed.items() if k in names})
                for name, value in zip(tensors, outs):
                    observe(name, value)
                if progress:
                    progress(1)
        table[component] = observer.thresholds(method, percentile)
        del session
    return table
