"""ONNX Runtime engine dirs: graph-optimized FP32 and explicit Q/DQ INT8, in the export's layout.

FP32: stems, vision encoder, embedding and router are saved after ONNX Runtime's *basic* graph optimizations
(constant folding, redundant-node elimination: hardware-independent, so the files stay portable; the extended,
CPU-specific fusions are applied again at load time anyway). Decoder graphs are copied unchanged: the backend binds
the shared trunk and expert weights by initializer name, which optimizing a graph may rename.
INT8: :func:`rsvlm_edge.calibration.int8_writer.write_int8_engine`, either explicit Q/DQ from a calibration table
(portable to TensorRT) or weight-only ``MatMulNBits`` (ONNX Runtime only, no calibration; the faster CPU decode).
INT4: weight-only ``MatMulNBits`` decoders quantized by onnxruntime's MatMulNBits quantizer (RTN or HQQ, symmetric
or asymmetric, per block of 16-256), the other graphs weight-only INT8.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rsvlm_edge.calibration.int8_writer import Int8WriteError
from rsvlm_edge.fileio import staged_dir
from rsvlm_edge.manifest import Component, Manifest, copy_side_files, sha256_file

PRECISIONS = ("fp32", "int8", "int4")
#: Weights per scale along K when none is given: 128 for INT8 (finer buys nothing measurable at 8 bits), 32 for INT4
#: (a 4-bit step is 16x coarser, so each scale covers fewer weights; llama.cpp's Q4_0 and ORT GenAI also use 32).
DEFAULT_BLOCK = {"int8": 128, "int4": 32}


def optimize_component(src: Manifest, comp: Component, out_dir: Path, level: str = "basic") -> Component:
    """Save ``comp`` optimized into ``out_dir`` (graph + ``<name>.bin``) and return its manifest entry."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.optimized_model_filepath = str(out_dir / comp.file)
    data_file = f"{comp.name}.bin"
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
    ort.InferenceSession(str(src.path(comp.file)), so, providers=["CPUExecutionProvider"])
    files = [comp.file] + ([data_file] if (out_dir / data_file).exists() else [])
    sizes = {f: (out_dir / f).stat().st_size for f in files}
    return Component(name=comp.name, file=comp.file, precision=comp.precision, inputs=comp.inputs, outputs=comp.outputs,
                     sha256={f: sha256_file(out_dir / f) for f in files}, external_data=files[1:],
                     extra={**comp.extra, "bytes": sizes, "ort_optimization": level})


def build_ort_fp32(onnx_dir: str | Path, out_dir: str | Path, overwrite: bool = False, level: str = "basic") -> Manifest:
    src = Manifest.load(onnx_dir, verify=True)
    if src.engine_kind != "onnx" or any(c.precision != "fp32" for c in src.components.values()):
        raise Int8WriteError(f"{onnx_dir} is not an FP32 ONNX export")
    decoders = set(src.experts.decoders)
    out_dir = Path(out_dir)
    with staged_dir(out_dir, overwrite, Int8WriteError) as staging:
        components = {}
        for comp in src.components.values():
            if comp.name in decoders:
                for f in comp.files:
                    if not (staging / f).exists():
                        shutil.copy2(src.path(f), staging / f)
                components[comp.name] = comp
            else:
                components[comp.name] = optimize_component(src, comp, staging, level)
        copy_side_files(src, staging)
        extra = {**src.extra, "ort_build": {"precision": "fp32", "optimization": level}}
        Manifest(model_config=src.model_config, components=components, tokenizer=src.tokenizer, experts=src.experts,
                 engine=dict(src.engine), extra=extra, generation_config=src.generation_config).save(staging)
    return Manifest.load(out_dir, verify="size")


