"""`rsvlm-edge` command line. Thin: each command parses options and calls one module that does the work."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from rsvlm_edge import __version__
from rsvlm_edge.cli_options import (
    UserError,
    default_tokens,
    message,
    prompt_option,
    ray_options,
    ray_settings,
    sampling_config,
    sampling_options,
    threads_option,
)
from rsvlm_edge.config import DEFAULT_SENSORS, EXPERT_NAMES, PRESETS, ConfigError, ModelConfig, preset
from rsvlm_edge.pipeline import BACKENDS
from rsvlm_edge.tasks import TASK_CHOICES, TASK_HELP, TaskError, make_instruction


def _fail(exc: Exception) -> UserError:
    return UserError(message(exc))


# Optional dependencies by top-level module, and the setup.cfg extra that installs each; a command that needs more
# than one package names the extra that brings them all.
EXTRA_OF_MODULE = {"torch": "train", "onnx": "export", "onnxscript": "export", "tensorrt": "trt", "cuda": "trt", "ray": "ray"}
EXTRA_OF_COMMAND = {"export": "export", "build": "export", "calibrate": "export", "train": "train", "init": "train"}


class _Main(click.Group):
    """Runs a command; an optional dependency missing at run time becomes one line naming the extra to install."""

    def invoke(self, ctx: click.Context):
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            package = (exc.name or "").split(".")[0]
            if package not in EXTRA_OF_MODULE:
                raise
            command = ctx.invoked_subcommand or "this command"
            extra = EXTRA_OF_MODULE[package] if package in ("tensorrt", "cuda") else \
                EXTRA_OF_COMMAND.get(command, EXTRA_OF_MODULE[package])
            raise UserError(f"`rsvlm-edge {command}` needs {package}, which is not installed here: "
                            f"pip install 'rsvlm-edge[{extra}]'") from None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line is one line for the user (``warning: ...``), not Python's file:line record."""
    click.echo(f"warning: {message}", err=True)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="rsvlm-edge")
def main() -> None:
    """Run remote-sensing MoE vision-language models on tiles: caption, classify, answer questions, ground,
    detect, segment and compare (optical, SAR, infrared, multispectral).

    \b
    Typical flow:
      rsvlm-edge infer models/tiny-demo tile.png --task cap          # ONNX Runtime engines, CPU
      rsvlm-edge infer models/tiny-demo tile.png --prompt "Where is the ship?"   # router picks the expert
      rsvlm-edge info models/tiny-demo                               # shapes and parameter counts
    """


# --------------------------------------------------------------------------------------------------- info
@main.command()
@click.argument("model", required=False)
@click.option("--config", "config_name", type=click.Choice(sorted(PRESETS)), help="Describe a preset instead of a model dir.")
@click.option("--count/--no-count", default=True, help="Count parameters (builds the model on the meta device; needs torch).")
def info(model: str | None, config_name: str | None, count: bool) -> None:
    """Show a model's config, visual-token count and parameter counts (stored vs active per request)."""
    try:
        if model:
            path = Path(model)
            cfg = ModelConfig.load(path / "config.json" if path.is_dir() else path)
        elif config_name:
            cfg = preset(config_name)
        else:
            raise UserError("give a MODEL directory or --config NAME")
    except ConfigError as exc:
        raise _fail(exc) from None
    click.echo(f"model: {cfg.name}")
    click.echo(f"vision: {cfg.image_size}px, patch {cfg.patch_size}, {cfg.num_patches} patches + "
               f"{int(cfg.image_newline)} newline = {cfg.num_visual_tokens} visual tokens per image; "
               f"ViT {cfg.vision_layers}x{cfg.vision_width}, CNN branch: {'yes' if cfg.cnn_branch else 'no'}; "
               f"sensors: {', '.join(f'{k}({v})' for k, v in cfg.sensors.items())}")
    click.echo(f"decoder: {cfg.num_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
               f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}, "
               f"{cfg.num_experts} experts ({', '.join(EXPERT_NAMES)})")
    if count:
        try:
            from rsvlm_edge.modeling import build_model, parameter_counts
        except ImportError:
            click.echo("parameter counts need PyTorch (pip install 'rsvlm-edge[export]')")
            return
        counts = parameter_counts(build_model(cfg, device="meta", seed=None))
        click.echo(f"parameters: {counts['stored'] / 1e9:.3f} B stored, {counts['active'] / 1e9:.3f} B active per "
                   f"request ({counts['stored']:,} / {counts['active']:,}; {counts['per_expert']:,} per expert)")


# --------------------------------------------------------------------------------------------------- init
@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--config", "config_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              help="Reuse this tokenizer.json instead of training one on the synthetic corpus.")
@click.option("--seed", default=0, show_default=True)
def init(out_dir: str, config_name: str, tokenizer_path: str | None, seed: int) -> None:
    """Write a random-init model dir (config.json, model.safetensors, tokenizer.json): for tests and benchmarks."""
    from rsvlm_edge.training.bootstrap import init_model_dir

    try:
        init_model_dir(out_dir, preset(config_name), seed=seed, tokenizer_path=tokenizer_path)
    except (ConfigError, ValueError, OSError) as exc:
        raise _fail(exc) from None
    click.echo(f"wrote random-init {config_name} model to {out_dir}")


