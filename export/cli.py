"""``rsvlm-edge export``: a checkpoint (or a random-init preset) -> an ONNX engine directory for the ort backend.

Importing this module is cheap and torch-free (the main CLI registers it at start-up); the work happens in
:mod:`rsvlm_edge.export.exporter`, imported when the command runs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click

from rsvlm_edge.config import PRESETS
from rsvlm_edge.export.names import COMPONENT_CHOICES
from rsvlm_edge.sampling import GENERATION_CONFIG_FILE

COMPONENT_HELP = ("vision (stems + encoder), stems, encoder, embedding, router, decoder; repeat or comma-separate. "
                  "Default: all")


class ExportUsageError(click.ClickException):
    exit_code = 2


def _components(values: tuple[str, ...]) -> tuple[str, ...] | None:
    out = tuple(c.strip().lower() for v in values for c in v.split(",") if c.strip())
    bad = [c for c in out if c not in COMPONENT_CHOICES]
    if bad:
        raise ExportUsageError(f"unknown component(s) {', '.join(bad)}; choose from {', '.join(COMPONENT_CHOICES)}")
    return out or None


@click.command("export", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("paths", nargs=-1, metavar="[CHECKPOINT] OUT_DIR")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: FP16 weights and math with FP32 kept for norms, softmax, rotary angles and the final logits; "
                   "inputs/outputs stay FP32. Prints the fp16-vs-fp32 differences and greedy token agreement.")
@click.option("--components", "components", multiple=True, metavar="NAMES", help=COMPONENT_HELP + ".")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Validate every graph (onnx.checker, strict shape inference, opset, TensorRT 8.5/10.3/11 operator "
                   "lists, INT64 rules) and compare it with PyTorch on random inputs; any failure aborts the export.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 20),
              help="ONNX opset. 17 is the highest TensorRT 8.5 (JetPack 5) reads; with a higher one pass --trt 10.3,11.")
@click.option("--trt", "trt_versions", default="8.5,10.3,11", show_default=True, metavar="VERSIONS",
              help="TensorRT versions whose ONNX parser the checks target (comma-separated, from 8.5, 10.3, 11).")
@click.option("--config", "config_name", type=click.Choice(sorted(PRESETS)),
              help="With --random-init: the preset to build (no CHECKPOINT needed).")
@click.option("--random-init", is_flag=True, help="Export random weights of --config (for benchmarks and tests).")
@click.option("--seed", default=0, show_default=True, help="Seed for --random-init weights.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              help="tokenizer.json to ship (default: the checkpoint's; --random-init trains a small one).")
@click.option("--fp16-lm-head", is_flag=True, help="fp16 only: run lm_head in FP16 as well (halves its size; logits "
                                                   "are still returned as FP32).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--threads", type=int, help="CPU threads for the checks (PyTorch and ONNX Runtime).")
def export_command(paths, precision, components, check, opset, trt_versions, config_name, random_init, seed,
                   tokenizer_path, fp16_lm_head, overwrite, threads) -> None:
    """Export a model to per-component ONNX graphs that the `ort` backend runs without PyTorch.

    \b
    OUT_DIR receives:
      vision_stem_<sensor>.onnx   one per sensor: bands -> 3-channel input of the shared encoder
      vision_encoder.onnx         ViT (+ CNN branch) + projector, weights stored once for all sensors
      embedding.onnx, router.onnx
      decoder_expert{0,1,2}.onnx  one decoder step (prefill or decode with a KV cache) per expert;
                                  the shared trunk lives once in decoder_trunk.bin, each expert's FFN
                                  weights in decoder_expert<e>.bin (an expert loads on its own)
      manifest.json               IO names/shapes, precision, sha256 of every file, expert layout
      config.json, tokenizer.json
    The export runs component by component into a temporary directory that replaces OUT_DIR only
    when everything (checks included) succeeded.

    \b
    Examples:
      rsvlm-edge export models/tiny-demo engines/tiny-fp32
      rsvlm-edge export models/tiny-demo engines/tiny-fp16 --precision fp16
      rsvlm-edge export models/tiny-demo engines/tiny-text --components embedding,router,decoder
      rsvlm-edge export --config rsunivlm-1b --random-init engines/rsunivlm-1b-random --no-check
      rsvlm-edge infer engines/tiny-fp32 tile.png --task cap      # then run it (ort backend)
    """
    if random_init:
        if len(paths) != 1:
            raise ExportUsageError("with --random-init give only OUT_DIR (no CHECKPOINT)")
        if not config_name:
            raise ExportUsageError("--random-init needs --config (one of: " + ", ".join(sorted(PRESETS)) + ")")
        checkpoint, out_dir = None, Path(paths[0])
    else:
        if len(paths) != 2:
            raise ExportUsageError("give CHECKPOINT OUT_DIR (or --config NAME --random-init OUT_DIR)")
        if config_name:
            raise ExportUsageError("--config only applies with --random-init (a checkpoint carries its own config)")
        checkpoint, out_dir = Path(paths[0]), Path(paths[1])
    if fp16_lm_head and precision != "fp16":
        raise ExportUsageError("--fp16-lm-head only applies with --precision fp16")
    chosen = _components(components)
    trt = tuple(v.strip() for v in trt_versions.split(",") if v.strip())
    if not set(trt) <= {"8.5", "10.3", "11"}:
        raise ExportUsageError(f"--trt takes versions from 8.5, 10.3, 11; got {trt_versions}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ExportUsageError("export needs PyTorch and ONNX: pip install 'rsvlm-edge[export]'") from None

    from rsvlm_edge.config import ConfigError, preset
    from rsvlm_edge.export.checks import ExportCheckError
    from rsvlm_edge.export.compare import format_comparison
    from rsvlm_edge.export.exporter import ExportError, ExportOptions, export_model
    from rsvlm_edge.export.sources import SourceError, load_checkpoint, random_init_tokenizer, random_model

    t0 = time.perf_counter()
    echo = lambda msg: click.echo(f"[{time.perf_counter() - t0:7.1f}s] {msg}", err=True)  # noqa: E731
    tmp_tok = None
    if threads:
        torch.set_num_threads(threads)
    try:
        if checkpoint is not None:
            echo(f"loading checkpoint {checkpoint}")
            model, tokenizer = load_checkpoint(checkpoint)
            source = str(checkpoint)
        else:
            cfg = preset(config_name)
            echo(f"building random-init {cfg.name} (seed {seed})")
            model = random_model(cfg, seed)
            source = f"random-init {cfg.name} seed {seed}"
            tokenizer = None
            if tokenizer_path is None:
                tmp_tok = Path(tempfile.mkdtemp(prefix="rsvlm-tokenizer-"))
                tokenizer = random_init_tokenizer(cfg, seed, tmp_tok)
        if tokenizer_path is not None:
            tokenizer = Path(tokenizer_path)
        if tokenizer is None:
            raise ExportUsageError(f"{checkpoint} has no tokenizer.json; pass --tokenizer PATH")
        options = ExportOptions(precision=precision, opset=opset, components=chosen, check=check,
                                fp16_lm_head=fp16_lm_head, overwrite=overwrite, threads=threads, trt_versions=trt)
        generation = Path(checkpoint) / GENERATION_CONFIG_FILE if checkpoint is not None else None
        result = export_model(model, out_dir, tokenizer, options, progress=echo, source=source,
                              generation_config_file=generation if generation and generation.is_file() else None)
    except (ExportError, ExportCheckError, SourceError, ConfigError, OSError) as exc:
        raise ExportUsageError(str(exc)) from None
    finally:
        if tmp_tok is not None:
            shutil.rmtree(tmp_tok, ignore_errors=True)
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    click.echo(f"exported {len(result.manifest.components)} components ({precision}) to {out_dir}: {total / 1e6:.1f} MB; "
               f"export {result.seconds:.1f} s, total {time.perf_counter() - t0:.1f} s, peak RSS "
               f"{result.peak_rss_mb / 1024:.2f} GB")
    if result.comparison is not None:
        click.echo(format_comparison(result.comparison))
    if check:
        click.echo(f"checks: onnx.checker, strict shape inference, TensorRT {'/'.join(trt)} operators and INT64 rules, "
                   f"parity with PyTorch: all passed")
