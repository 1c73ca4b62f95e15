"""``manifest.json``: what an engine directory holds, and proof that it is intact. Torch-free.

Layout (``format_version`` 1)::

    {
      "format_version": 1,
      "model_config": {...ModelConfig.to_dict()...},
      "tokenizer": {"file": "tokenizer.json", "sha256": "<hex>", "bytes": 1234},
      "generation_config": {"file": "generation_config.json", "sha256": ..., "bytes": ...},   # optional: HF-style
                                                   # generation defaults of converted models (eos ids, repetition_penalty)
      "components": {
        "<name>": {
          "file": "<name>.onnx",                      # graph (ONNX) or plan (TensorRT)
          "precision": "fp32" | "fp16" | "int8" | "int4",
          "inputs":  [{"name": ..., "dtype": "float32", "shape": ["batch", "seq", 256]}, ...],
          "outputs": [...],                            # shape entries: ints, or axis names for dynamic axes
          "sha256": {"<name>.onnx": "<hex>", "<data>.bin": "<hex>", ...},   # the graph + every data file
          "external_data": ["<data>.bin", ...],        # files the graph's initializers live in
          "bytes": {"<name>.onnx": 1234, ...},         # file sizes (for the fast verify="size" mode)
          ...                                          # extra fields (kind, sensor, expert, opset, ...)
          "kv_layout": "bnsh-shared",                  # decoders only, absent = "sequence-major" (see below)
          "int8_scheme": {"weights": ..., "activations": ..., "tables": ...,   # Q/DQ INT8 components: how each part
                          "pair_bound": {"max_pair_abs_sum": 128, "max_pair_product": 32640, "int16_max": 32767,
                                         "u8_activation_max": 255, "holds": true}},  # is quantized; the int16 bound
                                                       # (rsvlm_edge.calibration.saturation) for x86 without VNNI
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

Models without sensor stems (``model_config.vision_stems`` false, e.g. RSUniVLM) have no ``vision_stem_<sensor>``
components and their ``vision_encoder`` takes the preprocessed RGB as ``pixels`` (:func:`encoder_input`); models
without a router (``model_config.router`` false) have no ``router`` component: the prompt's tags pick the expert.
:meth:`Manifest.check_shapes` refuses a directory whose components contradict these flags.

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

In code the ``experts`` section is an :class:`ExpertLayout` (its trunk a :class:`TrunkLayout`, each tensor entry a
:class:`TensorLayout`): writers build one and readers use its fields, whose names are the JSON keys.

An engine directory is untrusted input. Every file name the manifest holds must be relative and stay inside the
directory, also after symlinks are resolved (:meth:`Manifest.path`); the ``experts`` section may only name files
that the decoder components' ``sha256`` tables vouch for (the trunk in every decoder's, an expert's file in its own
decoder's), so they are verified like the graphs. :meth:`Manifest.load` also checks that the component shapes agree
with ``model_config`` (hidden size, vocabulary, layers, KV heads, image size, experts): a directory whose config does
not match its graphs is refused with the file and the shape, before a runtime sees it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Literal

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # int4: weight-only decoders (MatMulNBits)
ENGINE_KINDS = ("onnx", "tensorrt")
DTYPES = ("float32", "float16", "int32", "int64", "int8", "uint8", "bool")
#: Decoder KV cache layouts (a decoder component's ``kv_layout``; absent means the exported sequence-major one).
KV_LAYOUT_SEQUENCE_MAJOR, KV_LAYOUT_SHARED = "sequence-major", "bnsh-shared"
KV_LAYOUTS = (KV_LAYOUT_SEQUENCE_MAJOR, KV_LAYOUT_SHARED)
#: Models with a box pointer (``ModelConfig.box_pointer``): its component, and the decoder output it reads.
POINTER_COMPONENT = "box_pointer"
HIDDEN_STATES = "hidden_states"
#: Models with dense heads (``ModelConfig.dense_heads``): their component (it reads the same hidden states).
DENSE_COMPONENT = "dense_heads"
#: The dense heads' outputs, in graph order (rsvlm_edge.dense.DenseOutputs fields).
DENSE_OUTPUTS = ("asked", "objects", "boxes", "obbs", "cells", "change")
#: The router component; models with ``model_config.router`` false have none (the prompt's tags pick the expert).
ROUTER_COMPONENT = "router"


def encoder_input(cfg) -> str:
    """Input name of the ``vision_encoder`` graph: a stem's output, or (``model_config.vision_stems`` false: no
    ``vision_stem_*`` components) the preprocessed RGB image itself."""
    return "stem_pixels" if cfg.vision_stems else "pixels"

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


def engine_digest(model_dir: str | Path, exact: bool = True) -> str:
    """The identity of an engine or model dir: the sha256 of its ``manifest.json``, which holds the sha256 of every
    file a backend reads. A checkpoint dir (torch backend) has no manifest: the hashes of its top-level files stand
    in, or with ``exact`` False their names, sizes and modification times (a resume key need not read gigabytes)."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST_FILE).is_file():
        return sha256_file(model_dir / MANIFEST_FILE)
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        if exact:
            digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
        else:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
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


