"""ONNX Runtime backend: runs an exported engine directory without torch (numpy + onnxruntime only).

* Components come from ``manifest.json`` (verified on load): one stem session per sensor (created on first use),
  the shared vision encoder, the embedding and the router.
* Decoder: one session per *resident* expert. All expert graphs reference the same ``decoder_trunk.bin``. Where
  the session reads the weights as stored (FP32/FP16), the trunk is memory-mapped once and its tensors are handed
  to every expert session, so switching experts never re-reads or duplicates the trunk; an expert's own FFN
  weights are read from ``decoder_expert<e>.bin`` into memory by :class:`ExpertLoader`. The arrays are registered
  with ``SessionOptions.add_initializer`` (user-owned memory that ORT uses in place; ``add_external_initializers``
  would copy them). Where the session prepacks its weights (INT8/INT4 decoders), it keeps its own packed copy of
  every weight anyway, so ORT reads the graph's external data itself and releases what it read once packed:
  handing it the mapped trunk would keep every page it packed from resident beside the packed copy
  (docs/benchmarks.md, "Memory").
  :class:`~rsvlm_edge.expert_cache.ExpertCache` decides which experts stay resident (byte budget, LRU).
  Weight prepacking is off for FP32/FP16 decoder sessions: it makes a
  packed copy of every weight per session, i.e. the trunk once per expert (measured on rsunivlm-1b: +1.9 GB per
  expert session for ~10% faster CPU decoding); it is on for INT8 and INT4 decoders, whose integer GEMM would otherwise
  repack the weights on every call. ``prepack_weights`` overrides either way.
* KV cache: :meth:`new_cache` preallocates, per layer, K and V buffers of shape (capacity, B, kv_heads, head_dim).
  :meth:`forward` binds ``buffer[:length]`` (a contiguous, zero-copy view: the layout is sequence-major) as the
  past inputs and binds ``buffer[length:length+S]`` as the ``new_key_i``/``new_value_i`` outputs, so ONNX Runtime
  writes this step's K/V straight into the cache: no per-step copy of the cache in Python.
  Decoders built with one ``GroupQueryAttention`` per layer (the weight-only INT8 build; the decoder component's
  ``kv_layout`` is ``bnsh-shared``) keep (B, kv_heads, capacity, head_dim) buffers instead, bound whole as both
  ``past_key_i`` and ``present_key_i``: the kernel writes the new rows at the current length and reads the prefix.
* Errors: a session's inputs and outputs are checked against the manifest when it is created, and ONNX Runtime's
  own errors (at creation or in a run) become :class:`BackendError` naming the component's file.
* Threads: see :class:`OrtBackend`.
* Start-up: the sessions a tile needs besides the decoder (vision encoder, stems, router, box pointer) are created
  by a background thread when the backend opens (``preload``), so the first tile does not wait for ONNX Runtime's
  graph optimization and weight packing; a call that arrives first waits for that session's creation only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsvlm_edge.backends.base import Backend, BackendError, CacheHandle
from rsvlm_edge.manifest import (
    DENSE_COMPONENT,
    DENSE_OUTPUTS,
    HIDDEN_STATES,
    KV_LAYOUT_SEQUENCE_MAJOR,
    KV_LAYOUT_SHARED,
    KV_LAYOUTS,
    POINTER_COMPONENT,
    Component,
    Manifest,
    ManifestError,
    TensorLayout,
    Verify,
    encoder_input,
)

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise BackendError(f"the ort backend needs onnxruntime: pip install onnxruntime ({exc})") from None
    return onnxruntime


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Names or aliases (cpu, cuda, tensorrt) -> ORT provider names, checked against what this onnxruntime has.

    CPU is always appended as the fallback for nodes other providers do not take.
    """
    ort = _ort()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    available = ort.get_available_providers()
    resolved = []
    for p in providers:
        name = PROVIDER_ALIASES.get(p.lower(), p)
        if name not in available:
            raise BackendError(f"execution provider {p!r} is not available in this onnxruntime "
                               f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT")
        if name not in resolved:
            resolved.append(name)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises from C++ (its pybind module's classes), plus the Python-side ones."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    native = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return native + (RuntimeError, ValueError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_session_io(session, comp: Component, path: Path) -> None:
    """The graph's inputs and outputs against what the manifest says (names, ranks, fixed sizes): a graph that does
    not match its manifest is refused at load, naming the file and the tensor, not deep inside a run."""
    for kind, specs, args in (("input", comp.inputs, session.get_inputs()), ("output", comp.outputs, session.get_outputs())):
        graph = {a.name: list(a.shape) for a in args}
        for spec in specs:
            if spec.name not in graph:
                raise BackendError(f"{path}: the graph has no {kind} {spec.name!r} (the manifest lists it; the graph "
                                   f"has {', '.join(sorted(graph))}): the manifest does not match the graph; re-export")
            shape = graph[spec.name]
            fixed = [(a, b) for a, b in zip(shape, spec.shape) if isinstance(a, int) and isinstance(b, int)]
            if len(shape) != len(spec.shape) or any(a != b for a, b in fixed):
                raise BackendError(f"{path}: {kind} {spec.name!r} has shape {shape} in the graph but {spec.shape} in "
                                   f"the manifest: the manifest does not match the graph; re-export the model")
        if kind == "input":
            missing = sorted(set(graph) - {t.name for t in specs})
            if missing:
                raise BackendError(f"{path}: the graph needs inputs the manifest does not list ({', '.join(missing)}); "
                                   f"re-export the model")


def tensor_views(buffer: np.ndarray, tensors: dict[str, TensorLayout]) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of the tensors laid out in ``buffer`` (uint8) per a manifest layout."""
    views = {}
    for name, t in tensors.items():
        dtype = np.dtype(t.dtype)
        count = int(np.prod(t.shape, dtype=np.int64))
        if t.offset + count * dtype.itemsize > buffer.size:
            raise BackendError(f"tensor {name} lies beyond the end of its data file (truncated file?)")
        views[name] = np.ndarray(tuple(t.shape), dtype=dtype, buffer=buffer, offset=t.offset)
    return views


@dataclass
class LoadedExpert:
    """One expert's decoder session and the arrays it reads (kept alive as long as the session)."""

    expert: int
    session: Any
    arrays: dict[str, np.ndarray]
    ort_values: list[Any]
    nbytes: int
    load_ms: float


#: Prompt positions per decoder run. ONNX Runtime's arena keeps its largest run's activations for the session's life
#: (rsunivlm-1b: about 125 MiB for a 742-token prompt in one run); chunks bound that, and the prefill got faster, not slower
#: (``python -m rsvlm_edge.bench.rss ENGINE --prefill-chunk N``, docs/benchmarks.md "Memory": 128 as fast as 256
#: and 19 MiB smaller; 64 slower).
PREFILL_CHUNK = 128


class ExpertLoader:
    """Builds decoder sessions for single experts over the shared, memory-mapped trunk.

    ``load(e) -> (LoadedExpert, bytes)`` is the loader signature of :class:`~rsvlm_edge.expert_cache.ExpertCache`.
    """

    def __init__(self, manifest: Manifest, make_options, providers: list[str], prepack: bool = False):
        self.manifest, self.make_options, self.providers, self.prepack = manifest, make_options, providers, prepack
        layout = manifest.experts
        if layout.trunk is None:
            raise BackendError(f"{manifest.directory}: the manifest has no decoder expert layout; re-export the model")
        missing = layout.lacking()
        if missing:
            raise BackendError(f"{manifest.directory}: the manifest's expert layout lacks {', '.join(missing)}; "
                               f"re-export the model")
        assert layout.expert_files is not None and layout.expert_tensors is not None  # lacking() checked both
        self.components = layout.decoders
        self.expert_tensors: dict[str, TensorLayout] = layout.expert_tensors
        self.expert_files: list[str] = layout.expert_files
        try:  # each refuses a name or symlink that leads outside the directory
            trunk_path = manifest.path(layout.trunk.file)
            self.expert_paths = [manifest.path(f) for f in self.expert_files]
            self.trunk_map = np.memmap(trunk_path, dtype=np.uint8, mode="r")
        except (ManifestError, OSError, ValueError) as exc:
            raise BackendError(f"cannot map the decoder trunk of {manifest.directory}: {exc}") from None
        self.trunk = tensor_views(self.trunk_map, layout.trunk.tensors)
        self.trunk_bytes = int(self.trunk_map.size)
        self.counters = {"experts_loaded": 0, "expert_bytes_read": 0}
        self._lock = threading.Lock()

    @property
    def expert_bytes(self) -> int:
        return int(self.manifest.experts.expert_bytes or self.expert_paths[0].stat().st_size)

    def size_of(self, expert: int) -> int:
        """Bytes expert ``expert`` will occupy once loaded (its FFN file), known before reading it."""
        return int(self.expert_paths[expert].stat().st_size)

    def component(self, expert: int) -> Component:
        if not 0 <= expert < len(self.components):
            raise BackendError(f"expert {expert} does not exist (this model has {len(self.components)})")
        return self.manifest.component(self.components[expert])

    def load(self, expert: int) -> tuple[LoadedExpert, int]:
        ort = _ort()
        comp = self.component(expert)
        t0 = time.perf_counter()
        options = self.make_options()
        data: np.ndarray | None = None
        values: list[Any] = []
        if not self.prepack:  # runs read the weights as stored: the shared, mapped trunk + this expert in memory
            options.add_session_config_entry("session.disable_prepacking", "1")
            data = np.fromfile(self.expert_paths[expert], dtype=np.uint8)
            arrays = {**self.trunk, **tensor_views(data, self.expert_tensors)}
            values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
            for name, value in zip(arrays, values):  # user-owned memory: ORT uses it in place, no copy
                options.add_initializer(name, value)
        try:
            path = self.manifest.path(comp.file)
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except ManifestError as exc:
            raise BackendError(str(exc)) from None
        except _ort_errors() as exc:
            raise BackendError(f"cannot load decoder for expert {expert} from {self.manifest.path(comp.file)}: "
                               f"{_first_line(exc)}") from None
        check_session_io(session, comp, path)
        elapsed = (time.perf_counter() - t0) * 1e3
        nbytes = self.size_of(expert)
        with self._lock:
            self.counters["experts_loaded"] += 1
            self.counters["expert_bytes_read"] += nbytes
        loaded = LoadedExpert(expert, session, {} if data is None else {"__data__": data}, values, nbytes, elapsed)
        return loaded, nbytes


@dataclass
class KVState:
    """Per-layer preallocated K and V buffers: (capacity, B, kv_heads, head_dim) each, or (B, kv_heads, capacity,
    head_dim) for the ``bnsh-shared`` layout."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    layout: str = KV_LAYOUT_SEQUENCE_MAJOR
    binding: tuple[Any, Any] | None = None  # (session, its IO binding with these buffers bound): bnsh-shared only


class OrtBackend(Backend):
    """Sharing one backend between threads is safe. Sessions are made under a lock; ONNX Runtime runs sessions
    from several threads at once; a request's per-request state (its KV buffers and their kept IO binding) lives in
    its own :class:`CacheHandle`; and each decoder run *holds* its expert in the cache, so another thread's load
    cannot evict the weights a running session reads (that load waits instead). :class:`Generator` also takes
    :attr:`Backend.lock` around each request group, so requests run one at a time (each with all the cores) and an
    expert is not reloaded between the steps of one request."""

    name = "ort"

    def __init__(self, manifest: Manifest, threads: int | None = None, providers: Sequence[str] | str | None = None,
                 expert_budget_experts: int | None = None, expert_budget_bytes: int | None = None,
                 prepack_weights: bool | None = None, pinned_experts: Sequence[int] = (),
                 profile_prefix: str | None = None, preload: bool = True, prefill_chunk: int | None = PREFILL_CHUNK):
        from rsvlm_edge.expert_cache import ExpertCache
        from rsvlm_edge.threads import default_threads

        try:
            config = manifest.config()
        except ManifestError as exc:
            raise BackendError(str(exc)) from None
        super().__init__(config)
        if manifest.engine_kind != "onnx":
            raise BackendError(f"{manifest.directory} holds {manifest.engine_kind} engines, not ONNX graphs; "
                               f"use --backend trt")
        if (manifest.extra.get("quantization") or {}).get("runtime") == "tensorrt":
            raise BackendError(f"{manifest.directory} holds INT4 Q/DQ graphs for TensorRT: build their plans with "
                               f"`rsvlm-edge build ... --target trt --precision int4`; for ONNX Runtime build "
                               f"`--precision int4` (weight-only) from the FP32 export")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise BackendError(f"the prefill chunk must be at least one token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.ort = _ort()
        self.manifest = manifest
        # None = auto: one thread for a small decoder, all free cores for a large one (rsvlm_edge.threads).
        self.threads = threads or default_threads(config)
        self.profile_prefix = profile_prefix  # ORT's per-node profiler on every session (rsvlm-edge profile)
        self.providers = resolve_providers(providers)
        self._sessions: dict[str, Any] = {}
        self._session_lock = threading.Lock()
        self.embedding = self._session("embedding")
        if prepack_weights is None:
            prepack_weights = self._decoder_precision() in ("int8", "int4")
        self.prepack_weights = prepack_weights
        self.experts = ExpertLoader(manifest, self._options, self.providers, prepack=prepack_weights)
        budget = expert_budget_bytes
        if expert_budget_experts is not None:
            if expert_budget_experts < 1:
                raise BackendError("the expert budget must allow at least one expert")
            budget = expert_budget_experts * self.experts.expert_bytes
        for e in pinned_experts:
            self.experts.component(e)  # validates the index
        if budget is not None and len(set(pinned_experts)) * self.experts.expert_bytes > budget:
            raise BackendError(f"pinned experts {sorted(set(pinned_experts))} need "
                               f"{len(set(pinned_experts)) * self.experts.expert_bytes:,} bytes, more than the expert "
                               f"budget of {budget:,}")
        self.expert_cache = ExpertCache(self.experts.load, budget_bytes=budget, pinned=tuple(pinned_experts),
                                        size_of=self.experts.size_of)
        self._preload: threading.Thread | None = None
        if preload:
            self._preload = threading.Thread(target=self._open_tile_sessions, name="ort-preload", daemon=True)
            self._preload.start()
        cfg = self.config
        self.kv_layout = self._kv_layout()
        new = "present" if self.kv_layout == KV_LAYOUT_SHARED else "new"
        self._kv_names = [(f"past_key_{i}", f"past_value_{i}", f"{new}_key_{i}", f"{new}_value_{i}")
                          for i in range(cfg.num_layers)]
        self._pointer = manifest.has_box_pointer()
        self._dense = manifest.has_dense_heads()

    @classmethod
    def from_dir(cls, model_dir: str | Path, threads: int | None = None, providers: Sequence[str] | str | None = None,
                 expert_budget_experts: int | None = None, expert_budget_bytes: int | None = None,
                 verify: Verify = True, prepack_weights: bool | None = None,
                 pinned_experts: Sequence[int] = (), profile_prefix: str | None = None,
                 preload: bool = True, prefill_chunk: int | None = PREFILL_CHUNK) -> "OrtBackend":
        """Open an exported engine directory. ``verify``: True (sha256 of every file), "size" (sizes only), False.

        ``expert_budget_experts`` / ``expert_budget_bytes`` cap the resident experts (least recently used evicted);
        ``pinned_experts`` are never evicted once loaded (they count against the budget).
        ``profile_prefix``: turn on ONNX Runtime's profiler in every session, writing ``<prefix>_*.json`` traces
        (see :meth:`end_profiling`).
        ``prepack_weights``: None = on for INT8 and INT4 decoders (without packed weights ORT's integer GEMM repacks them on
        every call, which costs rsunivlm-1b INT8 about half its decode speed; packing takes +0.45 GB per resident
        expert session), off for FP32/FP16 (+1.9 GB per session for ~10%).
        ``preload``: create the vision encoder's (and the other per-tile graphs') sessions in a background thread
        now rather than on first use.
        ``prefill_chunk``: the most prompt positions one decoder run takes (None: the whole prompt at once); see
        :data:`PREFILL_CHUNK`.
        """
        try:
            manifest = Manifest.load(model_dir, verify=verify)
        except ManifestError as exc:
            raise BackendError(f"cannot use {model_dir} with the ort backend: {exc}") from None
        return cls(manifest, threads=threads, providers=providers, expert_budget_experts=expert_budget_experts,
                   expert_budget_bytes=expert_budget_bytes, prepack_weights=prepack_weights,
                   pinned_experts=pinned_experts, profile_prefix=profile_prefix, preload=preload,
                   prefill_chunk=prefill_chunk)

    def _kv_layout(self) -> str:
        """The decoders' KV cache layout (one for all experts; the manifest's ``kv_layout``, default sequence-major)."""
        names = self.manifest.experts.decoders
        layouts = {self.manifest.component(n).extra.get("kv_layout", KV_LAYOUT_SEQUENCE_MAJOR) for n in names}
        if len(layouts) > 1:
            raise BackendError(f"{self.manifest.directory}: decoder experts disagree on the KV layout ({sorted(layouts)})")
        layout = layouts.pop() if layouts else KV_LAYOUT_SEQUENCE_MAJOR
        if layout not in KV_LAYOUTS:
            raise BackendError(f"{self.manifest.directory}: decoder KV layout {layout!r} is unknown to this runtime "
                               f"(it knows {', '.join(KV_LAYOUTS)}); upgrade rsvlm-edge or rebuild the engine")
        return layout

    def _decoder_precision(self) -> str:
        names = self.manifest.experts.decoders
        return self.manifest.component(names[0]).precision if names else "fp32"

    # ------------------------------------------------------------------ sessions
    def _options(self):
        so = self.ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        return so

    def end_profiling(self) -> dict[str, str]:
        """Stop the profiler of every open session; component name -> its trace file (decoders by expert:
        ``decoder_expert<e>``). Empty unless the backend was opened with ``profile_prefix``."""
        if not self.profile_prefix:
            return {}
        with self._session_lock:
            files = {name: session.end_profiling() for name, session in self._sessions.items()}
        for expert, loaded in self.expert_cache.resident_items():
            files[self.experts.components[expert]] = loaded.session.end_profiling()
        return files

    def _session(self, name: str):
        with self._session_lock:
            if name not in self._sessions:
                try:
                    comp = self.manifest.component(name)
                    path = self.manifest.path(comp.file)
                    session = self.ort.InferenceSession(str(path), self._options(), providers=self.providers)
                except ManifestError as exc:
                    raise BackendError(str(exc)) from None
                except _ort_errors() as exc:
                    raise BackendError(f"cannot load {name} from {path}: {_first_line(exc)}") from None
                check_session_io(session, comp, path)
                self._sessions[name] = session
            return self._sessions[name]

    def _open_tile_sessions(self) -> None:
        """Create the per-tile sessions, the vision encoder first (run in the background by ``preload``). A failure
        is left for the call that needs the session, which retries and reports it."""
        names = ["vision_encoder"] + [n for n in self.manifest.components
                                      if n.startswith("vision_stem_") or n in ("router", POINTER_COMPONENT)]
        for name in names:
            if name in self.manifest.components:
                try:
                    self._session(name)
                except BackendError:
                    continue

    def _call(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run component ``name``; ONNX Runtime's errors come back as a BackendError naming its file."""
        session = self._session(name)
        try:
            return session.run(None, feeds)
        except _ort_errors() as exc:
            raise BackendError(f"{self.manifest.path(self.manifest.component(name).file)} failed to run: "
                               f"{_first_line(exc)}") from None

    # ------------------------------------------------------------------ Backend interface
    def encode_images(self, pixels: np.ndarray, sensor: str) -> np.ndarray:
        pixels = self.check_pixels(pixels, sensor)
        if self.config.vision_stems:
            pixels = self._call(f"vision_stem_{sensor}", {"pixels": pixels})[0]
        return self._call("vision_encoder", {encoder_input(self.config): pixels})[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._call("embedding", {"input_ids": np.ascontiguousarray(ids, dtype=np.int32)})[0]

    def route(self, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.check_router()
        return self._call("router", {"embeds": np.ascontiguousarray(embeds, dtype=np.float32),
                                     "mask": np.ascontiguousarray(mask, dtype=np.float32)})[0]

    def new_cache(self, batch: int, capacity: int, expert: int) -> CacheHandle:
        self.experts.component(expert)  # validates the index
        cfg = self.config
        if self.kv_layout == KV_LAYOUT_SHARED:
            shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        else:
            shape = (capacity, batch, cfg.num_kv_heads, cfg.head_dim)
        state = KVState(keys=[np.empty(shape, np.float32) for _ in range(cfg.num_layers)],
                        values=[np.empty(shape, np.float32) for _ in range(cfg.num_layers)], layout=self.kv_layout)
        return CacheHandle(batch=batch, capacity=capacity, expert=expert, state=state)

    @property
    def has_box_pointer(self) -> bool:
        return self._pointer

    def point(self, query: np.ndarray, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._pointer:
            return super().point(query, patches)
        scores, boxes = self._call(POINTER_COMPONENT, {"query": np.ascontiguousarray(query, dtype=np.float32),
                                                       "patches": np.ascontiguousarray(patches, dtype=np.float32)})
        return scores, boxes

    @property
    def has_dense_heads(self) -> bool:
        return self._dense

    def dense(self, query: np.ndarray, patches: np.ndarray, patches_after: np.ndarray) -> dict[str, np.ndarray]:
        if not self._dense:
            return super().dense(query, patches, patches_after)
        feeds = {"query": query, "patches": patches, "patches_after": patches_after}
        outs = self._call(DENSE_COMPONENT, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})
        return dict(zip(DENSE_OUTPUTS, outs))

    def _forward(self, cache: CacheHandle, embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A prompt longer than :attr:`prefill_chunk` runs as consecutive chunks over the growing cache (the
        decoders' attention is causal over the new positions after any past), so ONNX Runtime's activation arena
        holds one chunk's activations, not the whole prompt's; a failed chunk leaves the cache's length as it was."""
        b, s, start = cache.check_step(embeds, attention_mask)
        chunk = self.prefill_chunk or s
        states: np.ndarray | None = None
        with self.expert_cache.hold(cache.expert) as loaded:  # not evicted while its session runs
            try:
                for lo in range(0, s, chunk):
                    hi = min(s, lo + chunk)
                    logits, part = self._decode_step(loaded, cache, embeds[:, lo:hi], position_ids[:, lo:hi],
                                                     attention_mask[:, :start + hi], b, hi - lo, start + lo, hidden)
                    if part is not None and hi - lo < s:
                        if states is None:
                            states = np.empty((b, s, part.shape[-1]), np.float32)
                        states[:, lo:hi] = part
                    else:
                        states = part
                    cache.length = start + hi
            except BackendError:
                cache.length = start
                raise
            except _ort_errors() as exc:
                cache.length = start
                path = self.manifest.path(self.experts.component(cache.expert).file)
                raise BackendError(f"{path} failed to run: {_first_line(exc)}") from None
        return logits, states

    def _decode_step(self, loaded: LoadedExpert, cache: CacheHandle, embeds, position_ids, attention_mask, b: int,
                     s: int, start: int, hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        session = loaded.session
        state: KVState = cache.state
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int32)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.float32)
        logits = np.empty((b, self.config.vocab_size), dtype=np.float32)
        states = np.empty((b, s, self.config.hidden_size), dtype=np.float32) if hidden else None
        if self.kv_layout == KV_LAYOUT_SHARED and b > 1 and s > 1 and start > 0:
            # ORT's GroupQueryAttention takes a multi-token chunk after a past only at batch 1: run row by row
            # (each row's buffer slice is contiguous in the batch-major layout)
            for row in range(b):
                rows = slice(row, row + 1)
                self._run(session, embeds[rows], position_ids[rows], attention_mask[rows],
                          [k[rows] for k in state.keys], [v[rows] for v in state.values], start, s, logits[rows],
                          None if states is None else states[rows])
        else:
            self._run(session, embeds, position_ids, attention_mask, state.keys, state.values, start, s, logits, states,
                      keep=state if self.kv_layout == KV_LAYOUT_SHARED else None)
        return logits, states

    def _run(self, session, embeds, position_ids, attention_mask, keys, values, start: int, s: int,
             logits: np.ndarray, states: np.ndarray | None = None, keep: KVState | None = None) -> None:
        """One decoder run over the given cache buffers, writing the last position's logits into ``logits`` (and,
        when ``states`` is given, the hidden states of the new positions into it).

        ``keep``: the cache whose whole buffers are bound (bnsh-shared layout). Its binding is kept and reused: the
        KV bindings never change, so a step rebinds only its inputs and outputs (on rsunivlm-1b that skips 96 binds,
        ~5 us each, per step)."""
        binding = keep.binding[1] if keep is not None and keep.binding is not None and keep.binding[0] is session else None
        if binding is None:
            binding = session.io_binding()
            shared = self.kv_layout == KV_LAYOUT_SHARED
            for (pk, pv, nk, nv), kbuf, vbuf in zip(self._kv_names, keys, values):
                for past, new, buf in ((pk, nk, kbuf), (pv, nv, vbuf)):
                    past_view, new_view = (buf, buf) if shared else (buf[:start], buf[start:start + s])
                    binding.bind_input(past, "cpu", 0, np.float32, list(past_view.shape), past_view.ctypes.data)
                    binding.bind_output(new, "cpu", 0, np.float32, list(new_view.shape), new_view.ctypes.data)
            if keep is not None:
                keep.binding = (session, binding)
        for name, array in (("inputs_embeds", embeds), ("position_ids", position_ids), ("attention_mask", attention_mask)):
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self._pointer:  # bound every step, wanted or not: a kept binding must not hold a stale shape
            if states is None:
                states = np.empty((embeds.shape[0], s, self.config.hidden_size), np.float32)
            binding.bind_output(HIDDEN_STATES, "cpu", 0, np.float32, list(states.shape), states.ctypes.data)
        session.run_with_iobinding(binding)

    def prefetch_expert(self, expert: int) -> None:
        self.experts.component(expert)
        self.expert_cache.prefetch(expert)

    def stats(self) -> dict[str, Any]:
        out = dict(self.expert_cache.stats.as_dict())  # hits, misses, evictions, expert_load_ms, expert_bytes_loaded ...
        out.update(self.experts.counters)
        out["trunk_bytes_mapped"] = self.experts.trunk_bytes
        out["providers"] = list(self.providers)
        return out

    def close(self) -> None:
        if self._preload is not None:
            self._preload.join()
        with self.lock:  # after the request in flight
            self.expert_cache.close()
            self._sessions.clear()
