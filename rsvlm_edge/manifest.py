"""``manifest.json``: what an engine directory holds, and proof that it is intact. Torch-free.

Layout (``format_version`` 1)::

    {
      "format_version": 1,
      "model_config": {...ModelConfig.to_dict()...},
      "tokenizer": {"file": "tokenizer.json", "sha256": "<hex>", "bytes": 1234},
      "components": {
        "<name>": {
          "file": "<name>.onnx",                      # graph (ONNX) or plan (TensorRT)
          "precision": "fp32" | "fp16" | "int8",
          "inputs":  [{"name": ..., "dtype": "float32", "shape": ["batch", "seq", 256]}, ...],
          "outputs": [...],                            # shape entries: ints, or axis names for dynamic axes
          "sha256": {"<name>.onnx": "<hex>", "<data>.bin": "<hex>", ...},   # the graph + every data file
          "external_data": ["<data>.bin", ...],        # files the graph's initializers live in
          "bytes": {"<name>.onnx": 1234, ...},         # file sizes (for the fast verify="size" mode)
          ...                                          # extra fields (kind, sensor, expert, opset, ...)
          "kv_layout": "bnsh-shared",                  # decoders only, absent = "sequence-major" (see below)
        }
      },
      "experts": {                                     # decoder layout, so a runtime maps tensors without parsing graphs
        "num_experts": 3, "names": ["image", "region", "pixel"], "components": ["decoder_expert0", ...],
        "trunk": {"file": "decoder_trunk.bin", "bytes": N,
                  "tensors": {"<initializer>": {"offset", "length", "dtype", "shape", "source", "transform"}}},
        "expert_files": ["decoder_expert0.bin", ...], "expert_bytes": N,
        "expert_tensors": {"<initializer>": {...same keys; one layout shared by every expert file...}}
      },
      "engine": {"kind": "onnx" | "tensorrt", "trt_version": null | "10.3.0", "compute_capability": null | "8.7"}
    }

TensorRT engine dirs (``rsvlm_edge.engines.trt_build``) have one ``<name>.plan`` per component (no external data)
and add per component ``profiles`` (``[{"name", "shapes": {input: [min, opt, max]}}]``, what the backend may run),
``builder_flags``, ``strongly_typed``, ``dla_core`` and ``source_sha256`` (the ONNX graph it was built from); the
plans only load where :func:`check_engine_compat` passes.

Decoder KV caches: exported decoders take ``past_key_i`` (P, B, kv_heads, head_dim) and return this step's
``new_key_i`` (S, B, kv_heads, head_dim); weight-only INT8 decoders with ``GroupQueryAttention`` (``kv_layout``
``bnsh-shared``) take and return the whole (B, kv_heads, capacity, head_dim) buffer as ``past_key_i`` /
``present_key_i``, bound to the same memory. A runtime that does not know a decoder's ``kv_layout`` must refuse it.

Every file named anywhere in ``components[*].sha256`` and ``tokenizer`` is verified by :meth:`Manifest.load`
(streamed sha256, or only sizes with ``verify="size"``); a missing or altered file raises :class:`ManifestError`
naming it, so a backend never crashes deep inside a runtime on a truncated download.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_KINDS = ("onnx", "tensorrt")
DTYPES = ("float32", "float16", "int32", "int64", "int8", "uint8", "bool")
#: Decoder KV cache layouts (a decoder component's ``kv_layout``; absent means the exported sequence-major one).
KV_LAYOUT_SEQUENCE_MAJOR, KV_LAYOUT_SHARED = "sequence-major", "bnsh-shared"
KV_LAYOUTS = (KV_LAYOUT_SEQUENCE_MAJOR, KV_LAYOUT_SHARED)
#: Models with a box pointer (``ModelConfig.box_pointer``): its component, and the decoder output it reads.
POINTER_COMPONENT = "box_pointer"
HIDDEN_STATES = "hidden_states"

Verify = bool | Literal["size", "sha256"]

_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A manifest is missing, malformed, from another format version, or a file it lists is missing or altered."""


class EngineCompatError(ManifestError):
    """Engines were built for another TensorRT version or GPU than the one at hand."""