# --------------------------------------------------------------------------------------------------- infer
@main.command()
@click.argument("model_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--task", type=click.Choice(TASK_CHOICES, case_sensitive=False), help=f"Task tag. {TASK_HELP}.")
@prompt_option("Instruction text. Without --task and without a leading tag, the router picks the expert.")
@click.option("--sensor", type=click.Choice(list(DEFAULT_SENSORS)), help="Input sensor (default: guessed from bands/dtype).")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="ort: ONNX Runtime engines (CPU default); torch: PyTorch reference; trt: TensorRT plans.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Tiles per batch when IMAGES is a folder.")
@click.option("--fail-fast", is_flag=True, help="Folder runs: stop at the first tile that cannot be read or answered "
              "(exit code 2) instead of recording its error and going on.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per tile (boxes in pixels, mask PNG paths).")
@click.option("--mask-dir", type=click.Path(file_okay=False),
              help="Write [SEG] masks as PNGs (input pixel size) here, named by the image's path relative to the "
                   "input folder: tiles/a/x.jpg -> MASK_DIR/a/x.jpg_mask.png (255 = any label) and "
                   "x.jpg_mask_classes.png (palette; values index the JSON's mask_classes, 0 = others).")
@click.option("--stream/--no-stream", default=True, help="Print tokens as they come (single tile, text output).")
@click.option("--expert-budget", type=str, help="Expert cache budget, e.g. 1 (experts) or 300MB (ort backend).")
@click.option("--pin-expert", "pinned", multiple=True, type=click.Choice(list(EXPERT_NAMES)),
              help="Keep this expert resident once loaded, whatever the budget's LRU says (repeatable; ort backend).")
@threads_option
@click.option("-v", "--verbose", is_flag=True, help="Show routing, timings and expert-cache counters.")
@sampling_options
@ray_options
def infer(model_dir, images, task, prompt, sensor, backend, batch_size, fail_fast, as_json, mask_dir, stream,
          expert_budget, pinned, threads, verbose, ray_address, actors, threads_per_actor, **sampling_kw) -> None:
    """Answer one tile, a before/after pair, or every tile in a folder.

    \b
    Examples:
      rsvlm-edge infer MODEL tile.png --task cap
      rsvlm-edge infer MODEL tile.png --task vg --prompt "the ship in the top left" --json
      rsvlm-edge infer MODEL before.png after.png --task ccd
      rsvlm-edge infer MODEL tile.tif --sensor sar --task seg --mask-dir masks/
      rsvlm-edge infer MODEL tiles/ --task cls --json > labels.jsonl
      rsvlm-edge infer MODEL tiles/ --task cls --json --ray auto --actors 2   # on a Ray cluster

    \b
    Folder runs answer every tile they can. A tile that cannot be read or answered gets an error record in its
    place on stdout ({"images": [...], "error": "..."} with --json; "== PATH" then "  error: ..." in text) and the
    run goes on; a summary (answered, failed, tiles/s) ends it on stderr. Exit code 0 when at least one tile was
    answered; 2 when none was, with --fail-fast at the first failure, and for any usage error (checked before the
    model loads). One image or pair exits 2 on its error.
    """
    from rsvlm_edge.infer_command import Output, parse_budget, resolve_inputs, run_infer

    cluster = ray_settings(ray_address, actors, threads_per_actor, threads)
    try:
        instruction = make_instruction(task, prompt)
        options = parse_budget(expert_budget)
        if pinned:
            if backend != "ort":
                raise UserError("--pin-expert works with the ort backend (its expert cache)")
            options["pinned_experts"] = tuple(EXPERT_NAMES.index(p) for p in pinned)
        if threads:
            options["threads"] = threads
        inputs = resolve_inputs(list(images))
        run_infer(model_dir=model_dir, inputs=inputs, instruction=instruction, sensor=sensor, backend=backend,
                  options=options, batch_size=batch_size, sampling=sampling_config(sampling_kw),
                  output=Output(as_json=as_json, mask_dir=mask_dir, stream=stream, verbose=verbose),
                  fail_fast=fail_fast, default_tokens=default_tokens(sampling_kw), cluster=cluster)
    except (TaskError, ValueError, OSError, RuntimeError, MemoryError) as exc:
        raise UserError(message(exc)) from None


def _register_optional_commands() -> None:
    """Commands whose modules may pull heavy extras register lazily, so `--help` stays fast and torch-free."""
    import importlib

    for module, name in [
        ("rsvlm_edge.training.cli", "train"),
        ("rsvlm_edge.training.cli", "eval"),
        ("rsvlm_edge.export.cli", "export"),
        ("rsvlm_edge.export.convert_cli", "convert"),
        ("rsvlm_edge.engines.cli", "build"),
        ("rsvlm_edge.calibration.cli", "calibrate"),
        ("rsvlm_edge.chat_command", "chat"),
        ("rsvlm_edge.bench_command", "bench"),
        ("rsvlm_edge.bench_command", "profile"),
        ("rsvlm_edge.scene_command", "scene"),
        ("rsvlm_edge.scene_command", "scene-bench"),
        ("rsvlm_edge.bench.peers.cli", "bench-peers"),
    ]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
                continue  # that part of the product is not built (yet) in this checkout
            raise
        command = getattr(mod, name.replace("-", "_") + "_command", None)
        if command is not None:
            main.add_command(command, name)


_register_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
