"""Write an INT8 (explicit Q/DQ) engine dir from an FP32 one and a calibration table.

The layout stays the export's: one graph + ``<name>.bin`` per component, the decoder's shared trunk (INT8 weights
and their scales, FP32 norms) once in ``decoder_trunk.bin`` and each expert's INT8 FFN in ``decoder_expert<e>.bin``,
so :class:`~rsvlm_edge.backends.ort_backend.OrtBackend` memory-maps and swaps experts exactly as for FP32.
Sensor stems and the router are copied unchanged (tiny, and the router decides the expert). The directory is staged
beside OUT_DIR and moved into place only when complete.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto

from rsvlm_edge.calibration.collect import external_arrays
from rsvlm_edge.calibration.qdq import QuantizedGraph, quantize_graph
from rsvlm_edge.export.weights import DataFileWriter
from rsvlm_edge.fileio import staged_dir
from rsvlm_edge.manifest import (
    KV_LAYOUT_SHARED,
    Component,
    ExpertLayout,
    Manifest,
    TensorLayout,
    TensorSpec,
    TrunkLayout,
    copy_side_files,
    sha256_file,
)

LM_HEAD = re.compile(r"lm_head")
COPIED_KINDS = ("stem", "router", "box_pointer", "dense_heads")  # tiny heads whose boxes need FP32 precision
SCHEMES = ("qdq", "weight-only")
# (graph, its external weights, component name, weight name -> its file) -> the rewritten graph and its tensors.
# The file of each weight lets a rewrite stack weights without mixing the decoder's trunk and expert files.
FileOf = Callable[[str], str]
Quantizer = Callable[[onnx.ModelProto, dict[str, np.ndarray], str, FileOf], QuantizedGraph]


class Int8WriteError(RuntimeError):
    """The INT8 engine dir cannot be written (bad source, OUT_DIR not empty ...); OUT_DIR is left untouched."""


def is_lm_head(node: onnx.NodeProto) -> bool:
    """The output projection (logits), by its node or weight name."""
    return bool(LM_HEAD.search(node.name)) or any(LM_HEAD.search(i) for i in node.input)


def keep_fp32_predicate(keep_lm_head: bool) -> Callable[[onnx.NodeProto], bool] | None:
    return is_lm_head if keep_lm_head else None


def _point(init: onnx.TensorProto, file: str, entry: TensorLayout) -> None:
    init.ClearField("raw_data")
    del init.external_data[:]
    for key, value in (("location", file), ("offset", str(entry.offset)), ("length", str(entry.length))):
        init.external_data.add(key=key, value=value)
    init.data_location = TensorProto.EXTERNAL


def _write_tensors(path: Path, names: list[str], q: QuantizedGraph) -> tuple[dict[str, TensorLayout], str, int]:
    with DataFileWriter(path) as writer:
        layout = {n: writer.add(n, np.ascontiguousarray(q.tensors[n][0])) for n in names}
        digest, size = writer.close()
    return layout, digest, size


def _save_graph(q: QuantizedGraph, where: dict[str, tuple[str, TensorLayout]], path: Path) -> None:
    for init in q.model.graph.initializer:
        if init.name in where:
            _point(init, *where[init.name])
    onnx.save(q.model, str(path))


def shared_kv_specs(comp: Component, model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest IO of a decoder after :func:`~rsvlm_edge.engines.ort_fusions.fuse_attention`: the past K/V
    inputs and the present K/V outputs are the (batch, kv_heads, capacity, head_dim) shared buffers."""
    def spec(value: onnx.ValueInfoProto, old: TensorSpec | None) -> TensorSpec:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        return TensorSpec(value.name, old.dtype if old else "float32", dims)

    old = {t.name: t for t in comp.inputs + comp.outputs}
    inputs = [spec(v, old.get(v.name)) if v.name.startswith("past_") else old[v.name] for v in model.graph.input]
    outputs = [spec(v, old.get(v.name.replace("present_", "new_"))) if v.name.startswith("present_") else old[v.name]
               for v in model.graph.output]
    return inputs, outputs


