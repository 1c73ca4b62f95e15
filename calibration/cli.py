"""`rsvlm-edge calibrate`: INT8 calibration on sample tiles -> an INT8 ONNX engine dir (torch-free)."""

from __future__ import annotations

import click

from rsvlm_edge.calibration.ranges import METHODS


@click.command("calibrate")
@click.argument("onnx_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("tiles", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="INT8 engine dir to write.")
@click.option("--method", type=click.Choice(METHODS), default="entropy", show_default=True,
              help="entropy: KL-divergence threshold (TensorRT's); percentile: clip at --percentile of |x|; "
                   "minmax: the largest |x| seen.")
@click.option("--percentile", default=99.99, show_default=True, help="For --method percentile.")
@click.option("--limit", type=int, default=32, show_default=True, help="Use at most N tiles (spread over the inputs).")
@click.option("--sensor", help="Force the sensor of every tile (default: guessed per tile).")
@click.option("--decode-steps", default=4, show_default=True, help="Decode steps recorded after each prefill.")
@click.option("--activations", "act_dtype", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="Activation Q/DQ type. uint8 (zero point 128, the same symmetric grid) runs ONNX Runtime's fast "
                   "U8S8 CPU kernels; int8 (zero point 0) is what TensorRT's Q/DQ import accepts.")
@click.option("--keep-lm-head", is_flag=True, help="Keep the final lm_head (logits) MatMul in FP32.")
@click.option("--trt-version", default="8.6.1", show_default=True, help="TensorRT version the caches are tagged for.")
@click.option("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def calibrate_command(onnx_dir, tiles, out_dir, method, percentile, limit, sensor, decode_steps, act_dtype,
                      keep_lm_head, trt_version, threads, overwrite, quiet) -> None:
    """Calibrate the FP32 engine dir ONNX_DIR on TILES (image files or folders: PNG, JPEG, GeoTIFF, any sensor) and
    write an INT8 engine dir.

    Every tile runs once per decoder expert with a real task instruction ([CAP], [VG], [SEG] ...): the vision
    encoder sees the tiles, each expert's decoder sees real visual tokens + prompts (prefill and --decode-steps
    decode steps). OUT_DIR gets explicit Q/DQ INT8 graphs (per-channel weights, per-tensor activations; norms,
    softmax, rotary, router and sensor stems stay FP32) in the export's trunk/expert file layout, calibration.json
    (per tensor amax) and trt_calib/<component>.cache (TensorRT 8.5-10.x calibration caches).

    \b
    Examples:
      rsvlm-edge calibrate engines/tiny data/aid data/sirst --out engines/tiny-int8
      rsvlm-edge calibrate engines/tiny tiles/ --out engines/tiny-int8 --method percentile --limit 64
      rsvlm-edge infer engines/tiny-int8 tile.png --task cap
    """
    from rsvlm_edge.calibration.calibrate import calibrate
    from rsvlm_edge.calibration.int8_writer import Int8WriteError
    from rsvlm_edge.calibration.samples import CalibrationInputError
    from rsvlm_edge.manifest import ManifestError

    if limit is not None and limit < 1:
        raise click.BadParameter("must be >= 1", param_hint="--limit")
    if decode_steps < 0:
        raise click.BadParameter("must be >= 0", param_hint="--decode-steps")
    try:
        manifest = calibrate(onnx_dir, list(tiles), out_dir, method=method, limit=limit, act_dtype=act_dtype,
                             trt_version=trt_version, overwrite=overwrite, sensor=sensor, decode_steps=decode_steps,
                             threads=threads or None, keep_lm_head=keep_lm_head, percentile=percentile,
                             progress=not quiet)
    except (CalibrationInputError, Int8WriteError, ManifestError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    q = manifest.extra["quantization"]
    click.echo(f"INT8 engine dir written to {out_dir} ({q['calibration']['tiles']} tiles, {method}; "
               f"table {q['calibration']['table']}, TensorRT caches in {q['calibration']['trt_cache_dir']}/)")
