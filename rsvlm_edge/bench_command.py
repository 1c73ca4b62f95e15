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
@click.option("--threads", type=click.IntRange(1),
              help="CPU threads per engine and for the limit probes (default: auto, as infer chooses for the model).")
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
    Memory bandwidth and GEMM peak are measured in the same run (the copy bandwidth before and after every engine;
    the limit is the best sample, since a shared machine's bandwidth drifts); decode is shown as a fraction of the
    bandwidth limit (active weight bytes per token x tokens/s), prefill and the encoder as a fraction of GEMM peak.

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


@click.command("profile", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(2),
              help="Tokens generated in the profiled run (greedy; stop tokens ignored).")
@click.option("--threads", type=click.IntRange(1),
              help="ONNX Runtime threads (default: auto, as infer chooses for the model).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False),
              help="Tile to use (default: the first AID sample from the shared data).")
@click.option("--prompt", default="[CAP] Describe the image.", show_default=True, help="Instruction for the tile.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the figures as JSON here.")
@click.option("--keep-traces", type=click.Path(file_okay=False),
              help="Copy ORT's raw traces here (one JSON per session; open them in Perfetto or chrome://tracing).")
def profile_command(engine_dir, new_tokens, threads, image, prompt, json_out, keep_traces) -> None:
    """Where one decode step's time goes, per op type, in an ONNX Runtime engine dir.

    Runs one tile with ONNX Runtime's profiler on and prints, per op type of the routed decoder: nodes and
    microseconds per decode step, the share of the step, and the weight bytes the nodes read per step over their
    time (GB/s: read a weight-streaming kernel against the copy bandwidth `rsvlm-edge bench` measures). The rest
    of the step is ORT's time between nodes and everything outside the decoder session (Python loop, embedding,
    sampling). The profiler slows every node a little: compare shares and GB/s between engines, not tok/s.

    \b
    Examples:
      rsvlm-edge profile models/tiny-demo-int8 --threads 1
      rsvlm-edge profile /tmp/1b-int8w --threads 2 --new-tokens 16 --json profile_1b.json
    """
    from rsvlm_edge.backends.base import BackendError
    from rsvlm_edge.bench.op_profile import format_profile, profile_decode
    from rsvlm_edge.bench.report import write_json
    from rsvlm_edge.bench.runner import BenchError, default_images

    try:
        image = image or default_images()[0]
    except BenchError as exc:
        raise BenchUsageError(str(exc)) from None
    try:
        report = profile_decode(engine_dir, image, prompt, new_tokens=new_tokens, threads=threads,
                                keep_traces=keep_traces)
    except (BackendError, ValueError, OSError) as exc:
        raise BenchUsageError(str(exc)) from None
    click.echo(format_profile(report))
    if json_out:
        write_json(report, json_out)
        click.echo(f"wrote {json_out}", err=True)
