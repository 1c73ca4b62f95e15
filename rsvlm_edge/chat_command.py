"""`rsvlm-edge chat`: multi-turn dialogue about one tile, reusing the KV cache while the expert is unchanged."""

from __future__ import annotations

import sys

import click

from rsvlm_edge.cli_options import UserError, message, sampling_config, sampling_options, threads_option
from rsvlm_edge.config import EXPERT_NAMES
from rsvlm_edge.validate import utf8_problem


@click.command("chat")
@click.argument("model_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--sensor", type=click.Choice(["rgb", "sar", "ir", "ms"]), help="Input sensor (default: guessed).")
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@threads_option
@click.option("-v", "--verbose", is_flag=True, help="Show the expert per turn and how many cached tokens were reused.")
@sampling_options
def chat_command(model_dir, images, sensor, backend, threads, verbose, **sampling_kw) -> None:
    """Talk about a tile. Each line you type is a turn; start it with a tag ([VG], [SEG], ...) or let the router
    choose. Type /reset to forget the conversation, /quit (or end of input) to stop.

    \b
    Example:
      rsvlm-edge chat MODEL tile.png
      you> [CAP] Describe the image.
      you> How many ships are there?
    """
    from rsvlm_edge.generation import ChatSession
    from rsvlm_edge.pipeline import Pipeline

    if len(images) > 2:
        raise click.UsageError("chat takes one image (or a before/after pair)")
    sampling = sampling_config(sampling_kw)
    options = {"threads": threads} if threads else {}
    try:
        pipe = Pipeline(model_dir, backend=backend, **options)
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        raise UserError(message(exc)) from None
    with pipe:
        try:
            tile = pipe.tile(list(images), sensor)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:
            raise UserError(message(exc)) from None
        session = ChatSession(pipe.generator, tile.pixels, tile.sensor)
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                click.echo("you> ", nl=False)
            line = _read_line(sys.stdin)
            if line is None or line.strip() == "/quit":
                break
            text = line.strip()
            problem = utf8_problem(text)
            if problem:
                click.echo(f"error: that line is {problem}; type it again", err=True)
                continue
            if not text:
                continue
            if text == "/reset":
                session = ChatSession(pipe.generator, tile.pixels, tile.sensor)
                click.echo("(conversation cleared)")
                continue
            click.echo("model> ", nl=False)
            try:
                result = session.ask(text, sampling, on_token=lambda _i, piece: click.echo(piece, nl=False))
            except (ValueError, RuntimeError, MemoryError) as exc:  # this turn failed; the conversation goes on
                click.echo(f"\nerror: {message(exc)}")
                continue
            click.echo()
            if verbose:
                c = session.counters
                click.echo(f"  [expert {EXPERT_NAMES[result.routing.expert]} ({result.routing.source}); "
                           f"first token {result.timings['ttft_ms']:.0f} ms; reused {c['reused_tokens']} cached tokens "
                           f"so far, {c['reprefills']} re-prefills]")


def _read_line(stream) -> str | None:
    """The next line of input, None at its end. Bytes that are not UTF-8 come back as lone surrogates (to be
    refused by the caller) rather than a decode error that would end the session."""
    raw = getattr(stream, "buffer", None)
    if raw is None:
        line = stream.readline()
        return line or None
    data = raw.readline()
    return data.decode("utf-8", "surrogateescape") if data else None