# ----------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | Path, chunk: int = _CHUNK) -> str:
    """Streamed sha256 of a file (constant memory, any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def dumps(data: Any) -> str:
    """Indented JSON with short lists of scalars (shapes, file lists) kept on one line."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


# ----------------------------------------------------------------------------------------------- data model
@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TensorSpec":
        if not isinstance(data, dict) or not {"name", "dtype", "shape"} <= set(data):
            raise ManifestError(f"{where}: each tensor needs name, dtype and shape, got {data!r}")
        if data["dtype"] not in DTYPES:
            raise ManifestError(f"{where}: tensor {data['name']!r} has unknown dtype {data['dtype']!r}")
        shape = data["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise ManifestError(f"{where}: tensor {data['name']!r} shape must be a list of ints or axis names")
        return cls(str(data["name"]), str(data["dtype"]), list(shape))


@dataclass
class Component:
    name: str
    file: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sha256: dict[str, str]
    external_data: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        """The graph/plan and every data file, in a stable order."""
        return [self.file] + [f for f in self.sha256 if f != self.file]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"component {self.name} has no input {name!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"file": self.file, "precision": self.precision, "inputs": [t.to_dict() for t in self.inputs],
               "outputs": [t.to_dict() for t in self.outputs], "sha256": dict(self.sha256),
               "external_data": list(self.external_data)}
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "Component":
        where = f"component {name!r}"
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be an object")
        missing = [k for k in ("file", "precision", "inputs", "outputs", "sha256") if k not in data]
        if missing:
            raise ManifestError(f"{where} lacks {', '.join(missing)}")
        if data["precision"] not in PRECISIONS:
            raise ManifestError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {data['precision']!r}")
        sha = data["sha256"]
        if not isinstance(sha, dict) or data["file"] not in sha:
            raise ManifestError(f"{where}: sha256 must map every file (the graph {data['file']!r} included) to a hex digest")
        external = list(data.get("external_data", []))
        for f in external:
            if f not in sha:
                raise ManifestError(f"{where}: external data file {f!r} has no sha256 entry")
        for f in sha:
            _check_relative(f, where)
        extra = {k: v for k, v in data.items() if k not in ("file", "precision", "inputs", "outputs", "sha256", "external_data")}
        return cls(name=name, file=str(data["file"]), precision=str(data["precision"]),
                   inputs=[TensorSpec.from_dict(t, where) for t in data["inputs"]],
                   outputs=[TensorSpec.from_dict(t, where) for t in data["outputs"]],
                   sha256={str(k): str(v) for k, v in sha.items()}, external_data=external, extra=extra)


def _check_relative(name: str, where: str) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ManifestError(f"{where}: file names must be relative and stay inside the directory, got {name!r}")


