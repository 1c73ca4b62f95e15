"""Options and errors shared by the `rsvlm-edge` commands (infer, chat): every value is checked when it is parsed,
before a model loads, and a bad one fails with click's one-line usage error naming the option (exit code 2)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import click

from rsvlm_edge.validate import available_cores, utf8_problem

if TYPE_CHECKING:
    from rsvlm_edge.sampling import SamplingConfig


class UserError(click.ClickException):
    """A problem the user can fix (bad path, wrong bands, tampered model): one clear line, exit code 2."""

    exit_code = 2


def message(exc: BaseException) -> str:
    """The text of an error for one line of output; an exception without text (a bare MemoryError) by its kind."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError):
        return f"out of memory ({text})" if text else "out of memory"
    return text or type(exc).__name__


class FiniteFloat(click.FloatRange):
    """A float range that also refuses NaN and infinity (click's FloatRange lets NaN through: NaN compares false
    with both bounds)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class UnitInterval(FiniteFloat):
    """(0, 1]: nucleus mass."""

    def __init__(self) -> None:
        super().__init__(0.0, 1.0, min_open=True)


def _cap_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """More threads than cores only contends (and 100,000 pool threads exhaust memory): use the cores, say so."""
    cores = available_cores()
    if value is not None and value > cores:
        click.echo(f"Warning: --threads {value} is more than the {cores} cores available here; using {cores}", err=True)
        return cores
    return value


threads_option = click.option("--threads", type=click.IntRange(min=1), callback=_cap_threads,
                              help="CPU threads for the ort backend (default: auto, from the model's size and the free "
                                   "cores; -v shows the choice; more than the cores is capped).")


def threads_line(pipe: Any, requested: int | None) -> str | None:
    """What ``-v`` says about the threads a pipeline's backend runs on: the count and why, None for a backend that
    does not take a count (TensorRT runs on the GPU; the torch backend keeps PyTorch's default unless told)."""
    from rsvlm_edge.threads import explain

    threads = getattr(pipe.backend, "threads", None)
    if pipe.backend.name != "ort" or not threads:
        return None
    return f"threads: {threads} (--threads)" if requested else f"threads: {explain(pipe.config, threads)}"


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    problem = utf8_problem(value) if value is not None else None
    if problem:
        raise click.BadParameter(problem, ctx, param)
    return value


def prompt_option(help_text: str):
    return click.option("--prompt", callback=_utf8, help=help_text)


def sampling_options(fn):
    """--max-new-tokens, --temperature, --top-k, --top-p, --repetition-penalty, --seed: ranges checked at parse time."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Stop after this many tokens.  [default: per task, what its answer format needs: 768 for "
                          "det/obb, 640 for seg, 32 for cls/vg ... (rsvlm_edge.tasks.TASK_MAX_NEW_TOKENS), within "
                          "the model's context]"),
        click.option("--temperature", type=FiniteFloat(min=0.0), default=0.0, show_default=True,
                     help="0 = greedy; > 0 samples."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Sample among the k likeliest tokens (0 = off)."),
        click.option("--top-p", type=UnitInterval(), default=1.0, show_default=True,
                     help="Nucleus sampling mass in (0, 1] (1 = off)."),
        click.option("--repetition-penalty", type=FiniteFloat(min=0.0, min_open=True), default=None,
                     help="> 1 discourages repeats.  [default: the model's generation_config.json, else 1.0]"),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Sampling seed (each tile gets its own stream)."),
        click.option("--constrain/--no-constrain", default=True, show_default=True,
                     help="Mask each step to the task's answer grammar so [VG] [DET] [OBB] [CLS] [SEG] answers parse."),
        click.option("--classes", metavar="NAME,NAME,...", default=None,
                     help="[CLS] answers use only these class names (comma-separated), e.g. "
                          "'airport,harbor,farmland'. Needs --constrain."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _classes(kw: dict[str, Any]) -> tuple[str, ...] | None:
    text = kw.get("classes")
    if text is None:
        return None
    if not kw.get("constrain", True):
        raise UserError("--classes needs the grammar: drop --no-constrain")
    return tuple(name.strip() for name in text.split(",") if name.strip())


def default_tokens(kw: dict[str, Any]) -> bool:
    """Whether the user left --max-new-tokens out: then each request gets its task's answer length
    (:func:`rsvlm_edge.tasks.max_new_tokens_for`) in place of the config's placeholder."""
    return kw["max_new_tokens"] is None


def sampling_config(kw: dict[str, Any]) -> "SamplingConfig":
    """The SamplingConfig of the options above (``kw`` holds them among a command's other parameters); without
    --max-new-tokens it holds the untagged default, which :func:`default_tokens` callers replace per task."""
    from rsvlm_edge.sampling import SamplingConfig
    from rsvlm_edge.tasks import max_new_tokens_for

    try:
        tokens = max_new_tokens_for(None) if default_tokens(kw) else kw["max_new_tokens"]
        return SamplingConfig(max_new_tokens=tokens, temperature=kw["temperature"], top_k=kw["top_k"],
                              top_p=kw["top_p"], repetition_penalty=kw["repetition_penalty"], seed=kw["seed"],
                              constrain=kw.get("constrain", True), classes=_classes(kw)).validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def ray_options(fn):
    """--ray, --actors, --threads-per-actor: run the command's tiles on a Ray cluster (extra ``rsvlm-edge[ray]``)."""
    options = [
        click.option("--ray", "ray_address", metavar="auto|ADDRESS",
                     help="Spread the tiles over Ray actors, each holding one loaded engine: `auto` joins the cluster "
                          "that RAY_ADDRESS or `ray start` set up (else starts one on this machine); or HOST:6379, "
                          "ray://HOST:10001. Needs pip install 'rsvlm-edge[ray]'."),
        click.option("--actors", type=click.IntRange(min=1), default=None,
                     help="With --ray: pipelines to load.  [default: the cluster's CPUs / --threads-per-actor; its "
                          "GPUs for --backend trt]"),
        click.option("--threads-per-actor", type=click.IntRange(min=1), default=1, show_default=True,
                     help="With --ray: CPU threads each actor's backend runs on (and reserves on its node)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def ray_settings(ray_address: str | None, actors: int | None, threads_per_actor: int, threads: int | None = None) -> Any:
    """The :class:`~rsvlm_edge.distributed.settings.RaySettings` of the options above, None without --ray;
    --actors or --threads-per-actor without --ray, or --threads with it, is a usage error (one would be silently
    ignored)."""
    from rsvlm_edge.distributed.settings import RaySettings

    if ray_address is None:
        if actors is not None or threads_per_actor != 1:
            raise UserError("--actors and --threads-per-actor go with --ray (auto or a cluster address)")
        return None
    if threads is not None:
        raise UserError("--threads is for a local run; with --ray give --threads-per-actor")
    try:
        return RaySettings(ray_address, actors, threads_per_actor)
    except ValueError as exc:
        raise UserError(str(exc)) from None