def build_ort(onnx_dir: str | Path, out_dir: str | Path, precision: str = "fp32", calibration: str | Path | None = None,
              overwrite: bool = False, act_dtype: str = "uint8", keep_lm_head: bool = False, scheme: str | None = None,
              block_size: int | None = None, stack: bool = True, attention: bool = True, symmetric: bool | None = None,
              method: str = "rtn", encoder_kernel: str | None = None, decoder_kernel: str | None = None,
              lm_head_bits: int | None = None) -> Manifest:
    """An ORT engine dir: ``fp32`` (optimized graphs), ``int8`` (``scheme`` "qdq", the default: Q/DQ from the
    calibration table; "weight-only": blockwise INT8 weights for ``MatMulNBits``, no table, shared-input products
    stacked unless ``stack`` is False, attention fused into ``GroupQueryAttention`` unless ``attention`` is False)
    or ``int4`` (INT4 weight-only decoders; ``scheme`` "weight-only", the default: ``MatMulNBits``, ``symmetric``
    (default asymmetric), ``method`` "rtn" or "hqq"; "qdq": symmetric blockwise Q/DQ for TensorRT >= 10).
    Weight-only builds: ``encoder_kernel`` (default "dynamic") and ``decoder_kernel`` (default "nbits") pick the
    kernels (:func:`rsvlm_edge.calibration.int8_writer.quantizer`); ``lm_head_bits`` (int4 weight-only, default 8)
    the bits of the decoders' lm_head."""
    if precision not in PRECISIONS:
        raise ValueError(f"ORT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return build_ort_fp32(onnx_dir, out_dir, overwrite)
    from rsvlm_edge.calibration.int8_writer import write_int8_engine

    scheme = scheme or ("weight-only" if precision == "int4" else "qdq")
    block_size = block_size or DEFAULT_BLOCK[precision]
    if scheme != "weight-only" and (encoder_kernel, decoder_kernel) != (None, None):
        raise ValueError("--encoder-kernel and --decoder-kernel apply to --scheme weight-only")
    encoder_kernel, decoder_kernel = encoder_kernel or "dynamic", decoder_kernel or "nbits"
    if lm_head_bits is not None and not (precision == "int4" and scheme == "weight-only"):
        raise ValueError("--lm-head-bits applies to --precision int4 (weight-only)")
    if lm_head_bits is not None and keep_lm_head:
        raise ValueError("--lm-head-bits and --keep-lm-head (FP32) exclude each other")
    if decoder_kernel != "nbits" and precision != "int8":
        raise ValueError("--decoder-kernel dynamic reads INT8 weights: use --precision int8")
    if precision == "int4" and scheme == "qdq":  # for TensorRT >= 10: INT4 blockwise Q/DQ decoders
        if calibration is not None:
            raise ValueError("--precision int4 needs no --calibration (it quantizes weights only)")
        return write_int8_engine(onnx_dir, out_dir, None, keep_lm_head=keep_lm_head, overwrite=overwrite,
                                 scheme=scheme, block_size=block_size, bits=4, symmetric=symmetric is not False,
                                 method=method)
    if precision == "int8" and (symmetric is False or method != "rtn"):
        raise ValueError("--asymmetric and --method apply to --precision int4 (INT8 weights are symmetric RTN)")
    if scheme == "weight-only":
        if calibration is not None:
            raise ValueError("--scheme weight-only needs no --calibration (it quantizes weights only)")
        return write_int8_engine(onnx_dir, out_dir, None, keep_lm_head=keep_lm_head, overwrite=overwrite,
                                 scheme=scheme, block_size=block_size, stack=stack, attention=attention,
                                 bits=4 if precision == "int4" else 8,
                                 symmetric=precision == "int8" if symmetric is None else symmetric, method=method,
                                 encoder_kernel=encoder_kernel, decoder_kernel=decoder_kernel,
                                 lm_head_bits=lm_head_bits)
    if not stack:
        raise ValueError("--no-stack applies to --scheme weight-only (the Q/DQ scheme stacks nothing)")
    if not attention:
        raise ValueError("--no-fuse-attention applies to --scheme weight-only (Q/DQ graphs stay portable to TensorRT)")
    if calibration is None:
        raise ValueError("--precision int8 needs --calibration TABLE (run `rsvlm-edge calibrate` first, "
                         "or use it directly: it writes the INT8 engine dir), or use --scheme weight-only")
    from rsvlm_edge.calibration.table import load_table

    table, meta = load_table(calibration)
    return write_int8_engine(onnx_dir, out_dir, table, act_dtype=act_dtype, keep_lm_head=keep_lm_head,
                             overwrite=overwrite, info={"calibration": {**meta, "table": str(calibration)}})