@dataclass
class Manifest:
    model_config: dict[str, Any]
    components: dict[str, Component]
    tokenizer: dict[str, str] | None = None
    experts: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=lambda: {"kind": "onnx", "trt_version": None, "compute_capability": None})
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level fields (e.g. "export": tool versions, checks)
    format_version: int = FORMAT_VERSION
    directory: Path | None = None

    # ------------------------------------------------------------------ derived
    @property
    def engine_kind(self) -> str:
        return str(self.engine.get("kind", "onnx"))

    def config(self):
        """The :class:`~rsvlm_edge.config.ModelConfig` the engines were exported from."""
        from rsvlm_edge.config import ConfigError, ModelConfig

        try:
            return ModelConfig.from_dict(self.model_config)
        except (ConfigError, TypeError) as exc:
            raise ManifestError(f"manifest model_config is invalid: {exc}") from None

    def component(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            where = f" in {self.directory}" if self.directory else ""
            raise ManifestError(f"no component {name!r}{where}; it has {', '.join(sorted(self.components)) or 'none'} "
                                f"(re-export with the missing component)") from None

    def has_box_pointer(self) -> bool:
        """A ``box_pointer`` component, and decoders that all output the ``hidden_states`` it reads."""
        names = (self.experts or {}).get("components") or []
        return POINTER_COMPONENT in self.components and bool(names) and all(
            any(t.name == HIDDEN_STATES for t in self.component(n).outputs) for n in names)

    def path(self, name: str) -> Path:
        if self.directory is None:
            raise ManifestError("manifest has no directory (not loaded from disk)")
        return self.directory / name

    def all_files(self) -> dict[str, str]:
        """file -> expected sha256 for every file the manifest vouches for (tokenizer included)."""
        files: dict[str, str] = {}
        if self.tokenizer:
            files[self.tokenizer["file"]] = self.tokenizer["sha256"]
        for comp in self.components.values():
            for f, digest in comp.sha256.items():
                if files.setdefault(f, digest) != digest:
                    raise ManifestError(f"file {f!r} is listed twice with different sha256 digests")
        return files

    def file_sizes(self) -> dict[str, int]:
        """file -> recorded size in bytes, where the manifest records one."""
        sizes: dict[str, int] = {}
        if self.tokenizer and "bytes" in self.tokenizer:
            sizes[self.tokenizer["file"]] = int(self.tokenizer["bytes"])
        for comp in self.components.values():
            sizes.update({f: int(n) for f, n in (comp.extra.get("bytes") or {}).items()})
        return sizes

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": self.format_version, "model_config": copy.deepcopy(self.model_config)}
        if self.tokenizer is not None:
            out["tokenizer"] = dict(self.tokenizer)
        out["components"] = {name: comp.to_dict() for name, comp in self.components.items()}
        out["experts"] = copy.deepcopy(self.experts)
        out["engine"] = dict(self.engine)
        for k, v in self.extra.items():
            out.setdefault(k, copy.deepcopy(v))
        return out

    @classmethod
    def from_dict(cls, data: Any, directory: Path | None = None) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"manifest format_version {version!r} is not supported (this runtime reads "
                                f"version {FORMAT_VERSION}); re-export the model with this version of rsvlm-edge")
        for key in ("model_config", "components"):
            if not isinstance(data.get(key), dict):
                raise ManifestError(f"manifest lacks {key!r} (an object)")
        tokenizer = data.get("tokenizer")
        if tokenizer is not None:
            if not isinstance(tokenizer, dict) or not {"file", "sha256"} <= set(tokenizer):
                raise ManifestError("manifest tokenizer entry needs file and sha256")
            tokenizer = dict(tokenizer)
            _check_relative(tokenizer["file"], "tokenizer")
        engine = data.get("engine") or {"kind": "onnx"}
        if not isinstance(engine, dict) or engine.get("kind") not in ENGINE_KINDS:
            raise ManifestError(f"manifest engine.kind must be one of {', '.join(ENGINE_KINDS)}, got {engine!r}")
        engine = {"trt_version": None, "compute_capability": None, **engine}
        if engine["kind"] == "tensorrt" and not (engine["trt_version"] and engine["compute_capability"]):
            raise ManifestError("TensorRT engines must record trt_version and compute_capability in the manifest")
        if engine["kind"] == "tensorrt" and not re.fullmatch(r"\d+\.\d+", str(engine["compute_capability"])):
            raise ManifestError(f"engine.compute_capability must read major.minor (e.g. \"8.7\"), "
                                f"got {engine['compute_capability']!r}")
        components = {name: Component.from_dict(name, comp) for name, comp in data["components"].items()}
        known = {"format_version", "model_config", "tokenizer", "components", "experts", "engine"}
        return cls(model_config=data["model_config"], components=components, tokenizer=tokenizer,
                   experts=data.get("experts") or {}, engine=engine,
                   extra={k: v for k, v in data.items() if k not in known}, format_version=version, directory=directory)

    def save(self, directory: str | Path | None = None) -> Path:
        """Write ``manifest.json`` atomically (into ``directory`` or the one it was loaded from)."""
        from rsvlm_edge.fileio import atomic_write_text

        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise ManifestError("no directory to save the manifest into")
        path = target / MANIFEST_FILE
        atomic_write_text(path, dumps(self.to_dict()))
        self.directory = target
        return path

    @classmethod
    def load(cls, directory: str | Path, verify: Verify = True) -> "Manifest":
        """Read ``directory/manifest.json``; ``verify``: True/"sha256" (hash every file), "size" (sizes only), False."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{directory} has no {MANIFEST_FILE}: not an exported engine directory "
                                f"(export one with `rsvlm-edge export CHECKPOINT OUT_DIR`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from None
        manifest = cls.from_dict(data, directory=directory)
        if verify:
            manifest.verify(mode="size" if verify == "size" else "sha256")
        return manifest

    # ------------------------------------------------------------------ verification
    def verify(self, mode: Literal["size", "sha256"] = "sha256", files: Iterable[str] | None = None) -> None:
        """Check presence and integrity of every listed file (or just ``files``); raise ManifestError naming the first bad one.

        ``mode="size"`` compares the sizes recorded under ``bytes`` (written by exporters) and skips hashing: fast,
        and still catches truncated or missing files.
        """
        if self.directory is None:
            raise ManifestError("manifest has no directory to verify")
        expected = self.all_files()
        sizes = self.file_sizes()
        for name in files if files is not None else expected:
            if name not in expected:
                raise ManifestError(f"{name!r} is not listed in {MANIFEST_FILE}")
            path = self.directory / name
            if not path.is_file():
                raise ManifestError(f"{path} is missing (listed in {MANIFEST_FILE}); re-copy or re-export the model")
            if mode == "size":
                want = sizes.get(name)
                if want is not None and path.stat().st_size != want:
                    raise ManifestError(f"{path} has {path.stat().st_size:,} bytes but the manifest records {want:,}: "
                                        f"truncated or modified; re-copy or re-export the model")
                continue
            digest = sha256_file(path)
            if digest != expected[name]:
                raise ManifestError(f"{path} fails its sha256 check (modified or corrupt): expected {expected[name][:16]}..., "
                                    f"got {digest[:16]}...; re-copy or re-export the model")


# ----------------------------------------------------------------------------------------------- engine compatibility
def _version_tuple(version: str, parts: int) -> tuple[int, ...]:
    try:
        nums = [int(p) for p in str(version).split(".")]
    except ValueError:
        raise EngineCompatError(f"cannot read TensorRT version {version!r}") from None
    return tuple((nums + [0] * parts)[:parts])


def check_engine_compat(manifest: Manifest, trt_version: str | None, compute_capability: str | tuple[int, int] | None) -> None:
    """Refuse TensorRT plans built for another TensorRT version or GPU, with a message saying what to do.

    ONNX engine dirs are portable and always pass. Plans must match the TensorRT major.minor.patch they were built
    with (plans are not portable across versions unless built "version compatible", recorded as
    ``engine.version_compatible: true``, which relaxes the check to the same major version) and the GPU compute
    capability (unless built ``hardware_compatible``, which needs compute capability >= 8.0).
    """
    engine = manifest.engine
    if engine.get("kind") != "tensorrt":
        return
    if isinstance(compute_capability, tuple):
        compute_capability = f"{compute_capability[0]}.{compute_capability[1]}"
    built_trt, built_cc = str(engine["trt_version"]), str(engine["compute_capability"])
    where = f" in {manifest.directory}" if manifest.directory else ""
    rebuild = "rebuild the engines on this device (`rsvlm-edge build`) or use --backend ort"
    if trt_version is None:
        raise EngineCompatError(f"the engines{where} are TensorRT {built_trt} plans but TensorRT is not installed; {rebuild}")
    if engine.get("version_compatible"):
        ok = _version_tuple(trt_version, 1) == _version_tuple(built_trt, 1)
    else:
        ok = _version_tuple(trt_version, 3) == _version_tuple(built_trt, 3)
    if not ok:
        raise EngineCompatError(f"the engines{where} were built with TensorRT {built_trt}, but this machine has TensorRT "
                                f"{trt_version}; TensorRT plans only load in the version that built them: {rebuild}")
    if compute_capability is None:
        raise EngineCompatError(f"the engines{where} need a CUDA GPU (built for compute capability {built_cc}); none found")
    if engine.get("hardware_compatible"):
        if _version_tuple(str(compute_capability), 2) < (8, 0):
            raise EngineCompatError(f"the hardware-compatible engines{where} need compute capability >= 8.0 (Ampere or "
                                    f"newer); this GPU is {compute_capability}: {rebuild}")
    elif _version_tuple(str(compute_capability), 2) != _version_tuple(built_cc, 2):
        raise EngineCompatError(f"the engines{where} were built for GPU compute capability {built_cc}, but this GPU is "
                                f"{compute_capability}; plans are specific to the GPU architecture: {rebuild}")