class Int8Writer:
    """Quantizes each component of ``source`` into ``staging`` and collects the new manifest entries."""

    def __init__(self, source: Manifest, staging: Path, quantize: Quantizer, decoder_precision: str = "int8"):
        self.src, self.dir, self.quantize = source, staging, quantize
        self.decoder_precision = decoder_precision  # "int4": the decoders' weights; other graphs stay "int8"
        self.components: dict[str, Component] = {}
        self.report: dict[str, Any] = {}

    def _load(self, comp: Component) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        path = self.src.path(comp.file)
        model = onnx.load(str(path), load_external_data=False)
        return model, external_arrays(path.parent, model)

    def _entry(self, comp: Component, files: list[str], precision: str, extra: dict | None = None,
               q: QuantizedGraph | None = None) -> Component:
        sha = {f: sha256_file(self.dir / f) for f in files}
        sizes = {f: (self.dir / f).stat().st_size for f in files}
        more = {**comp.extra, "bytes": sizes, **(extra or {})}
        inputs, outputs = comp.inputs, comp.outputs
        if q is not None and q.fused.get("attention"):
            inputs, outputs = shared_kv_specs(comp, q.model)
            more["kv_layout"] = KV_LAYOUT_SHARED
        return Component(name=comp.name, file=comp.file, precision=precision, inputs=inputs, outputs=outputs,
                         sha256=sha, external_data=[f for f in files if f != comp.file], extra=more)

    def copy(self, comp: Component) -> None:
        for f in comp.files:
            shutil.copy2(self.src.path(f), self.dir / f)
        self.components[comp.name] = self._entry(comp, comp.files, comp.precision)

    def simple(self, comp: Component) -> None:
        model, arrays = self._load(comp)
        q = self.quantize(model, arrays, comp.name, lambda weight: "data")  # one data file
        data_file = f"{comp.name}.bin"
        layout, _, _ = _write_tensors(self.dir / data_file, list(q.tensors), q)
        _save_graph(q, {n: (data_file, e) for n, e in layout.items()}, self.dir / comp.file)
        self.components[comp.name] = self._entry(comp, [comp.file, data_file], "int8", self._extra(q))
        self.report[comp.name] = self._stats(q)

    def decoder(self) -> ExpertLayout:
        layout = self.src.experts
        if layout.trunk is None or layout.expert_files is None or layout.expert_tensors is None:
            raise Int8WriteError(f"{self.src.directory}: the manifest has no decoder weight layout (trunk, expert "
                                 f"files and tensors); quantize a complete FP32 export")
        trunk_src = set(layout.trunk.tensors)
        trunk_file, experts = layout.trunk.file, {}
        trunk_layout: dict[str, TensorLayout] | None = None
        expert_layout: dict[str, TensorLayout] | None = None
        trunk_bytes = expert_bytes = 0
        for e, name in enumerate(layout.decoders):
            comp = self.src.component(name)
            model, arrays = self._load(comp)
            q = self.quantize(model, arrays, name, lambda weight: "trunk" if weight in trunk_src else "expert")
            trunk_names = [n for n, (_, origin) in q.tensors.items() if origin in trunk_src]
            expert_names = [n for n in q.tensors if n not in trunk_names]
            if trunk_layout is None:
                trunk_layout, _, trunk_bytes = _write_tensors(self.dir / trunk_file, trunk_names, q)
            elif sorted(trunk_layout) != sorted(trunk_names):
                raise Int8WriteError(f"{name}: its trunk tensors differ from decoder expert 0's")
            data_file = layout.expert_files[e]
            this_layout, _, expert_bytes = _write_tensors(self.dir / data_file, expert_names, q)
            if expert_layout is not None and this_layout != expert_layout:
                raise Int8WriteError(f"{name}: its expert tensors are laid out unlike expert 0's")
            expert_layout = this_layout
            where = {n: (trunk_file, trunk_layout[n]) for n in trunk_names} | {n: (data_file, this_layout[n]) for n in expert_names}
            _save_graph(q, where, self.dir / comp.file)
            self.components[name] = self._entry(comp, [comp.file, trunk_file, data_file], self.decoder_precision,
                                                self._extra(q), q)
            self.report[name] = self._stats(q)
            experts[e] = q
        q0 = experts[0]

        def describe(entries: dict[str, TensorLayout], source_layout: dict[str, TensorLayout]) -> dict[str, TensorLayout]:
            """Each written tensor with the parameter it came from and, for quantized data, scales and zero
            points, which initializer it quantizes (``quantization``: "int8" / "int4" / "scale" / "zero_point" /
            null, ``of``: that initializer)."""
            out = {}
            for n, entry in entries.items():
                origin = q0.tensors[n][1]
                src = source_layout.get(origin)
                bits = q0.code_bits.get(n)
                role = ((f"int{bits}" if bits else self.decoder_precision) if n.endswith("_quantized")
                        else None if n == origin
                        else "scale" if n.endswith("_scale") else "zero_point" if n.endswith("_zero_points") else None)
                out[n] = replace(entry, source=(src.source if src else None) or origin, transform=src.transform if src else None,
                                 extra={"quantization": role, "of": origin if role else None})
            return out

        assert trunk_layout is not None and expert_layout is not None
        return replace(layout, trunk=TrunkLayout(file=trunk_file, bytes=trunk_bytes,
                                                 tensors=describe(trunk_layout, layout.trunk.tensors)),
                       expert_bytes=expert_bytes, expert_tensors=describe(expert_layout, layout.expert_tensors))

    @classmethod
    def _extra(cls, q: QuantizedGraph) -> dict[str, Any]:
        """A quantized component's manifest fields: the counts, and ``int8_scheme`` for Q/DQ graphs."""
        return {**cls._stats(q), **({"int8_scheme": q.scheme} if q.scheme else {})}

    @staticmethod
    def _stats(q: QuantizedGraph) -> dict[str, Any]:
        return {"weights_quantized": q.weights_quantized, "activations_quantized": q.activations_quantized,
                "fp32_matmuls": len(q.kept_fp32), **({"fused": q.fused} if q.fused else {})}


