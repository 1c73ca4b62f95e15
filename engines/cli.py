"""`rsvlm-edge build`: engine dirs for ONNX Runtime (fp32 optimized / int8 Q/DQ) or TensorRT plans."""

from __future__ import annotations

import click

TRT_PRESETS = ("orin-agx", "orin-nx", "orin-nano", "datacenter")


class NoTensorRT(click.ClickException):
    """TensorRT (or the builder) is not available here: exit code 2, one line."""

    exit_code = 2


def _build_trt(onnx_dir, out_dir, preset, precision, calib_cache, timing_cache) -> None:
    try:
        from rsvlm_edge.backends.trt_env import TrtUnavailableError
        from rsvlm_edge.engines.trt_build import TrtBuildError, build_trt_engines
    except ImportError as exc:
        raise NoTensorRT(f"TensorRT builds need the trt extra on the target device "
                                   f"(pip install 'rsvlm-edge[trt]'): {exc}") from None
    try:
        build_trt_engines(onnx_dir, out_dir, preset=preset, precision=precision, calib_cache=calib_cache,
                          timing_cache=timing_cache, log=lambda m: click.echo(m, err=True))
    except (ImportError, TrtUnavailableError) as exc:  # tensorrt itself is imported lazily by the builder
        raise NoTensorRT(str(exc).splitlines()[0] if str(exc) else "TensorRT is not installed here") from None
    except TrtBuildError as exc:  # not an engine dir, a graph TensorRT cannot parse: one line, no traceback
        raise NoTensorRT(str(exc)) from None


@click.command("build")
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default=None,
              help="ort: fp32 (default), int8 or int4 (weight-only INT4 decoders); trt: fp16 (default), int8, or "
                   "int4 (TensorRT >= 10, from an `--precision int4 --scheme qdq` dir).")
@click.option("--calibration", type=click.Path(exists=True), help="ort int8: calibration.json from `rsvlm-edge calibrate`; "
              "trt int8 (TensorRT 8.5-10.x): a TensorRT cache file or a trt_calib/ folder of <component>.cache.")
@click.option("--activations", "act_dtype", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="ort int8: activation Q/DQ type (uint8 = fast ORT CPU kernels, int8 = TensorRT Q/DQ import).")
@click.option("--scheme", type=click.Choice(["qdq", "weight-only"]), default=None,
              help="ort int8: qdq (default) = explicit Q/DQ from --calibration (also imports into TensorRT); "
                   "weight-only = blockwise INT8 weights for ONNX Runtime's MatMulNBits, no calibration, faster CPU "
                   "decode. ort int4: weight-only (default, MatMulNBits) or qdq (symmetric blockwise INT4 Q/DQ, "
                   "opset 21: the ONNX dir TensorRT >= 10 builds INT4 plans from).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
              help="ort weight-only: weights per scale along K [default: 128 for int8, 32 for int4].")
@click.option("--symmetric/--asymmetric", default=None,
              help="ort int4: symmetric codes, or a 4-bit zero point per block (the default, more accurate).")
@click.option("--method", type=click.Choice(["rtn", "hqq"]), default="rtn", show_default=True,
              help="ort int4: rtn = round to nearest; hqq = half-quadratic refinement of each block's zero point "
                   "(asymmetric; needs torch to build). Both from onnxruntime's MatMulNBits quantizer.")
@click.option("--encoder-kernel", type=click.Choice(["nbits", "dynamic"]), default=None,
              help="ort weight-only: the kernel of the vision encoder and the other non-decoder graphs: dynamic (the "
                   "default) = DynamicQuantizeMatMul (per-channel INT8, activations quantized per call over their own "
                   "range: ORT's integer GEMM, about 2x faster over a tile's hundreds of patches); nbits = MatMulNBits "
                   "(blockwise INT8, activations quantized per block).")
@click.option("--decoder-kernel", type=click.Choice(["nbits", "dynamic"]), default=None,
              help="ort int8 weight-only: the decoders' kernel: nbits (the default) = MatMulNBits (blockwise INT8); "
                   "dynamic = DynamicQuantizeMatMul (per-channel INT8): the prefill on the integer GEMM, 2-3x faster "
                   "over a prompt's hundreds of tokens, and decode as fast as nbits on CPUs with VNNI or AMX: the "
                   "engine for tiles (on CPUs without VNNI, compare both with `rsvlm-edge bench-peers`).")
@click.option("--stack/--no-stack", default=True, show_default=True,
              help="ort int8 weight-only: stack the products that read one activation (q/k/v with their biases, "
                   "gate/up) into one MatMulNBits + Split; --no-stack keeps one node per weight (a baseline to bench).")
