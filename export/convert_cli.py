"""``rsvlm-edge convert``: checkpoints of other codebases -> model dirs of this runtime. Importing this module is
cheap (the main CLI registers it at start-up); the work is in :mod:`rsvlm_edge.export.convert_rsunivlm`."""

from __future__ import annotations

import click

from rsvlm_edge.cli_options import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group("convert", context_settings=CONTEXT)
def convert_command() -> None:
    """Convert a published checkpoint into a model dir (config.json, model.safetensors, tokenizer.json) that
    export, infer --backend torch, chat, eval and bench take like any other."""


@convert_command.command("rsunivlm", context_settings=CONTEXT,
                          short_help="RSUniVLM (liux-cyber/RSUniVLM, llava_qwen_gmoe) -> a model dir.")
@click.argument("src_dir", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--dtype", type=click.Choice(["fp16", "fp32", "bf16"]), default="fp16", show_default=True,
              help="Stored weight dtype. BF16 -> FP16 keeps every bit of a weight within FP16's range (values "
                   "beyond it are refused); fp32 doubles the size; bf16 copies the tensors as they are.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def rsunivlm(src_dir: str, out_dir: str, dtype: str, overwrite: bool, progress: bool) -> None:
    """RSUniVLM (Hugging Face liux-cyber/RSUniVLM, arch llava_qwen_gmoe): SRC_DIR holds config.json,
    tokenizer.json, model.safetensors (or shards with model.safetensors.index.json) and optionally
    generation_config.json.

    \b
    Every tensor is checked against the architecture config.json describes (names, shapes, one float dtype) and
    settings this runtime does not implement (anyres tiling, image start/end tokens, resamplers) are refused.
    Nothing is downloaded; weights are streamed in 16 MB chunks, so memory stays well under 1 GB.
    OUT_DIR also gets convert.json (source sizes and sha256, the config fields read) and generation_config.json.

    \b
    Example:
      rsvlm-edge convert rsunivlm RSUniVLM/ models/rsunivlm
      rsvlm-edge export models/rsunivlm engines/rsunivlm
    """
    from rsvlm_edge.export.convert_rsunivlm import ConvertError, convert_rsunivlm

    try:
        result = convert_rsunivlm(src_dir, out_dir, dtype=dtype, overwrite=overwrite, progress=progress)
    except ConvertError as exc:
        raise UserError(str(exc)) from None
    cfg, stats = result.config, result.stats
    for warning in stats.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {result.out_dir}: {cfg.name}, {stats.tensors} tensors, {stats.params / 1e9:.3f} B parameters "
               f"({dtype}), vocab {cfg.vocab_size}, {cfg.num_visual_tokens} visual tokens per image, "
               f"preprocess {cfg.image_preprocess}")
    if stats.underflow:
        click.echo(f"{stats.underflow:,} tiny nonzero weights became 0 in float16 (|x| < 6e-8)")
    click.echo(f"disk: {_size(result.output_bytes)} model.safetensors; peak RAM {_size(result.peak_rss_bytes)}; "
               f"{result.seconds:.1f} s")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
