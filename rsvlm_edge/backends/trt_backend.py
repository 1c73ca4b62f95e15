"""TensorRT backend: runs the plans ``rsvlm_edge.engines.trt_build`` writes, torch-free (numpy + tensorrt + cuda-python).

* Loading refuses, with a message saying what to do, a directory of ONNX graphs, a missing TensorRT/cuda-python,
  and plans built for another TensorRT version or GPU (:func:`~rsvlm_edge.manifest.check_engine_compat`), before
  TensorRT ever sees a plan.
* Components are :class:`~rsvlm_edge.backends.trt_engine.TrtEngine` objects made on first use. Decoder plans
  (one per expert, each holding the trunk) go through :class:`~rsvlm_edge.expert_cache.ExpertCache`: a byte budget
  over plan sizes decides which stay deserialized; ``prefetch_expert`` deserializes the routed one on a worker
  thread while the vision encoder runs.
* KV cache: per layer, K and V device buffers of (capacity, B, kv_heads, head_dim), allocated once per cache. A
  step binds ``past_key_i`` to the buffer's first ``length`` rows (sequence-major, so a contiguous prefix) and
  ``new_key_i`` to the rows right after it, so TensorRT writes the new entries in place; only when those rows are
  not 256-byte aligned does it write to a scratch buffer that is then copied on the device.
* Calls a profile does not cover are split (:mod:`~rsvlm_edge.backends.trt_shapes`), e.g. a chat turn appended
  to a filled cache runs token by token through the decode profile.
* Threads: the stream, each engine's bindings and device buffers and the scratch buffers belong to the backend,
  not to a request, so every call takes :attr:`Backend.lock`; a decoder step holds its expert in the cache, so a
  prefetch on the worker thread never closes the engine a step runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rsvlm_edge.backends.base import Backend, BackendError, CacheHandle
from rsvlm_edge.backends.cuda_mem import ALIGNMENT, DeviceBuffer, Stream, copy_on_device, copy_to_device, copy_to_host
from rsvlm_edge.backends.trt_engine import TrtEngine
from rsvlm_edge.backends.trt_env import LazyModule, cuda_check, device_compute_capability, load_cudart, load_tensorrt
from rsvlm_edge.backends.trt_shapes import ShapeError, batch_chunks, decoder_steps
from rsvlm_edge.manifest import (
    DENSE_COMPONENT,
    DENSE_OUTPUTS,
    HIDDEN_STATES,
    POINTER_COMPONENT,
    Component,
    EngineCompatError,
    Manifest,
    ManifestError,
    Verify,
    check_engine_compat,
    encoder_input,
)

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = LazyModule(load_tensorrt)

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


@dataclass
class DeviceKV:
    """Per-layer K and V device buffers, each (capacity, B, kv_heads, head_dim); freed with the cache."""

    keys: list[DeviceBuffer]
    values: list[DeviceBuffer]
    row_bytes: int  # bytes of one sequence position (B * kv_heads * head_dim * itemsize)

    def free(self) -> None:
        for buf in self.keys + self.values:
            buf.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_manifest(model_dir: str | Path, verify: Verify) -> Manifest:
    try:
        manifest = Manifest.load(model_dir, verify=verify)
    except ManifestError as exc:
        raise BackendError(f"cannot use {model_dir} with the trt backend: {exc}") from None
    if manifest.engine_kind != "tensorrt":
        raise BackendError(f"{model_dir} holds {manifest.engine_kind} graphs, not TensorRT plans: build plans with "
                           f"rsvlm_edge.engines.trt_build (`rsvlm-edge build`) or use --backend ort")
    return manifest


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, manifest: Manifest, device: int = 0, expert_budget_experts: int | None = None,
                 expert_budget_bytes: int | None = None, pinned_experts: Sequence[int] = ()):
        from rsvlm_edge.expert_cache import ExpertCache

        try:
            config = manifest.config()
        except ManifestError as exc:
            raise BackendError(str(exc)) from None
        super().__init__(config)
        load_tensorrt()  # TrtUnavailableError (a BackendError) with an install hint
        self.cudart = load_cudart()
        self.device = device
        self.compute_capability = device_compute_capability(device)
        try:
            check_engine_compat(manifest, str(trt.__version__), self.compute_capability)
        except EngineCompatError as exc:
            raise BackendError(str(exc)) from None
        cuda_check(self.cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        self.manifest = manifest
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.stream = Stream()
        self._engines: dict[str, TrtEngine] = {}
        self._lock = threading.Lock()
        self.decoders = manifest.experts.decoders
        if not self.decoders:
            raise BackendError(f"{manifest.directory}: the manifest lists no decoder experts; rebuild the plans")
        budget = expert_budget_bytes
        if expert_budget_experts is not None:
            if expert_budget_experts < 1:
                raise BackendError("the expert budget must allow at least one expert")
            budget = expert_budget_experts * max(self._plan_bytes(e) for e in range(len(self.decoders)))
        self.expert_cache = ExpertCache(self._load_expert, budget_bytes=budget, pinned=tuple(pinned_experts),
                                        on_evict=lambda _e, engine: engine.close(), size_of=self._plan_bytes)
        self._scratch: dict[str, DeviceBuffer] = {}
        self._pointer = manifest.has_box_pointer()
        self._dense = manifest.has_dense_heads()

    @classmethod
    def from_dir(cls, model_dir: str | Path, verify: Verify = "size", device: int = 0,
                 expert_budget_experts: int | None = None, expert_budget_bytes: int | None = None,
                 pinned_experts: Sequence[int] = (), threads: int | None = None) -> "TrtBackend":
        """Open a TensorRT engine directory. ``verify``: "size" (default; plans are large), True (sha256), False.

        ``threads`` is accepted (and ignored) so CLI options shared with the ort backend pass through.
        """
        return cls(open_manifest(model_dir, verify), device=device, expert_budget_experts=expert_budget_experts,
                   expert_budget_bytes=expert_budget_bytes, pinned_experts=pinned_experts)

    # ------------------------------------------------------------------ engines
    def _component(self, name: str) -> Component:
        try:
            return self.manifest.component(name)
        except ManifestError as exc:
            raise BackendError(str(exc)) from None

    def _open(self, name: str) -> TrtEngine:
        comp = self._component(name)
        return TrtEngine(self.logger, self.manifest.path(comp.file), comp, self.stream)

    def _engine(self, name: str) -> TrtEngine:
        with self._lock:
            if name not in self._engines:
                self._engines[name] = self._open(name)
            return self._engines[name]

    def _decoder_name(self, expert: int) -> str:
        if not 0 <= expert < len(self.decoders):
            raise BackendError(f"expert {expert} does not exist (this model has {len(self.decoders)})")
        return self.decoders[expert]

    def _plan_bytes(self, expert: int) -> int:
        comp = self._component(self._decoder_name(expert))
        return int(self.manifest.path(comp.file).stat().st_size)

    def _load_expert(self, expert: int) -> tuple[TrtEngine, int]:
        cuda_check(self.cudart.cudaSetDevice(self.device), "cudaSetDevice")  # the prefetch thread needs it too
        engine = self._open(self._decoder_name(expert))
        return engine, engine.nbytes

    def _run(self, name: str, feeds: dict[str, np.ndarray], batch_axis: dict[str, int] | None = None) -> np.ndarray:
        """Run a single-output component from numpy, in batch chunks its profiles cover."""
        engine = self._engine(name)
        comp = engine.component
        axes = batch_axis or {}
        batch = next(iter(feeds.values())).shape[0]
        try:
            pieces = batch_chunks(comp, engine.profiles, batch, axes)
        except ShapeError as exc:
            raise BackendError(str(exc)) from None
        outs = [engine.run_host(p, {k: v[a:b] for k, v in feeds.items()})[engine.outputs[0]] for a, b, p in pieces]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    # ------------------------------------------------------------------ Backend interface
    def encode_images(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        with self.lock:
            return self._encode_images(pixels, sensor)

    def _encode_images(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        pixels = self.check_pixels(pixels, sensor)
        if self.config.vision_stems:
            pixels = self._run(f"vision_stem_{sensor}", {"pixels": pixels})
        return self._run("vision_encoder", {encoder_input(self.config): pixels})

    def embed(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        with self.lock:
            return self._run("embedding", {"input_ids": ids}, {"seq": ids.shape[1]})

    def route(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.check_router()
        with self.lock:
            return self._run("router", {"embeds": embeds, "mask": mask}, {"seq": embeds.shape[1]})

    def new_cache(self, batch: int, capacity: int, expert: int) -> CacheHandle:
        comp = self._component(self._decoder_name(expert))
        cfg = self.config
        itemsize = np.dtype(NP_DTYPES[comp.input("past_key_0").dtype]).itemsize
        row = batch * cfg.num_kv_heads * cfg.head_dim * itemsize
        state = DeviceKV(keys=[DeviceBuffer(capacity * row) for _ in range(cfg.num_layers)],
                         values=[DeviceBuffer(capacity * row) for _ in range(cfg.num_layers)], row_bytes=row)
        return CacheHandle(batch=batch, capacity=capacity, expert=expert, state=state)

    @property
    def has_box_pointer(self) -> bool:
        return self._pointer

    def point(self, query: np.ndarray, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_box_pointer:
            return super().point(query, patches)
        engine = self._engine(POINTER_COMPONENT)
        try:
            pieces = batch_chunks(engine.component, engine.profiles, query.shape[0], {})
        except ShapeError as exc:
            raise BackendError(str(exc)) from None
        with self.lock:
            outs = [engine.run_host(p, {"query": query[a:b], "patches": patches[a:b]}) for a, b, p in pieces]
        return tuple(np.concatenate([o[name] for o in outs]).astype(np.float32, copy=False)  # type: ignore[return-value]
                     for name in ("scores", "boxes"))

    @property
    def has_dense_heads(self) -> bool:
        return self._dense

    def dense(self, query: np.ndarray, patches: np.ndarray, patches_after: np.ndarray) -> dict[str, np.ndarray]:
        if not self._dense:
            return super().dense(query, patches, patches_after)
        engine = self._engine(DENSE_COMPONENT)
        try:
            pieces = batch_chunks(engine.component, engine.profiles, query.shape[0], {})
        except ShapeError as exc:
            raise BackendError(str(exc)) from None
        feeds = {"query": query, "patches": patches, "patches_after": patches_after}
        with self.lock:
            outs = [engine.run_host(p, {k: np.ascontiguousarray(v[a:b], dtype=np.float32) for k, v in feeds.items()})
                    for a, b, p in pieces]
        return {name: np.concatenate([o[name] for o in outs]).astype(np.float32, copy=False) for name in DENSE_OUTPUTS}

    def _forward(self, cache: CacheHandle, embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        b, s, start = cache.check_step(embeds, attention_mask)
        with self.lock, self.expert_cache.hold(cache.expert) as engine:  # never closed while it runs
            return self._decode(engine, cache, embeds, position_ids, attention_mask, b, s, start, hidden)

    def _decode(self, engine: TrtEngine, cache: CacheHandle, embeds, position_ids, attention_mask, b: int, s: int,
                start: int, hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        if engine.dtypes["past_key_0"].itemsize * b * cfg.num_kv_heads * cfg.head_dim != cache.state.row_bytes:
            raise BackendError(f"{engine.component.name} keeps its KV cache in {engine.dtypes['past_key_0']}, not the "
                               f"manifest's {engine.component.input('past_key_0').dtype}; rebuild the plans")
        try:
            steps = decoder_steps(engine.component, engine.profiles, b, start, s)
        except ShapeError as exc:
            raise BackendError(str(exc)) from None
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=engine.dtypes["inputs_embeds"]),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=engine.dtypes["position_ids"]),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=engine.dtypes["attention_mask"])}
        logits = np.empty((b, self.config.vocab_size), dtype=engine.dtypes["logits"])
        keep: list[dict[str, np.ndarray]] = []  # host chunks stay alive until the stream is synchronized
        states: list[np.ndarray] = []  # per chunk, its positions' hidden states (when asked for)
        for offset, length, profile in steps:
            past = start + offset
            chunk = {"inputs_embeds": np.ascontiguousarray(feeds["inputs_embeds"][:, offset:offset + length]),
                     "position_ids": np.ascontiguousarray(feeds["position_ids"][:, offset:offset + length]),
                     "attention_mask": np.ascontiguousarray(feeds["attention_mask"][:, :past + length])}
            keep.append(chunk)
            self._step(engine, profile, cache.state, chunk, past, length, b)
            if hidden:  # the next chunk reuses the device buffer: the stream orders this copy before it
                states.append(np.empty((b, length, cfg.hidden_size), dtype=engine.dtypes[HIDDEN_STATES]))
                copy_to_host(states[-1], engine.buffer(HIDDEN_STATES, states[-1].nbytes), self.stream)
        copy_to_host(logits, engine.buffer("logits", logits.nbytes), self.stream)
        self.stream.synchronize()
        cache.length += s
        joined = np.concatenate(states, axis=1).astype(np.float32, copy=False) if hidden else None
        return logits.astype(np.float32, copy=False), joined

    def _step(self, engine: TrtEngine, profile: int, kv: DeviceKV, chunk: dict[str, np.ndarray], past: int,
              length: int, batch: int) -> None:
        """One decoder call: ``length`` new positions after ``past`` cached ones, K/V written into the cache."""
        cfg = self.config
        inputs = {}
        for name, array in chunk.items():
            ptr = engine.buffer(name, array.nbytes)
            copy_to_device(ptr, array, self.stream)
            inputs[name] = (ptr, tuple(array.shape))
        kv_shape = (cfg.num_kv_heads, cfg.head_dim)
        outputs = {"logits": engine.buffer("logits", batch * cfg.vocab_size * engine.dtypes["logits"].itemsize)}
        if HIDDEN_STATES in engine.dtypes:  # pointer models: TensorRT needs every output bound, wanted or not
            outputs[HIDDEN_STATES] = engine.buffer(
                HIDDEN_STATES, batch * length * cfg.hidden_size * engine.dtypes[HIDDEN_STATES].itemsize)
        copies = []
        offset_bytes, new_bytes = past * kv.row_bytes, length * kv.row_bytes
        for i in range(cfg.num_layers):
            for kind, bufs in (("key", kv.keys), ("value", kv.values)):
                base = bufs[i].ptr
                inputs[f"past_{kind}_{i}"] = (base, (past, batch) + kv_shape)
                target = base + offset_bytes
                if target % ALIGNMENT:  # TensorRT wants aligned output addresses: write aside, then copy in place
                    scratch = self._scratch.setdefault(f"new_{kind}_{i}", DeviceBuffer()).reserve(new_bytes)
                    copies.append((target, scratch))
                    target = scratch
                outputs[f"new_{kind}_{i}"] = target
        engine.bind(profile, inputs, outputs)
        engine.execute(profile)
        for dst, src in copies:
            copy_on_device(dst, src, new_bytes, self.stream)

    def prefetch_expert(self, expert: int) -> None:
        self._decoder_name(expert)
        self.expert_cache.prefetch(expert)

    def stats(self) -> dict[str, Any]:
        out = dict(self.expert_cache.stats.as_dict())
        out["trt_version"] = str(trt.__version__)
        out["compute_capability"] = self.compute_capability
        out["engines_loaded"] = sorted(self._engines)
        return out

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        self.expert_cache.close()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        for buf in self._scratch.values():
            buf.free()
        self._scratch.clear()
        self.stream.close()