def quantizer(scheme: str, table: dict[str, dict[str, float]] | None, act_dtype: str, keep_lm_head: bool,
              block_size: int, model_config: dict[str, Any] | None = None,
              stack: bool = True, attention: bool = True, bits: int = 8, symmetric: bool = True,
              method: str = "rtn", encoder_kernel: str = "nbits", decoder_kernel: str = "nbits",
              lm_head_bits: int | None = None) -> tuple[Quantizer, dict[str, Any]]:
    """The per-graph rewrite of ``scheme`` and the manifest's description of it. The weight-only graphs are
    ORT-only anyway, so they also get the ORT rotary fusion (needs ``model_config``); ``stack`` (weight-only) merges
    the products that read one activation into one ``MatMulNBits``; ``attention`` (weight-only) makes each decoder
    layer's attention one ``GroupQueryAttention`` over a shared KV buffer.

    ``bits`` 4 (weight-only): the decoders' weights are INT4 (``symmetric``, ``method`` "rtn" or "hqq", per
    ``block_size``); the other graphs (vision encoder, embedding) keep symmetric INT8 per block of 128. Decode reads
    every decoder weight per token, so its speed follows their bytes; the vision encoder runs once per tile over
    hundreds of patches, bound by arithmetic rather than weight bytes, so 4 bits would cost it accuracy and buy
    nothing. ``encoder_kernel`` "dynamic" (weight-only) gives those other graphs ``DynamicQuantizeMatMul`` (per-channel
    INT8 weights, activations quantized per call over their own range) instead of ``MatMulNBits``: ORT's integer
    GEMM, faster over hundreds of rows (``bench/prefill_kernels.py``). ``decoder_kernel`` "dynamic" (INT8 only) does
    the same for the decoders: the prefill runs on the integer GEMM, and on CPUs with VNNI or AMX a batch-1 decode
    step is as fast as ``MatMulNBits``'s (docs/benchmarks.md, "Seconds per tile"). ``lm_head_bits`` (weight-only;
    default 8) stores the lm_head of an INT4 decoder as INT8 per block of 128 (4: like the other products)."""
    keep = keep_fp32_predicate(keep_lm_head)
    lm_head_bits = lm_head_bits or 8
    lm_head = "fp32" if keep_lm_head else f"int{max(bits, lm_head_bits)}"
    if bits == 4 and scheme == "qdq":
        return int4_qdq_quantizer(keep, block_size, symmetric, method)
    if scheme == "qdq":
        if table is None:
            raise Int8WriteError("the Q/DQ scheme needs a calibration table (run `rsvlm-edge calibrate`)")
        amax = table
        return (lambda model, arrays, name, file_of: quantize_graph(model, arrays, amax.get(name, {}), keep, act_dtype),
                {"scheme": "explicit Q/DQ, weights per-channel symmetric pair-bounded INT8 (exact on x86 without VNNI: "
                           "see each component's int8_scheme), activations per-tensor symmetric",
                 "activation_dtype": act_dtype, "lm_head": lm_head})
    if scheme == "weight-only":
        from rsvlm_edge.calibration.weight_only import DEFAULT_BLOCK, WeightScheme, quantize_weight_only
        from rsvlm_edge.config import ModelConfig
        from rsvlm_edge.engines.ort_fusions import fuse_attention, fuse_rotary, fuse_skip_rms_norm

        cfg = ModelConfig.from_dict(model_config) if model_config else None
        try:
            for part, kernel in (("encoder", encoder_kernel), ("decoder", decoder_kernel)):
                if kernel not in ("nbits", "dynamic"):
                    raise ValueError(f"{part} kernel must be nbits or dynamic, got {kernel!r}")
            if decoder_kernel == "dynamic" and bits != 8:
                raise ValueError("the dynamic decoder kernel reads INT8 weights: use --precision int8")
            decoder_scheme = (WeightScheme(kernel="dynamic") if decoder_kernel == "dynamic" else
                              WeightScheme(bits=bits, block_size=block_size, symmetric=symmetric, method=method))
            if lm_head_bits not in (4, 8):
                raise ValueError(f"lm_head bits must be 4 or 8, got {lm_head_bits}")
        except ValueError as exc:
            raise Int8WriteError(str(exc)) from None
        other_scheme = (WeightScheme(kernel="dynamic") if encoder_kernel == "dynamic"
                        else decoder_scheme if bits == 8 else WeightScheme(block_size=DEFAULT_BLOCK))
        head = (is_lm_head, WeightScheme(block_size=DEFAULT_BLOCK)) if bits == 4 and lm_head_bits == 8 else None

        def weight_only(model: onnx.ModelProto, arrays: dict[str, np.ndarray], name: str,
                        file_of: FileOf) -> QuantizedGraph:
            q = quantize_weight_only(model, arrays, keep, fuse=stack, file_of=file_of,
                                     scheme=decoder_scheme if name.startswith("decoder") else other_scheme,
                                     head=head if name.startswith("decoder") else None)
            if cfg is not None:
                q.fused["rotary"] = fuse_rotary(q.model, cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
                if name.startswith("decoder"):
                    if attention:
                        q.fused["attention"] = fuse_attention(q.model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                              cfg.num_layers, cfg.rope_theta,
                                                              cfg.max_position_embeddings)
                        if q.fused["attention"]:
                            del q.fused["rotary"]  # the rotary nodes went into GroupQueryAttention
                    q.fused["skip_rms_norm"] = fuse_skip_rms_norm(q.model)
            return q

        kind = "symmetric" if symmetric else f"asymmetric ({method.upper()})"
        text = ("weight-only INT8 decoders (ONNX Runtime DynamicQuantizeMatMul), per channel" if decoder_kernel == "dynamic"
                else f"weight-only INT8 (ONNX Runtime MatMulNBits), symmetric per block of {block_size} along K"
                if bits == 8 else
                f"weight-only INT4 decoders (ONNX Runtime MatMulNBits), {kind} per block of {block_size} along K")
        text += ("; other graphs INT8 per channel read by DynamicQuantizeMatMul" if encoder_kernel == "dynamic"
                 else "" if bits == 8 else f"; other graphs INT8 symmetric per block of {other_scheme.block_size}")
        return (weight_only,
                {"scheme": f"{text}; activations quantized at run time ("
                           + ("per call over their own range" if decoder_kernel == "dynamic" else "per block") + ")",
                 "weight_block_size": block_size,
                 "weight_bits": bits, "decoder_weights": decoder_scheme.describe(),
                 "other_weights": other_scheme.describe(),
                 "activation_dtype": "dynamic", "lm_head": lm_head, "runtime": "onnxruntime",
                 "fusions": (["stacked MatMulNBits (shared-input products, bias folded)"] if stack else [])
                            + ((["GroupQueryAttention (rotary inside, shared KV buffer)"] if attention
                                else ["RotaryEmbedding"]) if cfg is not None else [])
                            + (["SkipSimplifiedLayerNormalization (residual add + RMSNorm)"] if cfg is not None else [])})
    raise Int8WriteError(f"INT8 scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def int4_qdq_quantizer(keep: Callable[[onnx.NodeProto], bool] | None, block_size: int, symmetric: bool,
                       method: str) -> tuple[Quantizer, dict[str, Any]]:
    """INT4 weight-only decoders as blockwise Q/DQ for TensorRT >= 10 (:mod:`~rsvlm_edge.calibration.int4_qdq`);
    the other graphs are copied FP32 (TensorRT builds them in FP16)."""
    from rsvlm_edge.calibration.int4_qdq import OPSET, quantize_int4_qdq

    if not symmetric or method != "rtn":
        raise Int8WriteError("TensorRT reads INT4 weights with zero points of 0: the Q/DQ INT4 scheme is symmetric "
                             "round-to-nearest (drop --asymmetric / --method hqq)")
    return (lambda model, arrays, name, file_of: quantize_int4_qdq(model, arrays, keep, block_size),
            {"scheme": f"INT4 weight-only decoders as blockwise Q/DQ (DequantizeLinear axis 0, block_size "
                       f"{block_size}, opset {OPSET}), symmetric round to nearest (onnxruntime's quantizer); "
                       f"activations float; other graphs FP32", "weight_block_size": block_size, "weight_bits": 4,
             "activation_dtype": "float", "lm_head": "fp32" if keep else "int4", "runtime": "tensorrt"})


def write_int8_engine(src_dir: str | Path, out_dir: str | Path, table: dict[str, dict[str, float]] | None,
                      act_dtype: str = "int8", keep_lm_head: bool = False, overwrite: bool = False,
                      extra_files: dict[str, bytes] | None = None, info: dict[str, Any] | None = None,
                      progress: Callable[[str], None] | None = None, scheme: str = "qdq",
                      block_size: int = 128, stack: bool = True, attention: bool = True, bits: int = 8,
                      symmetric: bool = True, method: str = "rtn", encoder_kernel: str = "nbits",
                      decoder_kernel: str = "nbits", lm_head_bits: int | None = None) -> Manifest:
    """Quantize ``src_dir`` (an FP32 ONNX engine dir) into ``out_dir``; ``extra_files`` (name -> bytes) are
    written beside (the calibration table, TensorRT caches). ``scheme`` "qdq" needs ``table`` (activation ranges);
    "weight-only" ignores it and takes ``bits`` (8, or 4 for the decoders: see :func:`quantizer`), ``symmetric``
    and ``method``. Returns the new, saved manifest."""
    from rsvlm_edge.fileio import atomic_write_bytes

    src = Manifest.load(src_dir, verify=True)
    if src.engine_kind != "onnx":
        raise Int8WriteError(f"{src_dir} holds {src.engine_kind} engines; INT8 quantization needs the exported ONNX")
    quantize, description = quantizer(scheme, table, act_dtype, keep_lm_head, block_size, src.model_config, stack,
                                      attention, bits, symmetric, method, encoder_kernel, decoder_kernel,
                                      lm_head_bits)
    precision = f"int{bits}"
    bad = [c.name for c in src.components.values() if c.precision != "fp32"]
    if bad:
        raise Int8WriteError(f"{src_dir} is not an FP32 export ({', '.join(bad)} are {src.components[bad[0]].precision}); "
                             f"quantize the fp32 export")
    out_dir = Path(out_dir)
    with staged_dir(out_dir, overwrite, Int8WriteError) as staging:
        writer = Int8Writer(src, staging, quantize, decoder_precision=precision)
        decoders = set(src.experts.decoders)
        trt_int4 = bits == 4 and scheme == "qdq"  # only the decoders are quantized
        for comp in src.components.values():
            if comp.name in decoders:
                continue
            if progress:
                progress(comp.name)
            if comp.extra.get("kind") in COPIED_KINDS or comp.name.startswith(("vision_stem_", "router")) or trt_int4:
                writer.copy(comp)
            else:
                writer.simple(comp)
        if progress:
            progress("decoder")
        experts = writer.decoder()
        copy_side_files(src, staging)
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(staging / name, data)
        extra = dict(src.extra)
        extra["quantization"] = {"precision": precision, **description, "source_sha256": src.all_files(),
                                 "components": writer.report, **(info or {})}
        components = {name: writer.components[name] for name in src.components}
        manifest = Manifest(model_config=src.model_config, components=components, tokenizer=src.tokenizer,
                            generation_config=src.generation_config,
                            experts=experts, engine=dict(src.engine), extra=extra)
        manifest.save(staging)
        if scheme == "qdq" and bits == 8:
            prove_saturation_free(staging)
    return Manifest.load(out_dir, verify="size")


def prove_saturation_free(engine_dir: Path) -> None:
    """Refuse to finish a Q/DQ dir whose weights could saturate a non-VNNI x86 kernel (the writer's own check of
    :func:`~rsvlm_edge.calibration.saturation.prove_engine_dir`; OUT_DIR is then left untouched)."""
    from rsvlm_edge.calibration.saturation import SaturationError, prove_engine_dir

    try:
        prove_engine_dir(engine_dir)
    except SaturationError as exc:
        raise Int8WriteError(str(exc)) from None
