"""`rsvlm-edge bench`: thin click front end; the work lives in :mod:`rsvlm_edge.bench` (imported when it runs)."""

from __future__ import annotations

import click


class BenchUsageError(click.ClickException):
    exit_code = 2


def _engine(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise BenchUsageError(f"--engine takes NAME=DIR (e.g. ort-fp32=engines/tiny), got {value!r}")
    return name, path


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--engine", "engines", multiple=True, metavar="NAME=DIR",
              help="An ONNX Runtime engine dir (FP32, FP16 or INT8; precision read from its manifest). Repeatable.")
@click.option("--torch", "torch_dir", type=click.Path(file_okay=False),
              help="Model dir (model.safetensors) to run as the PyTorch eager reference, on the same weights.")
@click.option("--tiles", default=4, show_default=True, type=click.IntRange(1), help="Tiles per engine.")
@click.option("--new-tokens", default=16, show_default=True, type=click.IntRange(1),
              help="Tokens generated per tile, exactly (greedy; stop tokens ignored).")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(1), help="Tiles per batch for tiles/s.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads per engine and for the limit probes (default: all).")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Tile(s) to use, cycled to --tiles (default: AID samples from the shared data).")
@click.option("--prompt", default="[CAP] Describe the image.", show_default=True, help="Instruction for every tile.")
@click.option("--expert-budget", type=click.IntRange(1), help="Experts resident at once in ORT engines (default: all).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write every figure as JSON here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), help="Write bar charts (PNG, needs matplotlib).")
@click.option("--quick-limits", is_flag=True, help="Smaller limit probes (faster, but caches inflate them).")
@click.option("--timeout", "timeout_s", type=float, help="Seconds one engine may take before it is killed.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def bench_command(engines, torch_dir, tiles, new_tokens, batch, threads, images, prompt, expert_budget, json_out,
                  plot_out, quick_limits, timeout_s, progress) -> None:
    """Measure engines side by side on the same weights, against this machine's limits.

    Per engine, each in a fresh process: vision-encoder latency, time to first token, decode tokens/s,
    end-to-end seconds per tile, tiles/s with batching, peak RSS, expert load/switch time and cache hit rate.
    Memory bandwidth and GEMM peak are measured in the same run; decode is shown as a fraction of the bandwidth
    limit (active weight bytes per token x tokens/s), prefill and the encoder as a fraction of GEMM peak.

    \b
    Examples:
      rsvlm-edge bench --engine ort-fp32=engines/tiny --torch models/tiny-demo
      rsvlm-edge bench --engine fp32=engines/1b --engine int8=engines/1b-int8 --torch models/1b \\
          --tiles 2 --new-tokens 8 --threads 2 --json bench.json --plot bench.png
    """
    from rsvlm_edge.bench.plot import PlotUnavailable, plot
    from rsvlm_edge.bench.report import format_table, write_json
    from rsvlm_edge.bench.runner import BenchError, BenchSettings, EngineSpec, run_bench

    specs = [EngineSpec(name, "ort", path) for name, path in map(_engine, engines)]
    if torch_dir:
        specs.append(EngineSpec("torch-eager", "torch", torch_dir))
    settings = BenchSettings(tiles=tiles, new_tokens=new_tokens, batch=batch, threads=threads, images=list(images),
                             instruction=prompt, expert_budget=expert_budget, quick_limits=quick_limits,
                             timeout_s=timeout_s)
    try:
        result = run_bench(specs, settings, progress=progress)
    except BenchError as exc:
        raise BenchUsageError(str(exc)) from None
    click.echo(format_table(result))
    if json_out:
        write_json(result, json_out)
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        try:
            plot(result, plot_out)
            click.echo(f"wrote {plot_out}", err=True)
        except PlotUnavailable as exc:
            click.echo(f"no plot: {exc}", err=True)