def _check_relative(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: file names must be non-empty strings, got {name!r}")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in name or "\x00" in name:
        raise ManifestError(f"{where}: file names must be relative and stay inside the directory, got {name!r}")


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _plain(value: Any) -> Any:
    """JSON-ready copy of a field value: layouts by their ``to_dict``, tables of layouts entry by entry."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _present(obj: Any) -> dict[str, Any]:
    """A layout dataclass as its manifest entry: its fields in declaration order (the manifest's key order), absent
    (None) ones left out unless their ``written_with`` field is present, then its ``extra`` keys. The field names
    are the manifest keys, so each key is spelled once."""
    out = {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if f.name != "extra" and (
        getattr(obj, f.name) is not None or getattr(obj, f.metadata.get("written_with", f.name)) is not None)}
    out.update(copy.deepcopy(obj.extra))
    return out


def _unknown(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``data`` that ``cls`` has no field for, kept so a manifest round-trips unchanged."""
    known = {f.name for f in fields(cls)}
    return {k: copy.deepcopy(v) for k, v in data.items() if k not in known}


@dataclass(kw_only=True)
class TensorLayout:
    """Where one initializer lies in a data file, so a runtime maps it (``offset``, ``dtype``, ``shape``) without
    parsing the graph; ``source`` and ``transform`` say which model parameter it was made from and how."""

    offset: int
    length: int | None = None  # bytes; the runtime sizes the view from shape and dtype
    dtype: str
    shape: list[int]
    source: str | None = None  # e.g. "layers.0.experts.{e}.up_proj.weight" ({e}: the expert file's index)
    transform: str | None = field(default=None, metadata={"written_with": "source"})  # "transpose[1, 0]" or null
    extra: dict[str, Any] = field(default_factory=dict)  # writer-specific fields (INT8: quantization, of)

    def to_dict(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TensorLayout":
        if not isinstance(data, dict):
            raise ManifestError(f"manifest {where} must be an object")
        t: dict[str, Any] = {f.name: data.get(f.name) for f in fields(cls) if f.name != "extra"}
        if not _is_int(t["offset"]):
            raise ManifestError(f"manifest {where}.offset must be a non-negative integer, got {t['offset']!r}")
        if t["length"] is not None and not _is_int(t["length"]):
            raise ManifestError(f"manifest {where}.length must be a non-negative integer, got {t['length']!r}")
        if t["dtype"] not in DTYPES:
            raise ManifestError(f"manifest {where}.dtype must be one of {', '.join(DTYPES)}, got {t['dtype']!r}")
        if not isinstance(t["shape"], list) or not all(_is_int(d) for d in t["shape"]):
            raise ManifestError(f"manifest {where}.shape must be a list of non-negative integers, got {t['shape']!r}")
        for key in ("source", "transform"):
            if t[key] is not None and not isinstance(t[key], str):
                raise ManifestError(f"manifest {where}.{key} must be a string or null, got {t[key]!r}")
        return cls(**t, extra=_unknown(cls, data))


def _tensor_table(tensors: Any, where: str) -> dict[str, TensorLayout]:
    """A tensor layout table (initializer name -> :class:`TensorLayout`), checked."""
    if not isinstance(tensors, dict):
        raise ManifestError(f"manifest {where} must be an object (tensor name -> layout), got {type(tensors).__name__}")
    return {str(name): TensorLayout.from_dict(t, f"{where}[{name!r}]") for name, t in tensors.items()}


@dataclass
class TrunkLayout:
    """The decoder weights every expert shares: one data file, mapped once and shared by every expert's session."""

    file: str
    bytes: int | None = None
    tensors: dict[str, TensorLayout] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_dict(cls, data: Any) -> "TrunkLayout":
        if not isinstance(data, dict) or "file" not in data:
            raise ManifestError("manifest experts.trunk must be an object with a file")
        _check_relative(data["file"], "experts.trunk.file")
        size = data.get("bytes")
        if size is not None and not _is_int(size):
            raise ManifestError(f"manifest experts.trunk.bytes must be a non-negative integer, got {size!r}")
        return cls(file=data["file"], bytes=size, tensors=_tensor_table(data.get("tensors", {}), "experts.trunk.tensors"),
                   extra=_unknown(cls, data))


@dataclass
class ExpertLayout:
    """The manifest's ``experts`` section: the decoder experts and, for ONNX dirs, how their weights lie on disk.

    Every field is optional (TensorRT plans keep only the count, names and components, and a partial build may lack
    some decoder components); absent fields stay None and are left out of the JSON. ``expert_tensors`` is one layout
    shared by every file in ``expert_files``.
    """

    num_experts: int | None = None
    names: list[str] | None = None  # expert names, in expert-index order (config.EXPERT_NAMES)
    components: list[str] | None = None  # the decoder component of each expert
    trunk: TrunkLayout | None = None
    expert_files: list[str] | None = None  # each expert's FFN data file (also listed in its decoder's sha256)
    expert_bytes: int | None = None  # size of one expert file
    expert_tensors: dict[str, TensorLayout] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decoders(self) -> list[str]:
        """The decoder component names, in expert order; empty when the manifest lists none."""
        return list(self.components or [])

    def lacking(self) -> list[str]:
        """The fields a runtime that maps the weights itself needs and this layout lacks."""
        needed = ("components", "expert_files", "expert_tensors")
        return [f.name for f in fields(self) if f.name in needed and getattr(self, f.name) is None]

    def to_dict(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_dict(cls, data: Any, components: dict[str, Component]) -> "ExpertLayout":
        """Types of the section, and that every file it names is one a decoder's sha256 table lists: the file lists
        must match ``components`` one to one; an expert's file is verified as part of its decoder, the trunk as part
        of every decoder present."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ManifestError(f"manifest experts must be an object, got {type(data).__name__}")
        count = data.get("num_experts")
        if count is not None and not _is_int(count, 1):
            raise ManifestError(f"manifest experts.num_experts must be a positive integer, got {count!r}")
        lists: dict[str, list[str] | None] = {}
        for key in ("names", "components", "expert_files"):
            value = data.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ManifestError(f"manifest experts.{key} must be a list of strings, got {value!r}")
            if value is not None and count is not None and len(value) != count:
                raise ManifestError(f"manifest experts.{key} lists {len(value)} entries for num_experts = {count}")
            lists[key] = None if value is None else list(value)
        size = data.get("expert_bytes")
        if size is not None and not _is_int(size):
            raise ManifestError(f"manifest experts.expert_bytes must be a non-negative integer, got {size!r}")
        layout = cls(num_experts=count, names=lists["names"], components=lists["components"],
                     expert_files=lists["expert_files"], expert_bytes=size, extra=_unknown(cls, data))
        names = layout.decoders
        if layout.expert_files is not None:
            if len(layout.expert_files) != len(names):
                raise ManifestError(f"manifest experts.expert_files lists {len(layout.expert_files)} files for "
                                    f"{len(names)} decoder components")
            for e, (f, name) in enumerate(zip(layout.expert_files, names)):
                _check_relative(f, f"experts.expert_files[{e}]")
                if name not in components or f not in components[name].sha256:
                    raise ManifestError(f"manifest experts.expert_files[{e}] = {f!r} is not in the sha256 table of "
                                        f"component {name!r}: every file must be hash-verified before use")
        if data.get("expert_tensors") is not None:
            layout.expert_tensors = _tensor_table(data["expert_tensors"], "experts.expert_tensors")
        if data.get("trunk") is not None:
            layout.trunk = trunk = TrunkLayout.from_dict(data["trunk"])
            decoders = [components[n] for n in names if n in components]
            if not decoders:
                raise ManifestError(f"manifest experts.trunk.file = {trunk.file!r} belongs to no decoder component, "
                                    f"so no sha256 table verifies it")
            for comp in decoders:
                if trunk.file not in comp.sha256:
                    raise ManifestError(f"manifest experts.trunk.file = {trunk.file!r} is not in the sha256 table of "
                                        f"{comp.name}: every file must be hash-verified before use")
        return layout


def _side_file(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A top-level ``{"file", "sha256", "bytes"}`` entry (tokenizer, generation config), checked; None when absent."""
    entry = data.get(key)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry) or not isinstance(entry["file"], str):
        raise ManifestError(f"manifest {key} entry needs file and sha256")
    _check_relative(entry["file"], key)
    return dict(entry)


def copy_side_files(source: "Manifest", out_dir: Path) -> None:
    """Copy the files a build keeps from its source dir unchanged: the side files the manifest lists (tokenizer,
    generation config) and ``config.json``."""
    import shutil

    names = [entry["file"] for entry in source.side_files()] + ["config.json"]
    for name in names:
        if (source.directory is not None) and (source.directory / name).exists():
            shutil.copy2(source.path(name), Path(out_dir) / name)


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a side file: its name, sha256 and size."""
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass
class Manifest:
    model_config: dict[str, Any]
    components: dict[str, Component]
    tokenizer: dict[str, Any] | None = None
    experts: ExpertLayout = field(default_factory=ExpertLayout)
    engine: dict[str, Any] = field(default_factory=lambda: {"kind": "onnx", "trt_version": None, "compute_capability": None})
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level fields (e.g. "export": tool versions, checks)
    format_version: int = FORMAT_VERSION
    directory: Path | None = None
    generation_config: dict[str, Any] | None = None  # the model dir's generation_config.json, carried into engine dirs

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
            where = f"{self.directory / MANIFEST_FILE}: " if self.directory is not None else "manifest "
            raise ManifestError(f"{where}model_config is invalid: {exc}") from None

    def component(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            where = f" in {self.directory}" if self.directory else ""
            raise ManifestError(f"no component {name!r}{where}; it has {', '.join(sorted(self.components)) or 'none'} "
                                f"(re-export with the missing component)") from None

    def has_box_pointer(self) -> bool:
        """A ``box_pointer`` component, and decoders that all output the ``hidden_states`` it reads."""
        names = self.experts.decoders
        return POINTER_COMPONENT in self.components and bool(names) and all(
            any(t.name == HIDDEN_STATES for t in self.component(n).outputs) for n in names)

    def has_dense_heads(self) -> bool:
        """A ``dense_heads`` component, and decoders that all output the ``hidden_states`` it reads."""
        names = self.experts.decoders
        return DENSE_COMPONENT in self.components and bool(names) and all(
            any(t.name == HIDDEN_STATES for t in self.component(n).outputs) for n in names)

    def check_shapes(self) -> None:
        """Refuse a ``model_config`` that disagrees with the shapes the components were exported with.

        Cheap (the manifest's recorded shapes only, no graph is opened) and it covers what a runtime sizes from the
        config: hidden size, vocabulary, layers, KV heads and head size, image size, sensor bands, visual tokens and
        experts. Without it an edited config surfaces as a runtime's internal shape error deep in a request.
        """
        cfg = self.config()
        where = (lambda f: self.directory / f) if self.directory is not None else Path
        hidden, kv_axis = ("hidden_size", cfg.hidden_size), {KV_LAYOUT_SEQUENCE_MAJOR: 2, KV_LAYOUT_SHARED: 1}
        rules: list[tuple[str, str, int, tuple[str, int]]] = [  # component, tensor, axis, (config key, value)
            ("embedding", "inputs_embeds", -1, hidden), ("router", "embeds", -1, hidden),
            ("router", "logits", -1, ("num_experts", cfg.num_experts)),
            ("vision_encoder", encoder_input(cfg), -1, ("image_size", cfg.image_size)),
            ("vision_encoder", "visual_tokens", 1, ("image_size / patch_size (visual tokens)", cfg.num_visual_tokens)),
            ("vision_encoder", "visual_tokens", -1, hidden),
            (POINTER_COMPONENT, "query", -1, hidden), (POINTER_COMPONENT, "patches", -1, hidden),
            (POINTER_COMPONENT, "patches", 1, ("image_size / patch_size (patches)", cfg.grid_size ** 2)),
            (DENSE_COMPONENT, "query", -1, hidden), (DENSE_COMPONENT, "patches", -1, hidden),
            (DENSE_COMPONENT, "patches", 1, ("image_size / patch_size (patches)", cfg.grid_size ** 2)),
            (DENSE_COMPONENT, "asked", -1, ("dense_labels", len(cfg.dense_labels))),
        ]
        for unexpected, flag in ((not cfg.vision_stems and [n for n in self.components if n.startswith("vision_stem_")],
                                  "vision_stems"),
                                 (not cfg.router and ROUTER_COMPONENT in self.components and [ROUTER_COMPONENT], "router")):
            if unexpected:
                raise ManifestError(f"{where(MANIFEST_FILE)} lists {', '.join(unexpected)}, but its model_config has "
                                    f"{flag} = false: the config does not match the graphs; re-export the model")
        encoder = self.components.get("vision_encoder")
        if encoder is not None and encoder_input(cfg) not in [t.name for t in encoder.inputs]:
            raise ManifestError(f"{where(encoder.file)} does not take {encoder_input(cfg)!r}, but {MANIFEST_FILE}'s "
                                f"model_config has vision_stems = {str(cfg.vision_stems).lower()}: the config does "
                                f"not match the graphs; re-export the model")
        for name in self.components:
            sensor = name.removeprefix("vision_stem_")
            if name.startswith("vision_stem_") and sensor in cfg.sensors:
                rules += [(name, "pixels", 1, (f"sensors.{sensor}", cfg.sensors[sensor])),
                          (name, "pixels", -1, ("image_size", cfg.image_size))]
        decoders = [n for n in self.experts.decoders if n in self.components]
        for name in decoders:
            comp = self.components[name]
            rules += [(name, "inputs_embeds", -1, hidden), (name, "logits", -1, ("vocab_size", cfg.vocab_size)),
                      (name, HIDDEN_STATES, -1, hidden)]
            past = [t.name for t in comp.inputs if t.name.startswith("past_key_")]
            if past and len(past) != cfg.num_layers:
                raise ManifestError(f"{where(comp.file)} takes a KV cache for {len(past)} layers, but {MANIFEST_FILE}'s "
                                    f"model_config.num_layers is {cfg.num_layers}: the config does not match the "
                                    f"graphs; re-export the model")
            axis = kv_axis.get(comp.extra.get("kv_layout", KV_LAYOUT_SEQUENCE_MAJOR), 2)
            for t in past:
                rules += [(name, t, -1, ("hidden_size / num_heads (head_dim)", cfg.head_dim)),
                          (name, t, axis, ("num_kv_heads", cfg.num_kv_heads))]
        count = self.experts.num_experts
        if count is not None and count != cfg.num_experts:
            raise ManifestError(f"{where(MANIFEST_FILE)}: experts.num_experts is {count}, but model_config.num_experts is "
                                f"{cfg.num_experts}: the config does not match the graphs; re-export the model")
        for comp_name, tensor, axis, (key, value) in rules:
            checked = self.components.get(comp_name)
            spec = next((t for t in checked.inputs + checked.outputs if t.name == tensor), None) if checked else None
            if checked is None or spec is None:
                continue
            dim = spec.shape[axis] if -len(spec.shape) <= axis < len(spec.shape) else None
            if isinstance(dim, str):
                continue  # a dynamic axis
            if dim != value:
                raise ManifestError(f"{where(checked.file)}: {tensor} has shape {spec.shape}, but {MANIFEST_FILE}'s model_config "
                                    f"gives {key} = {value}: the config does not match the graphs; re-export the "
                                    f"model or restore its {MANIFEST_FILE}")

    def path(self, name: str) -> Path:
        """``directory/name``, refused unless it stays inside the directory once symlinks are resolved."""
        if self.directory is None:
            raise ManifestError("manifest has no directory (not loaded from disk)")
        _check_relative(name, MANIFEST_FILE)
        path = self.directory / name
        root = self.directory.resolve()
        if not path.resolve().is_relative_to(root):
            raise ManifestError(f"{path} resolves to {path.resolve()}, outside the engine directory {root}: "
                                f"refusing to read it; copy the file into the directory")
        return path

    def side_files(self) -> list[dict[str, Any]]:
        """The entries of files that are not graphs: the tokenizer and, when present, the generation config."""
        return [entry for entry in (self.tokenizer, self.generation_config) if entry]

    def all_files(self) -> dict[str, str]:
        """file -> expected sha256 for every file the manifest vouches for (tokenizer and generation config included)."""
        files: dict[str, str] = {}
        for entry in self.side_files():
            files[entry["file"]] = entry["sha256"]
        for comp in self.components.values():
            for f, digest in comp.sha256.items():
                if files.setdefault(f, digest) != digest:
                    raise ManifestError(f"file {f!r} is listed twice with different sha256 digests")
        return files

    def file_sizes(self) -> dict[str, int]:
        """file -> recorded size in bytes, where the manifest records one."""
        sizes: dict[str, int] = {}
        for entry in self.side_files():
            if "bytes" in entry:
                sizes[entry["file"]] = int(entry["bytes"])
        for comp in self.components.values():
            sizes.update({f: int(n) for f, n in (comp.extra.get("bytes") or {}).items()})
        return sizes

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": self.format_version, "model_config": copy.deepcopy(self.model_config)}
        if self.tokenizer is not None:
            out["tokenizer"] = dict(self.tokenizer)
        if self.generation_config is not None:
            out["generation_config"] = dict(self.generation_config)
        out["components"] = {name: comp.to_dict() for name, comp in self.components.items()}
        out["experts"] = self.experts.to_dict()
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
        tokenizer, generation = (_side_file(data, key) for key in ("tokenizer", "generation_config"))
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
        experts = ExpertLayout.from_dict(data.get("experts"), components)
        known = {"format_version", "model_config", "tokenizer", "generation_config", "components", "experts", "engine"}
        return cls(model_config=data["model_config"], components=components, tokenizer=tokenizer,
                   generation_config=generation, experts=experts, engine=engine,
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
        try:
            manifest = cls.from_dict(data, directory=directory)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {str(exc).removeprefix('manifest ')}") from None
        manifest.check_shapes()
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
            path = self.path(name)
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