@click.option("--fuse-attention/--no-fuse-attention", "attention", default=True, show_default=True,
              help="ort int8 weight-only: one GroupQueryAttention per decoder layer over a shared (batch, kv_heads, "
                   "capacity, head_dim) KV buffer in place of the rotary/concat/transpose/softmax chain; "
                   "--no-fuse-attention keeps the exported attention and KV layout (a baseline to bench).")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]), default=None,
              help="ort int4 weight-only: bits of the lm_head (the logits' projection) [default: 8, per block of 128: it "
                   "picks every answer token among near-ties; 4 saves 53 MB per token on rsunivlm-1b and costs "
                   "captions about 4 BLEU points on the demo model].")
@click.option("--keep-lm-head", is_flag=True, help="ort int8/int4: keep the lm_head (logits) in FP32.")
@click.option("--preset", type=click.Choice(TRT_PRESETS), default="datacenter", show_default=True, help="trt only.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="trt only: TensorRT timing cache file (reused).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def build_command(onnx_dir, out_dir, target, precision, calibration, act_dtype, scheme, block_size, symmetric, method,
                  encoder_kernel, decoder_kernel, stack, attention, lm_head_bits, keep_lm_head,
                  preset, timing_cache, overwrite) -> None:
    """Build engines from the exported ONNX engine dir ONNX_DIR into OUT_DIR.

    \b
    ONNX Runtime (portable, CPU):
      rsvlm-edge build engines/tiny engines/tiny-opt --target ort --precision fp32
      rsvlm-edge build engines/tiny engines/tiny-int8 --target ort --precision int8 --calibration calib.json
      rsvlm-edge build engines/tiny engines/tiny-int8w --target ort --precision int8 --scheme weight-only
      rsvlm-edge build engines/tiny engines/tiny-tiles --precision int8 --scheme weight-only --decoder-kernel dynamic
      rsvlm-edge build engines/tiny engines/tiny-int4 --target ort --precision int4 --block-size 32
    TensorRT (run on the target device; plans are device-specific):
      rsvlm-edge build engines/tiny engines/tiny-trt --target trt --preset orin-agx --precision fp16
      rsvlm-edge build engines/tiny engines/tiny-trt8 --target trt --precision int8 --calibration engines/tiny-int8/trt_calib
      rsvlm-edge build engines/tiny engines/tiny-int4q --target ort --precision int4 --scheme qdq   # then, on the device:
      rsvlm-edge build engines/tiny-int4q engines/tiny-trt4 --target trt --precision int4

    `rsvlm-edge calibrate` writes the calibration table and TensorRT caches (and the ORT INT8 dir directly).
    """
    if target == "trt":
        precision = precision or "fp16"
        if precision not in ("fp16", "int8", "fp32", "int4"):
            raise click.BadParameter(f"TensorRT builds take fp16, int8 or int4, not {precision}", param_hint="--precision")
        if scheme is not None or block_size is not None or symmetric is not None or method != "rtn":
            raise click.BadParameter("applies to --target ort", param_hint="--scheme/--block-size/--symmetric/--method")
        _build_trt(onnx_dir, out_dir, preset, precision, calibration, timing_cache)
        click.echo(f"TensorRT {precision} plans written to {out_dir}")
        return
    precision = precision or "fp32"
    if precision == "fp16":
        raise click.BadParameter("ONNX Runtime builds take fp32 or int8 (or int4 weight-only; for FP16 ONNX use `rsvlm-edge export "
                                 "--precision fp16`)", param_hint="--precision")
    from rsvlm_edge.calibration.int8_writer import Int8WriteError  # these import onnx (the export extra)
    from rsvlm_edge.calibration.table import CalibrationTableError
    from rsvlm_edge.engines.ort_build import build_ort
    from rsvlm_edge.manifest import ManifestError

    try:
        build_ort(onnx_dir, out_dir, precision, calibration, overwrite=overwrite, act_dtype=act_dtype,
                  keep_lm_head=keep_lm_head, scheme=scheme, block_size=int(block_size) if block_size else None,
                  stack=stack, attention=attention, symmetric=symmetric, method=method, encoder_kernel=encoder_kernel,
                  decoder_kernel=decoder_kernel, lm_head_bits=int(lm_head_bits) if lm_head_bits else None)
    except (Int8WriteError, CalibrationTableError, ManifestError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if precision == "int4" and scheme == "qdq":
        click.echo(f"INT4 Q/DQ ONNX dir for TensorRT >= 10 written to {out_dir} (build its plans with --target trt "
                   f"--precision int4)")
        return
    what = f"{precision} ({scheme or ('weight-only' if precision == 'int4' else 'qdq')})" if precision != "fp32" else precision
    click.echo(f"ONNX Runtime {what} engine dir written to {out_dir}")
